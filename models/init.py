"""Seeded random weights for any network, for the tiny default, tests and full-size benchmarks.

Follows the scheme of the golden reference data (its README, "Weights") so random networks behave like
the reference ones: every branch active (the official code zero-initialises several output layers,
which would switch whole branches off) and outputs in range (no saturated frames):
- Linear / Conv weights N(0, 1/fan_in), biases N(0, 0.05^2); transposed convs use
  fan_in = in_channels * kernel volume / stride volume;
- Embeddings N(0, 0.5^2); norm weights 1 + N(0, 0.1^2), norm biases N(0, 0.05^2);
- scalar merge parameters U(0.2, 0.6), so that every temporal branch mixes in;
- then ``scale_output`` (U-Net ``out_layer.2`` x 0.1, MoVQ ``decoder.conv_out`` x 0.5).

Every parameter draws from its own generator, seeded from (seed, parameter name): a parameter's value
does not depend on the order parameters are visited, so an exporter can produce any one tensor on
demand (:func:`random_parameter`) without building the network's weights.
"""

from __future__ import annotations

import math
import zlib

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


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def random_parameter(owner: nn.Module, local_name: str, shape: torch.Size, seed: int, name: str,
                     scale: float = 1.0) -> torch.Tensor:
    """The float32 value of parameter ``name`` (``local_name`` on ``owner``) under ``seed``.

    ``owner`` may live on the meta device: only its type and hyper-parameters are read.
    """
    gen = _generator(seed, name)
    out = torch.empty(shape, dtype=torch.float32)
    if isinstance(owner, nn.Embedding):
        out.normal_(0.0, 0.5, generator=gen)
    elif _is_norm(owner):
        if local_name == "weight":
            out.normal_(0.0, 0.1, generator=gen).add_(1.0)
        else:
            out.normal_(0.0, 0.05, generator=gen)
    elif out.numel() == 1 and out.ndim <= 1:  # scalar merge parameters
        out.uniform_(0.2, 0.6, generator=gen)
    elif local_name == "bias" or out.ndim < 2:
        out.normal_(0.0, 0.05, generator=gen)
    else:
        out.normal_(0.0, 1.0 / math.sqrt(_fan_in(owner, out)), generator=gen)
    return out.mul_(scale) if scale != 1.0 else out


def parameter_owners(module: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Full parameter name -> (owning module, local name); tied parameters under their first name."""
    owners: dict[str, tuple[nn.Module, str]] = {}
    seen: set[int] = set()
    for prefix, mod in module.named_modules():
        for local, param in mod.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            owners[f"{prefix}.{local}" if prefix else local] = (mod, local)
    return owners


def output_scale(name: str, scale_output: dict[str, float] | None) -> float:
    """The extra factor ``scale_output`` applies to parameter ``name`` (1.0 for most)."""
    for prefix, factor in (scale_output or {}).items():
        if name.startswith(prefix + "."):
            return factor
    return 1.0


def random_null_embedding(context_dim: int, seed: int) -> torch.Tensor:
    """The ``null_embedding`` stored beside each U-Net state dict: N(0, 1) of shape [context_dim]."""
    return torch.randn(context_dim, generator=torch.Generator().manual_seed(seed))
