"""A stage backend that runs each stage as a call to another model of the same Triton server (BLS).

The orchestrator model builds :class:`KandinskyVideoPipeline` over this backend, so the server runs the
one denoising loop of kvt.runtime; only ``_run`` differs from the in-process backends. Tensors on a GPU
are handed over with DLPack and the stage outputs are requested in GPU memory; the python backend copies
each BLS input into a buffer of Triton's CUDA memory pool (``--cuda-memory-pool-byte-size``; a tensor
the pool cannot hold is allocated with cudaMalloc for the call) and hands GPU outputs back by CUDA IPC.
On the CPU the inputs are numpy views copied once into the shared-memory request, and outputs are
copied out of the response's shared memory, which is released with the response.

A stage call that does not answer within ``call_timeout_s`` fails the request with a timeout (the
waiting thread is abandoned, the orchestrator instance goes on serving); the stage models a request
needs are checked for readiness before any of its work starts.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kvt.contract.errors import KvtError, TimedOutError, UnavailableError
from kvt.contract.plan import request_plan
from kvt.contract.profiles import Profile, ServedProfiles
from kvt.contract.request import GenerationRequest
from kvt.contract.stages import StageTable
from kvt.formats.triton_repo import unsqueezed_inputs as default_unsqueezed
from kvt.runtime.backends.base import StageBackend


class StageCallError(KvtError, RuntimeError):
    """A stage model returned an error (its message says which model and why)."""


class StageCallTimeout(TimedOutError):
    """A stage model did not answer within the orchestrator's bound on one call."""


class StageModelNotReady(UnavailableError):
    """A stage model a request needs is not loaded and ready."""


class TritonStageBackend(StageBackend):
    """``_run`` = one BLS request to the model that serves the stage."""

    name = "triton"

    def __init__(self, table: StageTable, pb_utils: Any, device: torch.device | str = "cpu",
                 model_names: Mapping[str, str] | None = None, validate: bool = True,
                 unsqueezed_inputs: Mapping[str, Sequence[str]] | None = None,
                 served_profiles: Mapping[str, Sequence[Sequence[Profile]]] | None = None,
                 call_timeout_s: float | None = None,
                 on_call: Callable[[str, float], None] | None = None) -> None:
        """``pb_utils``: the stub's triton_python_backend_utils module. ``model_names``: stage -> model
        name of every stage the repository serves (default: every stage, under its own name). ``unsqueezed_inputs``: stage -> per-row
        scalar inputs sent as [N, 1] (batched stage configs; default: computed as the generator does).
        ``served_profiles``: stage -> profiles of each of its plans (default: the table's ranges).
        ``call_timeout_s``: the longest a single stage call may take (default: unbounded).
        ``on_call``: called with (stage, seconds) after every stage call (the orchestrator's metrics)."""
        super().__init__(table, device, validate)
        self.pb = pb_utils
        # The stage models of this repository (a build may leave out a stage no served request calls).
        self.model_names = dict(model_names) if model_names is not None else {n: n for n in table.names}
        self.unsqueezed = {spec.name: set(default_unsqueezed(spec)) for spec in table}
        self.unsqueezed.update({stage: set(names) for stage, names in (unsqueezed_inputs or {}).items()})
        self._served = dict(served_profiles) if served_profiles is not None else None
        self.call_timeout_s = call_timeout_s
        self.on_call = on_call
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._preferred = None
        if self.device.type == "cuda" and hasattr(pb_utils, "PreferredMemory"):
            self._preferred = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU,
                                                       self.device.index or 0)

    # ------------------------------------------------------------------ what the stage models serve

    def served_profiles(self) -> ServedProfiles:
        return self._served if self._served is not None else super().served_profiles()

    def require_ready(self, request: GenerationRequest) -> None:
        """Every stage model ``request`` calls is ready, or :class:`StageModelNotReady` naming them."""
        ready = getattr(self.pb, "is_model_ready", None)
        if ready is None:
            return
        stages = {call.stage for call in request_plan(request.width, request.height, request.fps,
                                                       request.image is not None, 1, 1, 1)}
        models = {self.model_names.get(s, s) for s in stages}
        missing = sorted(m for m in models if not ready(model_name=m))
        if missing:
            raise StageModelNotReady(f"stage model(s) {missing} not ready on this server; nothing was run")

    # ------------------------------------------------------------------ calls

    def _to_triton(self, name: str, tensor: torch.Tensor) -> Any:
        tensor = tensor.detach().contiguous()
        if tensor.device.type == "cuda":
            return self.pb.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(tensor))
        return self.pb.Tensor(name, tensor.numpy())

    def _to_torch(self, tensor: Any) -> torch.Tensor:
        if tensor.is_cpu():
            out = torch.from_numpy(np.array(tensor.as_numpy(), copy=True))
            return out.to(self.device) if self.device.type != "cpu" else out
        return torch.from_dlpack(tensor.to_dlpack())

    def _exec(self, stage: str, model: str, request: Any) -> Any:
        """``request.exec()``, bounded by ``call_timeout_s`` when set."""
        if self.call_timeout_s is None:
            return request.exec()
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvt-bls")
        future = self._pool.submit(request.exec)
        try:
            return future.result(timeout=self.call_timeout_s)
        except concurrent.futures.TimeoutError:
            # The call may still complete in the stage model; this instance stops waiting for it and
            # uses a fresh worker for the next call.
            self._pool.shutdown(wait=False)
            self._pool = None
            raise StageCallTimeout(f"stage {stage} (model {model!r}) did not answer within "
                                   f"{self.call_timeout_s:g} s; the request was stopped") from None

    def _run(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        spec = self.table[stage]
        model = self.model_names.get(stage, stage)
        unsqueezed = self.unsqueezed.get(stage, ())
        tensors = [self._to_triton(name, inputs[name][:, None] if name in unsqueezed else inputs[name])
                   for name in spec.input_names]
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the stage reads what torch wrote
        kwargs = {"preferred_memory": self._preferred} if self._preferred is not None else {}
        request = self.pb.InferenceRequest(model_name=model, inputs=tensors,
                                           requested_output_names=list(spec.output_names), **kwargs)
        start = time.perf_counter()
        response = self._exec(stage, model, request)
        if self.on_call is not None:
            self.on_call(stage, time.perf_counter() - start)
        if response.has_error():
            raise StageCallError(f"stage {stage} (model {model!r}): {response.error().message()}")
        outputs = {}
        for name in spec.output_names:
            tensor = self.pb.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise StageCallError(f"stage {stage} (model {model!r}) returned no output {name!r}")
            outputs[name] = self._to_torch(tensor)
        return outputs

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
