"""Seeded random weights for any network, for the tiny default, tests and full-size benchmarks.

One recipe for two users: :func:`random_models` fills real modules with it; the ONNX exporter asks it
for one tensor at a time (:class:`RandomTensors`), so a full-size random export never holds a network's
weights in memory and still writes exactly the weights ``random_models`` would build. Each network's
seed offsets come from its row in :mod:`kvt.models.registry`.

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
from pathlib import Path
from typing import cast

import torch
from torch import nn

from kvt.models.model_set import KandinskyVideoModels, Precision, finish_network
from kvt.models.presets import Preset
from kvt.models.registry import build_network, network_spec
from kvt.models.text_encoder import TINY_TOKENIZER_DIR, PromptTokenizer, TextEncoder

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


def _generator(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def random_parameter(owner: nn.Module, local_name: str, shape: torch.Size, seed: int, name: str,
                     scale: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """The float32 value of parameter ``name`` (``local_name`` on ``owner``) under ``seed``.

    ``owner`` may live on the meta device: only its type and hyper-parameters are read. Drawn on
    ``device`` with that device's generator: the same recipe, but a GPU draws other (still seeded)
    values than the CPU; exports and tests use the CPU values.
    """
    gen = _generator(seed, name, device)
    out = torch.empty(shape, dtype=torch.float32, device=device)
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


_NULL_SEED_OFFSETS = {"t2v": 51, "interpolation": 52}


def _submodule(module: nn.Module, prefix: str) -> nn.Module:
    return module.get_submodule(prefix) if prefix else module


@torch.no_grad()
def randomize_network_(network: str, module: nn.Module, seed: int) -> nn.Module:
    """Fill ``module`` (the network called ``network``) with its seeded random weights."""
    for part in network_spec(network).random_parts:
        sub = _submodule(module, part.prefix)
        params = dict(sub.named_parameters())
        scales = dict(part.scale_output)
        for name, (owner, local) in parameter_owners(sub).items():
            param = params[name]
            value = random_parameter(owner, local, param.shape, seed + part.seed_offset, name,
                                     output_scale(name, scales), device=param.device)
            param.copy_(value.to(param.dtype))
    return module


class RandomTensors:
    """Random weights of one network by full parameter name, computed on demand.

    ``module`` only provides structure (it may live on the meta device).
    """

    def __init__(self, network: str, module: nn.Module, seed: int) -> None:
        self._index: dict[str, tuple[nn.Module, str, str, int, dict[str, float], torch.Size]] = {}
        params = dict(module.named_parameters(remove_duplicate=False))
        for part in network_spec(network).random_parts:
            sub = _submodule(module, part.prefix)
            prefix = f"{part.prefix}." if part.prefix else ""
            for name, (owner, local) in parameter_owners(sub).items():
                self._index[prefix + name] = (owner, local, name, seed + part.seed_offset,
                                              dict(part.scale_output), params[prefix + name].shape)
        # Tied parameters are reachable under every name; they resolve to their first name's value.
        for full, param in params.items():
            if full not in self._index:
                first = next(n for n, p in module.named_parameters() if p is param)
                self._index[full] = self._index[first]

    def names(self) -> list[str]:
        return list(self._index)

    def __call__(self, name: str) -> torch.Tensor:
        owner, local, relative, seed, scales, shape = self._index[name]
        return random_parameter(owner, local, shape, seed, relative, output_scale(relative, scales))


def random_null_embeddings(context_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(t2v, interpolation) null embeddings of a random model."""
    return (random_null_embedding(context_dim, seed + _NULL_SEED_OFFSETS["t2v"]),
            random_null_embedding(context_dim, seed + _NULL_SEED_OFFSETS["interpolation"]))


def _to_empty_keeping_ties(module: nn.Module, device: torch.device | str) -> nn.Module:
    """``module.to_empty(device)`` with tied parameters (T5's shared embedding) tied again after it."""
    groups: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    module = module.to_empty(device=device)
    for names in groups.values():
        first = module.get_parameter(names[0])
        for name in names[1:]:
            owner, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner) if owner else module, leaf, first)
    return module


def random_models(
    preset: Preset,
    seed: int = 0,
    device: torch.device | str = "cpu",
    precision: Precision = Precision(),
    tokenizer_dir: str | Path | None = None,
    init_on_device: bool = False,
) -> KandinskyVideoModels:
    """Every network of ``preset`` with seeded random weights (no files needed).

    The tokenizer comes from ``tokenizer_dir`` or the tiny SentencePiece model shipped with the
    package (its ids fit any preset's vocabulary; use a real Flan-UL2 folder for real prompts).
    ``init_on_device``: build each network on the meta device, allocate it on ``device`` in its final
    dtype and draw the weights there (seconds instead of minutes at full size on a GPU, no host copy;
    other values than the CPU draw, see :func:`random_parameter`).
    """
    from transformers import T5Config

    config = preset.config
    t5_config = T5Config(**preset.t5)

    def build(network: str) -> nn.Module:
        dtype = precision.of_network(network)
        if init_on_device:
            module = _to_empty_keeping_ties(build_network(network, config, t5_config, device="meta"), device)
            module = module.to(dtype) if dtype is not None else module
        else:
            module = build_network(network, config, t5_config, device="cpu")
        return finish_network(randomize_network_(network, module, seed), device, dtype)

    t2v_null, interpolation_null = random_null_embeddings(config.text_encoder.context_dim, seed)
    return KandinskyVideoModels(
        config=config,
        unet_t2v=build("unet_t2v"),
        unet_interpolation=build("unet_interpolation"),
        image_movq=build("image_movq"),
        video_movq=build("video_movq"),
        text_encoder=cast(TextEncoder, build("text_encoder")),  # what the registry builds for it
        tokenizer=PromptTokenizer(tokenizer_dir or TINY_TOKENIZER_DIR, config.text_encoder.tokens_length),
        t2v_null_embedding=t2v_null,
        interpolation_null_embedding=interpolation_null,
        source=f"preset {preset.name!r}, random weights, seed {seed}"
               + (f", drawn on {torch.device(device).type}" if init_on_device else ""),
    )
