"""How each network of a preset gets its seeded random weights: one recipe for two users.

``random_models`` fills real modules with it; the ONNX exporter asks it for one tensor at a time
(:class:`RandomTensors`), so a full-size random export never holds a network's weights in memory and
still writes exactly the weights ``random_models`` would build.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .init import output_scale, parameter_owners, random_null_embedding, random_parameter

NETWORKS = ("unet_t2v", "unet_interpolation", "image_movq", "video_movq", "text_encoder")


@dataclass(frozen=True)
class RandomPart:
    """Parameters under ``prefix`` (a submodule path; "" for the whole network) share one seed."""

    prefix: str
    seed_offset: int
    scale_output: tuple[tuple[str, float], ...] = ()


_UNET_SCALE = (("out_layer.2", 0.1),)
_MOVQ_SCALE = (("decoder.conv_out", 0.5),)
_PLAN: dict[str, tuple[RandomPart, ...]] = {
    "unet_t2v": (RandomPart("", 1, _UNET_SCALE),),
    "unet_interpolation": (RandomPart("", 2, _UNET_SCALE),),
    "image_movq": (RandomPart("", 3, _MOVQ_SCALE),),
    "video_movq": (RandomPart("", 4, _MOVQ_SCALE),),
    "text_encoder": (RandomPart("t5", 5), RandomPart("projection_base", 6),
                     RandomPart("projection_interpolation", 106)),
}
_NULL_SEED_OFFSETS = {"t2v": 51, "interpolation": 52}


def _submodule(module: nn.Module, prefix: str) -> nn.Module:
    return module.get_submodule(prefix) if prefix else module


@torch.no_grad()
def randomize_network_(network: str, module: nn.Module, seed: int) -> nn.Module:
    """Fill ``module`` (the network called ``network``) with its seeded random weights."""
    for part in _PLAN[network]:
        sub = _submodule(module, part.prefix)
        params = dict(sub.named_parameters())
        scales = dict(part.scale_output)
        for name, (owner, local) in parameter_owners(sub).items():
            param = params[name]
            value = random_parameter(owner, local, param.shape, seed + part.seed_offset, name,
                                     output_scale(name, scales))
            param.copy_(value.to(param.dtype))
    return module


class RandomTensors:
    """Random weights of one network by full parameter name, computed on demand.

    ``module`` only provides structure (it may live on the meta device).
    """

    def __init__(self, network: str, module: nn.Module, seed: int) -> None:
        self._index: dict[str, tuple[nn.Module, str, str, int, dict[str, float], torch.Size]] = {}
        params = dict(module.named_parameters(remove_duplicate=False))
        for part in _PLAN[network]:
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
