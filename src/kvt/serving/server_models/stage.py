"""Triton python-backend model that runs one stage's ONNX file with ONNX Runtime.

For Triton builds without the onnxruntime / tensorrt backends (the CPU test server bundled in
nvidia-pytriton). The repository generator copies this file as ``<stage>/1/model.py`` next to
``model.onnx``; it depends only on numpy and onnxruntime, so a stage model does not need kvt installed.
Input and output names come from the model's config.pbtxt (generated from the stage table). When the
config declares a batch dimension, requests that arrive together are concatenated into one session run
and split again by their row counts.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

pb_utils: Any = None  # triton_python_backend_utils, imported in initialize (it exists only in the stub)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        global pb_utils
        import onnxruntime as ort
        import triton_python_backend_utils as utils

        pb_utils = utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = os.path.join(args["model_repository"], args["model_version"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
        options.inter_op_num_threads = 1
        providers = [p for p in params.get("providers", "CPUExecutionProvider").split(",") if p]
        self.session = ort.InferenceSession(os.path.join(folder, params.get("onnx_file", "model.onnx")),
                                            sess_options=options, providers=providers)
        self.inputs = [t["name"] for t in config["input"]]
        # The graph's rank per input: a per-row scalar arrives as [N, 1] (config reshape) and runs as [N].
        self.ranks = {arg.name: len(arg.shape) for arg in self.session.get_inputs()}
        self.outputs = [t["name"] for t in config["output"]]
        self.batched = int(config.get("max_batch_size", 0)) > 0

    def _fit(self, name: str, array: np.ndarray) -> np.ndarray:
        if array.ndim == self.ranks[name] + 1 and array.shape[-1] == 1:
            return array.reshape(array.shape[:-1])
        return array

    def _run(self, feeds: dict) -> list:
        return self.session.run(self.outputs, feeds)

    def execute(self, requests: list) -> list:
        arrays = []
        for request in requests:
            arrays.append({name: self._fit(name, pb_utils.get_input_tensor_by_name(request, name).as_numpy())
                           for name in self.inputs})
        if self.batched and len(requests) > 1:
            try:
                return self._execute_together(arrays)
            except Exception:  # fall back to one run per request (each then reports its own error)
                pass
        responses = []
        for feeds in arrays:
            try:
                results = self._run(feeds)
                responses.append(self._response(results))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}")))
        return responses

    def _execute_together(self, arrays: list) -> list:
        rows = [feeds[self.inputs[0]].shape[0] for feeds in arrays]
        feeds = {name: np.concatenate([a[name] for a in arrays]) for name in self.inputs}
        results = self._run(feeds)
        bounds = np.cumsum(rows)[:-1]
        split = [np.split(value, bounds) for value in results]
        return [self._response([parts[i] for parts in split]) for i in range(len(arrays))]

    def _response(self, results: list):
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in zip(self.outputs, results)])
