"""A stage backend that runs each stage as a call to another model of the same Triton server (BLS).

The orchestrator model builds :class:`KandinskyVideoPipeline` over this backend, so the server runs the
one denoising loop of kvt.runtime; only ``_run`` differs from the in-process backends. Tensors on a GPU
are handed over with DLPack and the stage outputs are requested in GPU memory, so latents, contexts and
U-Net outputs stay on the device between calls (the python backend passes them by CUDA IPC). On the CPU
the inputs are numpy views (copied once into the shared-memory request) and outputs are copied out of
the response's shared memory, which is released with the response.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kvt.contract.errors import KvtError
from kvt.contract.stages import StageTable
from kvt.formats.triton_repo import unsqueezed_inputs as default_unsqueezed
from kvt.runtime.backends.base import StageBackend


class StageCallError(KvtError, RuntimeError):
    """A stage model returned an error (its message says which model and why)."""


class TritonStageBackend(StageBackend):
    """``_run`` = one BLS request to the model that serves the stage."""

    name = "triton"

    def __init__(self, table: StageTable, pb_utils: Any, device: torch.device | str = "cpu",
                 model_names: Mapping[str, str] | None = None, validate: bool = True,
                 unsqueezed_inputs: Mapping[str, Sequence[str]] | None = None) -> None:
        """``pb_utils``: the stub's triton_python_backend_utils module. ``model_names``: stage -> model
        name where they differ (default: the stage's name). ``unsqueezed_inputs``: stage -> per-row
        scalar inputs sent as [N, 1] (batched stage configs; default: computed as the generator does)."""
        super().__init__(table, device, validate)
        self.pb = pb_utils
        self.model_names = {name: name for name in table.names} | dict(model_names or {})
        self.unsqueezed = {spec.name: set(default_unsqueezed(spec)) for spec in table}
        self.unsqueezed.update({stage: set(names) for stage, names in (unsqueezed_inputs or {}).items()})
        self._preferred = None
        if self.device.type == "cuda" and hasattr(pb_utils, "PreferredMemory"):
            self._preferred = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU,
                                                       self.device.index or 0)

    def _to_triton(self, name: str, tensor: torch.Tensor):
        tensor = tensor.detach().contiguous()
        if tensor.device.type == "cuda":
            return self.pb.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(tensor))
        return self.pb.Tensor(name, tensor.numpy())

    def _to_torch(self, tensor) -> torch.Tensor:
        if tensor.is_cpu():
            out = torch.from_numpy(np.array(tensor.as_numpy(), copy=True))
            return out.to(self.device) if self.device.type != "cpu" else out
        return torch.from_dlpack(tensor.to_dlpack())

    def _run(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        spec = self.table[stage]
        model = self.model_names[stage]
        unsqueezed = self.unsqueezed.get(stage, ())
        tensors = [self._to_triton(name, inputs[name][:, None] if name in unsqueezed else inputs[name])
                   for name in spec.input_names]
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the stage reads what torch wrote
        kwargs = {"preferred_memory": self._preferred} if self._preferred is not None else {}
        request = self.pb.InferenceRequest(model_name=model, inputs=tensors,
                                           requested_output_names=list(spec.output_names), **kwargs)
        response = request.exec()
        if response.has_error():
            raise StageCallError(f"stage {stage} (model {model!r}): {response.error().message()}")
        outputs = {}
        for name in spec.output_names:
            tensor = self.pb.get_output_tensor_by_name(response, name)
            if tensor is None:
                raise StageCallError(f"stage {stage} (model {model!r}) returned no output {name!r}")
            outputs[name] = self._to_torch(tensor)
        return outputs
