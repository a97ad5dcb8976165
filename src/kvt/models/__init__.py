"""PyTorch modules of every Kandinsky Video 1.1 network, presets and checkpoint I/O."""

from kvt.models.configs import (
    ConfigError,
    KandinskyVideoConfig,
    MoVQConfig,
    TextEncoderConfig,
    UNetInterpolationConfig,
    UNetT2VConfig,
    UnsupportedConfigError,
)
from kvt.models.presets import FULL, PRESETS, TINY, Preset, get_preset

__all__ = [
    "ConfigError", "KandinskyVideoConfig", "MoVQConfig", "TextEncoderConfig",
    "UNetInterpolationConfig", "UNetT2VConfig", "UnsupportedConfigError",
    "FULL", "PRESETS", "TINY", "Preset", "get_preset",
]
