"""Stage modules: each stage of the table as an ``nn.Module`` whose forward takes the stage's inputs
positionally (table order) and returns its outputs (table order).

This is the one binding between stage names and network calls. The torch backend runs these modules;
ONNX export traces them, so an exported graph has exactly the table's inputs and outputs. I/O follows
the contract (FP32 floats); each module casts floating inputs to its network's weight dtype and its
outputs back to FP32.
"""

from __future__ import annotations

import torch
from torch import nn

from kvt.contract.stages import (
    NULL_CONTEXT,
    NUM_BASE_FRAMES,
    ModelDims,
    ResolutionRange,
    StageTable,
    build_stage_table,
    stage_roles,
)
from kvt.models.configs import KandinskyVideoConfig
from kvt.models.model_set import KandinskyVideoModels
from kvt.models.movq import MoVQ
from kvt.models.presets import preset_for_config
from kvt.models.text_encoder import TextEncoder
from kvt.models.unet_interpolation import UNetInterpolation
from kvt.models.unet_layers import ContextRows, TextContext
from kvt.models.unet_t2v import UNetT2V


def _weight_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class _StageModule(nn.Module):
    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    @property
    def dtype(self) -> torch.dtype:
        return _weight_dtype(self.network)

    def _in(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    @staticmethod
    def _out(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(torch.float32)


class TextEncoderStage(_StageModule):
    network: TextEncoder  # the network the stage table names for this stage (STAGE_MODULES below)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._out(self.network(input_ids, attention_mask))


class UNetStage(_StageModule):
    """A U-Net stage: the contract's distinct contexts [prompt, null] reach the network once per call.

    ``cuts=True`` (default) hands the network the contexts with the stage's row mapping (``text_rows``)
    and, for the interpolation U-Net, the conditional half as the only rows of the temporal layers: text
    work once per context, the null rows' cross-attention as the constant it is, no temporal layers
    where the mask throws them away. ``cuts=False`` runs today's official per-row form instead (each
    context copied to its rows, every layer on every row): the same numbers up to float reassociation,
    kept as the reference the cuts are checked and counted against, and for the official-style baseline.
    """

    stage = ""  # the stage of the table this module runs (set by each subclass)

    def __init__(self, network: nn.Module, cuts: bool = True) -> None:
        super().__init__(network)
        self.cuts = cuts
        spec = stage_roles(self.stage)
        self.rows = ContextRows(spec.row_contexts, constant=(NULL_CONTEXT,))

    def text_context(self, context: torch.Tensor, context_mask: torch.Tensor,
                     context_len: torch.Tensor, rows: int) -> TextContext:
        """The network's text conditioning for a call of ``rows`` rows, as the forward builds it."""
        context = self._in(context)
        if self.cuts:
            return TextContext.of(context, context_mask, context_len, self.rows)
        return TextContext.of(self.rows.per_row(context, rows), self.rows.per_row(context_mask, rows),
                              self.rows.per_row(context_len, rows))



class UNetT2VImageStage(UNetStage):
    network: UNetT2V
    stage = "unet_t2v_image"

    def forward(self, sample, timestep, context, context_mask, context_len) -> torch.Tensor:
        text = self.text_context(context, context_mask, context_len, sample.shape[0])
        eps = self.network.forward_image(self._in(sample), timestep, text.context, text.mask, text.length,
                                         text.rows)
        return self._out(eps)


class UNetT2VVideoStage(UNetStage):
    network: UNetT2V
    stage = "unet_t2v_video"

    def forward(self, sample, timestep, context, context_mask, context_len, frame_index, noise_aug,
                motion_score) -> torch.Tensor:
        text = self.text_context(context, context_mask, context_len, sample.shape[0])
        eps = self.network.forward_video(self._in(sample), timestep, text.context, text.mask, frame_index,
                                         noise_aug, motion_score, NUM_BASE_FRAMES, text.length, text.rows)
        return self._out(eps)


class UNetInterpolationStage(UNetStage):
    network: UNetInterpolation
    stage = "unet_interp"

    def forward(self, sample, timestep, context, context_mask, context_len, skip_frames,
                perturbation_time, temporal_mask) -> torch.Tensor:
        text = self.text_context(context, context_mask, context_len, sample.shape[0])
        # Rows [G conditional | G unconditional] as two sequences of G groups; the temporal mask is 0 on
        # the second (the stage contract), so with the cuts only the first runs temporal layers.
        v = self.network(self._in(sample), timestep, text.context, text.mask, skip_frames, perturbation_time,
                         self._in(temporal_mask), num_groups=None, context_len=text.length,
                         context_rows=text.rows, temporal_clips=1 if self.cuts else None)
        return self._out(v)


class MoVQEncoderStage(_StageModule):
    network: MoVQ

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self._out(self.network.encode(self._in(image)))


class MoVQDecoderStage(_StageModule):
    network: MoVQ

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self._out(self.network.decode(self._in(latent)))


# stage -> module class; the stage table's `network` field says which network each one wraps.
STAGE_MODULES: dict[str, type[_StageModule]] = {
    "text_encoder": TextEncoderStage,
    "unet_t2v_image": UNetT2VImageStage,
    "unet_t2v_video": UNetT2VVideoStage,
    "unet_interp": UNetInterpolationStage,
    "movq_encoder": MoVQEncoderStage,
    "movq_decoder": MoVQDecoderStage,
    "video_movq_decoder": MoVQDecoderStage,
}


def stage_module(stage: str, network: nn.Module, cuts: bool = True) -> nn.Module:
    """The stage module of ``stage`` around ``network`` (shared, not copied). ``cuts``: U-Net stages
    skip the work their outputs do not depend on (see :class:`UNetStage`); False: the official form."""
    try:
        cls = STAGE_MODULES[stage]
    except KeyError:
        raise KeyError(f"no stage module for stage {stage!r}; known: {sorted(STAGE_MODULES)}") from None
    module = cls(network, cuts) if issubclass(cls, UNetStage) else cls(network)
    return module.eval()


def build_stage_modules(models: KandinskyVideoModels, table: StageTable, cuts: bool = True) -> dict[str, nn.Module]:
    """One module per stage of ``table``, sharing the networks of ``models`` (no copies)."""
    networks = models.networks()
    return {spec.name: stage_module(spec.name, networks[spec.network], cuts) for spec in table}


def stage_table_for(config: KandinskyVideoConfig, resolution: ResolutionRange | None = None) -> StageTable:
    """The stage table of a model config; frame sizes default to its preset's range (if it is one)."""
    if resolution is None:
        preset = preset_for_config(config)
        resolution = ResolutionRange(*preset.resolution) if preset else ResolutionRange()
    return build_stage_table(ModelDims.from_config(config), resolution)
