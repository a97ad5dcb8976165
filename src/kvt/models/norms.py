"""Normalisation computed in float32 whatever the weights' dtype.

The official release runs the U-Nets under CUDA autocast, which computes GroupNorm in float32, and the
MoVQs in float32 outright. Low-precision statistics over large groups drift, so every GroupNorm of this
package casts in and normalises in float32; in the U-Nets the float32 result also carries the pointwise
ops that follow it up to the next conv / linear (modulation, SiLU), as under the official autocast.

On CUDA, PyTorch's GroupNorm kernel already accumulates mean and variance in float32 for half and
bfloat16 inputs and normalises in float32 registers before rounding, so the explicit round trip only adds
two full passes over the activations. :func:`native_group_norm` switches it off for CUDA half/bfloat16
inputs in ``forward`` (the fast path's choice, checked against the float32 path by a GPU test); the U-Nets'
float32 islands (``fp32``) and everything else (CPU, export, float32 inputs) keep float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_native = False  # see native_group_norm(); a plain global so torch.compile can guard on it


@contextmanager
def native_group_norm(enabled: bool = True) -> Iterator[None]:
    """Inside the block, FP32GroupNorm runs CUDA half/bfloat16 inputs through ``F.group_norm`` directly
    (float32 accumulation inside the kernel) instead of the explicit float32 round trip."""
    global _native
    previous, _native = _native, enabled
    try:
        yield
    finally:
        _native = previous


class FP32GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and keys) evaluated in float32, output in the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        if _native and x.is_cuda and x.dtype in _LOW_PRECISION:
            weight = None if self.weight is None else self.weight.to(x.dtype)
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        return self.fp32(x).to(x.dtype)

    def fp32(self, x: Tensor) -> Tensor:
        """The norm's float32 output, as autocast leaves it for the ops that follow (the official U-Nets
        modulate it and apply SiLU in float32 by type promotion; only the next conv / linear casts)."""
        weight = None if self.weight is None else self.weight.to(torch.float32)
        bias = None if self.bias is None else self.bias.to(torch.float32)
        return F.group_norm(x.to(torch.float32), self.num_groups, weight, bias, self.eps)
