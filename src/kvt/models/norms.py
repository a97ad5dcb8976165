"""Normalisation computed in float32 whatever the weights' dtype.

The official release runs the U-Nets under CUDA autocast, which computes GroupNorm in float32, and the
MoVQs in float32 outright. Low-precision statistics over large groups drift, so every GroupNorm of this
package casts in, normalises in float32 and casts back: the one hidden upcast the modules allow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FP32GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and keys) evaluated in float32, output in the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.to(torch.float32)
        bias = None if self.bias is None else self.bias.to(torch.float32)
        return F.group_norm(x.to(torch.float32), self.num_groups, weight, bias, self.eps).to(x.dtype)
