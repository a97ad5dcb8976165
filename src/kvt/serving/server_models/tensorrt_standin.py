"""A python-backend model that stands in for Triton's TensorRT backend where no GPU is (``kvt rehearse``).

The rehearsal keeps a ``tensorrt_plan`` stage's config.pbtxt as ``kvt triton-repo`` wrote it and swaps
only the backend: this file becomes ``<stage>/<version>/model.py``, next to the plan files (stand-in
plans: the optimisation profiles ``kvt build`` recorded, one min/opt/max shape per input) and the
stage's ONNX graph, which ONNX Runtime runs on the CPU. What it reproduces of the TensorRT backend
(triton-inference-server/tensorrt_backend, ``src/instance_state.cc``; the messages are the backend's):

* one execution context per optimisation profile listed in the instance group's ``profile`` field (which
  the rehearsal moves to the ``standin_profiles`` parameter: Triton accepts the field on TensorRT models
  only), and only profile 0 when none is listed (``InitOptimizationProfiles``);
* a profile index that the plan does not have fails the model load;
* per execution, the context whose profile contains every input shape and whose opt is nearest
  (Manhattan distance, computed as ``EvaluateTensorRTContext`` computes it); none containing them:
  the backend logs "failed to find any Optimization Profile ...", proceeds with the first context, and
  the request fails with "request specifies invalid shape for input ..." (``ValidateDimension``);
* ``max_batch_size``: requests of one execution are concatenated along the batch dimension (the
  dynamic batcher's batch), whose total must not exceed ``max_batch_size``;
* ``reshape``: an input declared ``dims: [1]`` with ``reshape { shape: [] }`` reaches the engine without
  its trailing 1, as Triton's core delivers it to the TensorRT backend.

What it cannot show: kernels, GPU memory, the GPU data path, plan deserialisation. It depends only on
numpy and onnxruntime, so it is copied into the repository like the python-ort stage model.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

pb_utils: Any = None  # triton_python_backend_utils, imported in initialize (it exists only in the stub)

PLAN_FORMAT = "kvt-standin-plan"
_FAR = 2**62


class _Context:
    """One execution context: a profile's min/opt/max shape per input (batch dimension included)."""

    def __init__(self, name: str, index: int, shapes: dict[str, list[list[int]]]) -> None:
        self.name, self.index = name, index
        self.min = {k: v[0] for k, v in shapes.items()}
        self.opt = {k: v[1] for k, v in shapes.items()}
        self.max = {k: v[2] for k, v in shapes.items()}


def _dimension_error(shape: list[int], low: list[int], high: list[int]) -> str | None:
    """``ValidateDimension`` of tensorrt_backend (src/tensorrt_utils.cc)."""
    if len(shape) != len(high):
        return f"model expected {len(high)} dimensions but received {len(shape)} dimensions"
    for i, (value, lo, hi) in enumerate(zip(shape, low, high)):
        if value < lo or value > hi:
            return f"model expected the shape of dimension {i} to be between {lo} and {hi} but received {value}"
    return None


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        global pb_utils
        import onnxruntime as ort
        import triton_python_backend_utils as utils

        pb_utils = utils
        config = json.loads(args["model_config"])
        self.instance = args.get("model_instance_name", config["name"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        plan_file = self._plan_file(config)
        with open(os.path.join(folder, plan_file)) as handle:
            plan = json.load(handle)
        if plan.get("format") != PLAN_FORMAT:
            raise ValueError(f"{plan_file}: not a kvt stand-in plan (the rehearsal writes them)")
        profiles = plan["profiles"]  # per profile: input -> [min, opt, max] shapes
        names = self._profile_names(config)
        self.contexts: list[_Context] = []
        for name in names or ["default"]:
            index = 0 if name == "default" else self._profile_index(name, len(profiles))
            if any(c.index == index for c in self.contexts):
                continue  # the backend reuses an already mapped profile
            self.contexts.append(_Context(name, index, profiles[index]))
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(os.path.join(folder, plan["onnx"]), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        self.squeeze = {t["name"] for t in config["input"]
                        if t.get("reshape") is not None and not t["reshape"].get("shape")}
        self.max_batch = int(config.get("max_batch_size", 0))
        pb_utils.Logger.log_info(f"{self.instance}: TensorRT stand-in, contexts for profiles "
                                 f"{[c.index for c in self.contexts]} of {len(profiles)}")

    @staticmethod
    def _plan_file(config: dict[str, Any]) -> str:
        """The plan the backend would load (``cc_model_filenames`` / ``default_model_filename``, which
        the rehearsal moves to ``standin_*`` parameters); of several per compute capability, the one named
        by the ``standin_compute_capability`` parameter, else the first."""
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        by_cc = json.loads(params.get("standin_cc_model_filenames", "{}")) or config.get("cc_model_filenames") or {}
        cc = params.get("standin_compute_capability")
        if by_cc:
            return str(by_cc[cc] if cc in by_cc else next(iter(by_cc.values())))
        return str(params.get("standin_default_model_filename") or config.get("default_model_filename")
                   or "model.plan")

    @staticmethod
    def _profile_names(config: dict[str, Any]) -> list[str]:
        """The instance group's ``profile`` list (moved to the ``standin_profiles`` parameter by the
        rehearsal: Triton accepts the field on TensorRT models only)."""
        names: list[str] = []
        for group in config.get("instance_group", []):
            names += [str(p) for p in group.get("profile", [])]
        listed = config.get("parameters", {}).get("standin_profiles", {}).get("string_value", "")
        return names + [p for p in listed.split(",") if p]

    @staticmethod
    def _profile_index(name: str, count: int) -> int:
        """``GetProfileIndex``: the name is the index; out of range fails the load."""
        try:
            index = int(name)
        except ValueError:
            raise ValueError(f"unable to parse optimization profile {name}") from None
        if not 0 <= index < count:
            raise ValueError(f"can not find optimization profile {name} for the plan, which has {count} "
                             "optimization profiles")
        return index

    # ------------------------------------------------------------------ execution

    def _choose(self, shapes: dict[str, list[int]], total_batch: int) -> tuple[_Context, str | None]:
        """``GetMostOptimizedProfile`` / ``EvaluateTensorRTContext``, including their index arithmetic."""
        if len(self.contexts) == 1:
            return self.contexts[0], None
        best, best_distance = self.contexts[0], _FAR
        for context in self.contexts:
            distance = 0
            for name, shape in shapes.items():
                if name not in context.min:  # a static input: no profile entry (checked by the engine)
                    continue
                if _dimension_error(shape, context.min[name], context.max[name]) is not None:
                    distance = _FAR
                    break
                opt = context.opt[name]
                distance += abs(opt[0] - total_batch)
                distance += sum(abs(opt[i] - shape[i - 1]) for i in range(1, len(opt)))
            if distance < best_distance:
                best, best_distance = context, distance
        if best_distance == _FAR:
            listed = " ".join(f"{c.name}[{c.index}]" for c in self.contexts)
            return best, (f"failed to find any Optimization Profile among [ {listed}] to support the requested "
                          "dimensions (or shape values), proceeding with first profile.")
        return best, None

    def _feeds(self, request: Any) -> dict[str, np.ndarray]:
        out = {}
        for name in self.inputs:
            array = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
            if name in self.squeeze and array.ndim >= 1 and array.shape[-1] == 1:
                array = array.reshape(array.shape[:-1])
            out[name] = array
        return out

    def execute(self, requests: list[Any]) -> list[Any]:
        feeds = [self._feeds(r) for r in requests]
        if self.max_batch > 0:
            total = sum(int(f[self.inputs[0]].shape[0]) for f in feeds)
            if total > self.max_batch:
                message = f"batch size {total} for '{self.instance}', max allowed is {self.max_batch}"
                return [pb_utils.InferenceResponse(error=pb_utils.TritonError(message)) for _ in requests]
            merged = {n: np.concatenate([f[n] for f in feeds]) for n in self.inputs}
        else:
            total = 1
            merged = feeds[0] if len(feeds) == 1 else {}
        if self.max_batch == 0 and len(feeds) > 1:  # no batching: the scheduler sends one at a time
            return [self._execute_one(f, 1) for f in feeds]
        result = self._execute_one(merged, total, split=[int(f[self.inputs[0]].shape[0]) for f in feeds]
                                   if self.max_batch > 0 else None)
        return result if isinstance(result, list) else [result]

    def _execute_one(self, feeds: dict[str, np.ndarray], total: int, split: list[int] | None = None) -> Any:
        shapes = {n: [int(d) for d in a.shape] for n, a in feeds.items()}
        context, warning = self._choose(shapes, total)
        count = len(split) if split else 1
        if warning is not None:
            pb_utils.Logger.log_error(warning)
        for name in self.inputs:  # the backend validates every input against the chosen context
            if name not in context.min:  # static inputs (the U-Nets' contexts) have no profile entry
                continue
            error = _dimension_error(shapes[name], context.min[name], context.max[name])
            if error is not None:
                message = (f"request specifies invalid shape for input '{name}' for {self.instance}. "
                           f"Error details: {error}")
                return [pb_utils.InferenceResponse(error=pb_utils.TritonError(message)) for _ in range(count)]
        try:
            results = self.session.run(self.outputs, feeds)
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(message)) for _ in range(count)]
        if not split:
            return self._response(results)
        bounds = np.cumsum(split)[:-1]
        parts = [np.split(value, bounds) for value in results]
        return [self._response([p[i] for p in parts]) for i in range(len(split))]

    def _response(self, results: list[np.ndarray]) -> Any:
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in zip(self.outputs, results)])
