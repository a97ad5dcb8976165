"""Normalisation computed in float32 whatever the weights' dtype.

The official release runs the U-Nets under CUDA autocast, which computes GroupNorm in float32, and the
MoVQs in float32 outright. Low-precision statistics over large groups drift, so every GroupNorm of this
package casts in and normalises in float32; in the U-Nets the float32 result also carries the pointwise
ops that follow it up to the next conv / linear (modulation, SiLU), as under the official autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FP32GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and keys) evaluated in float32, output in the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        return self.fp32(x).to(x.dtype)

    def fp32(self, x: Tensor) -> Tensor:
        """The norm's float32 output, as autocast leaves it for the ops that follow (the official U-Nets
        modulate it and apply SiLU in float32 by type promotion; only the next conv / linear casts)."""
        weight = None if self.weight is None else self.weight.to(torch.float32)
        bias = None if self.bias is None else self.bias.to(torch.float32)
        return F.group_norm(x.to(torch.float32), self.num_groups, weight, bias, self.eps)
