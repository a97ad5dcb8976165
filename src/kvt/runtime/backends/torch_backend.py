"""The PyTorch backend: runs the stage modules in-process (CPU or CUDA)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kvt.contract.stages import StageTable
from kvt.models.model_set import KandinskyVideoModels
from kvt.models.stage_modules import build_stage_modules, stage_table_for
from kvt.runtime.backends.base import StageBackend


class TorchBackend(StageBackend):
    name = "torch"
    any_frame_size = True

    def __init__(self, models: KandinskyVideoModels, table: StageTable | None = None,
                 validate: bool = True, cuts: bool = True) -> None:
        """``cuts=False`` runs the U-Net stages in the official per-row form (see stage_modules)."""
        table = table or stage_table_for(models.config)
        device = next(models.unet_t2v.parameters()).device
        super().__init__(table, device, validate)
        self.models = models
        self.cuts = cuts
        self.modules = build_stage_modules(models, table, cuts)

    @torch.inference_mode()
    def _run(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        spec = self.table[stage]
        args = [inputs[name] for name in spec.input_names]
        result = self.modules[stage](*args)
        results = result if isinstance(result, tuple) else (result,)
        return dict(zip(spec.output_names, results))
