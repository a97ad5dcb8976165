"""The networks of Kandinsky Video 1.1, one row each: what builds it, where the official layout keeps
it, how its file nests tensors, which precision family it belongs to and how its random weights are
seeded. Every list of network names in kvt is derived from :data:`NETWORKS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kvt.models.configs import KandinskyVideoConfig
from kvt.models.movq import MoVQ
from kvt.models.text_encoder import TextEncoder
from kvt.models.unet_interpolation import UNetInterpolation
from kvt.models.unet_t2v import UNetT2V

# The official layout's files (``ai-forever/KandinskyVideo_1_1``), plus the Flan-UL2 folder it points at.
CONFIGS_FILE = "configs.json"
T2V_FILE = "t2v.pt"
INTERPOLATION_FILE = "interpolation.pt"
IMAGE_MOVQ_FILE = "movq.pt"
VIDEO_MOVQ_FILE = "video_movq.pt"
PROJECTIONS_FILE = "t5_projections.pt"


@dataclass(frozen=True)
class RandomPart:
    """Parameters under ``prefix`` (a submodule path; "" for the whole network) share one seed offset;
    ``scale_output`` scales named output layers (the reference data's recipe)."""

    prefix: str
    seed_offset: int
    scale_output: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class NetworkSpec:
    """One network: the row every loader, writer, exporter and random initialiser reads."""

    name: str  # key of KandinskyVideoModels.networks() and of the stage table's `network` field
    config_field: str  # entry of configs.json / field of KandinskyVideoConfig
    file: str  # file of the official layout
    layout: str  # how the file nests tensors: "unet" ({"unet", "null_embedding"}), "flat", "heads"
    family: str  # precision family: "unet", "movq" or "text_encoder" (see model_set.Precision)
    random_parts: tuple[RandomPart, ...]
    _build: Callable[[KandinskyVideoConfig, Any], nn.Module]

    def build(self, config: KandinskyVideoConfig, t5_config: Any = None,
              device: torch.device | str = "meta") -> nn.Module:
        """The architecture (weights uninitialised; on the meta device by default)."""
        with torch.device(device):
            return self._build(config, t5_config)


def _text_encoder(config: KandinskyVideoConfig, t5_config: Any) -> nn.Module:
    from transformers import T5EncoderModel  # heavy: imported when a text encoder is built

    if t5_config is None:
        raise ValueError("building the text encoder needs its T5 config")
    return TextEncoder(T5EncoderModel(t5_config), config.text_encoder.context_dim)


_UNET_SCALE = (("out_layer.2", 0.1),)
_MOVQ_SCALE = (("decoder.conv_out", 0.5),)

NETWORKS: tuple[NetworkSpec, ...] = (
    NetworkSpec("unet_t2v", "t2v", T2V_FILE, "unet", "unet", (RandomPart("", 1, _UNET_SCALE),),
                lambda config, _: UNetT2V(config.t2v)),
    NetworkSpec("unet_interpolation", "interpolation", INTERPOLATION_FILE, "unet", "unet",
                (RandomPart("", 2, _UNET_SCALE),), lambda config, _: UNetInterpolation(config.interpolation)),
    NetworkSpec("image_movq", "image_movq", IMAGE_MOVQ_FILE, "flat", "movq", (RandomPart("", 3, _MOVQ_SCALE),),
                lambda config, _: MoVQ(config.image_movq)),
    NetworkSpec("video_movq", "video_movq", VIDEO_MOVQ_FILE, "flat", "movq", (RandomPart("", 4, _MOVQ_SCALE),),
                lambda config, _: MoVQ(config.video_movq)),
    NetworkSpec("text_encoder", "text_encoder", PROJECTIONS_FILE, "heads", "text_encoder",
                (RandomPart("t5", 5), RandomPart("projection_base", 6),
                 RandomPart("projection_interpolation", 106)), _text_encoder),
)
NETWORK_NAMES: tuple[str, ...] = tuple(n.name for n in NETWORKS)
# Networks stored whole in one file of the official layout (the text encoder also needs its T5 folder).
NETWORK_FILES: tuple[NetworkSpec, ...] = tuple(n for n in NETWORKS if n.layout in ("unet", "flat"))
REQUIRED_FILES: tuple[str, ...] = (CONFIGS_FILE,) + tuple(n.file for n in NETWORKS)
# How each weight file nests its tensors (kvt.models.weight_files flattens them for safetensors).
FILE_LAYOUTS: dict[str, str] = {n.file: n.layout for n in NETWORKS}


def network_spec(name: str) -> NetworkSpec:
    for spec in NETWORKS:
        if spec.name == name:
            return spec
    raise ValueError(f"unknown network {name!r}; networks: {list(NETWORK_NAMES)}")


def networks_of_family(family: str) -> tuple[str, ...]:
    return tuple(n.name for n in NETWORKS if n.family == family)


def build_network(network: str, config: KandinskyVideoConfig, t5_config: Any = None,
                  device: torch.device | str = "meta") -> nn.Module:
    """The architecture of ``network`` (weights uninitialised; on the meta device by default)."""
    return network_spec(network).build(config, t5_config, device)
