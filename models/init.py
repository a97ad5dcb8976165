"""Seeded random weights for any network, for the tiny default, tests and full-size benchmarks.

Follows the scheme of the golden reference data (its README, "Weights") so random networks behave like
the reference ones: every branch active (the official code zero-initialises several output layers,
which would switch whole branches off) and outputs in range (no saturated frames):
- Linear / Conv weights N(0, 1/fan_in), biases N(0, 0.05^2); transposed convs use
  fan_in = in_channels * kernel volume / stride volume;
- Embeddings N(0, 0.5^2); norm weights 1 + N(0, 0.1^2), norm biases N(0, 0.05^2);
- scalar merge parameters U(0.2, 0.6), so that every temporal branch mixes in;
- then ``scale_output`` (U-Net ``out_layer.2`` x 0.1, MoVQ ``decoder.conv_out`` x 0.5).
"""

from __future__ import annotations

import math

import torch
from torch import nn

_NORMS = (nn.GroupNorm, nn.LayerNorm)


def _is_norm(module: nn.Module) -> bool:
    if isinstance(module, _NORMS):
        return True
    # transformers' T5LayerNorm (RMS norm) has a single `weight` and no bias.
    return type(module).__name__.endswith("LayerNorm") or type(module).__name__.endswith("RMSNorm")


def _fan_in(module: nn.Module, weight: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return weight.shape[1]
    if isinstance(module, nn.modules.conv._ConvNd):
        kernel = math.prod(module.kernel_size)
        if module.transposed:
            return module.in_channels * kernel // math.prod(module.stride)
        return module.in_channels * kernel // module.groups
    return weight.shape[-1] if weight.ndim > 1 else weight.numel()


@torch.no_grad()
def randomize_(module: nn.Module, seed: int, scale_output: dict[str, float] | None = None) -> nn.Module:
    """Overwrite every parameter of ``module`` in place, deterministically from ``seed``.

    Parameters are visited in ``named_modules()`` order with one CPU generator, so the same module
    and seed give the same weights on any device and dtype.
    """
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()

    def draw(param: torch.Tensor, fill) -> None:
        if id(param) in seen:  # tied weights (T5 shared/embed_tokens) are drawn once
            return
        seen.add(id(param))
        value = fill(torch.empty(param.shape, dtype=torch.float32))
        param.copy_(value.to(param.dtype))

    for _, mod in module.named_modules():
        for pname, param in mod.named_parameters(recurse=False):
            if isinstance(mod, nn.Embedding):
                draw(param, lambda t: t.normal_(0.0, 0.5, generator=gen))
            elif _is_norm(mod):
                if pname == "weight":
                    draw(param, lambda t: t.normal_(0.0, 0.1, generator=gen).add_(1.0))
                else:
                    draw(param, lambda t: t.normal_(0.0, 0.05, generator=gen))
            elif param.numel() == 1 and param.ndim <= 1:  # scalar merge parameters
                draw(param, lambda t: t.uniform_(0.2, 0.6, generator=gen))
            elif pname == "bias":
                draw(param, lambda t: t.normal_(0.0, 0.05, generator=gen))
            elif param.ndim >= 2:
                std = 1.0 / math.sqrt(_fan_in(mod, param))
                draw(param, lambda t, s=std: t.normal_(0.0, s, generator=gen))
            else:
                draw(param, lambda t: t.normal_(0.0, 0.05, generator=gen))

    for name, factor in (scale_output or {}).items():
        target = module.get_submodule(name)
        for param in target.parameters(recurse=False):
            param.mul_(factor)
    return module


def random_null_embedding(context_dim: int, seed: int) -> torch.Tensor:
    """The ``null_embedding`` stored beside each U-Net state dict: N(0, 1) of shape [context_dim]."""
    return torch.randn(context_dim, generator=torch.Generator().manual_seed(seed))
