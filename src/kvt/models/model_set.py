"""The loaded model set: every network of the pipeline plus what the loops need beside them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kvt.models.configs import KandinskyVideoConfig
from kvt.models.registry import NETWORK_NAMES, network_spec
from kvt.models.text_encoder import PromptTokenizer, TextEncoder


@dataclass
class KandinskyVideoModels:
    """Every network of the pipeline, loaded and in eval mode, plus what the loops need beside them."""

    config: KandinskyVideoConfig
    unet_t2v: nn.Module
    unet_interpolation: nn.Module
    image_movq: nn.Module
    video_movq: nn.Module
    text_encoder: TextEncoder
    tokenizer: PromptTokenizer
    t2v_null_embedding: torch.Tensor  # [D] fp32, loops A and B
    interpolation_null_embedding: torch.Tensor  # [D] fp32, loop C
    source: str

    @property
    def context_dim(self) -> int:
        return self.config.text_encoder.context_dim

    @property
    def tokens_length(self) -> int:
        return self.config.text_encoder.tokens_length

    def networks(self) -> dict[str, nn.Module]:
        """Network name (:data:`kvt.models.registry.NETWORK_NAMES`) -> module."""
        return {name: getattr(self, name) for name in NETWORK_NAMES}


@dataclass(frozen=True)
class Precision:
    """Weight dtypes per network family (official: U-Nets fp16 on GPU, T5 and MoVQs fp32).

    None keeps the dtype the weights are stored in.
    """

    unet: torch.dtype | None = torch.float32
    text_encoder: torch.dtype | None = torch.float32
    movq: torch.dtype | None = torch.float32

    def of_network(self, network: str) -> torch.dtype | None:
        """The dtype of ``network`` (by its registry family)."""
        dtype: torch.dtype | None = getattr(self, network_spec(network).family)
        return dtype


def finish_network(module: nn.Module, device: torch.device | str, dtype: torch.dtype | None) -> nn.Module:
    """Move a filled network to its device and dtype, in eval mode without gradients."""
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)
