"""Network configurations in the layout of the official ``configs.json``.

Each dataclass mirrors the constructor keywords of the official class (same names, same defaults), so a
real ``configs.json`` maps onto it field for field. The U-Net constructors of the official code reject
unknown keywords, so do we; the official MoVQ constructor swallows unknown keywords (``**ignore_kwargs``),
so we keep them in ``extra`` and ignore them the same way. Values the official code accepts but this
project does not implement fail with :class:`UnsupportedConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvt.contract.errors import UserError


class ConfigError(UserError):
    """A configuration value is malformed (wrong key, type or size)."""


class UnsupportedConfigError(ConfigError):
    """A configuration the official code accepts but this project does not implement."""


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _from_mapping(cls: type, data: Mapping[str, Any], where: str, allow_extra: bool) -> Any:
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    unknown = sorted(set(data) - names)
    if unknown and not allow_extra:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(names)}"
        )
    kwargs = {k: _as_tuple(v) for k, v in data.items() if k in names}
    if allow_extra:
        kwargs["extra"] = {k: data[k] for k in unknown}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required key is missing
        raise ConfigError(f"{where}: {exc}") from None


def _to_mapping(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name == "extra":
            out.update(value)
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _require(condition: bool, where: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{where}: {message}")


@dataclass(frozen=True)
class UNetSkeletonConfig:
    """Keywords shared by both official U-Nets (Kandinsky 3 skeleton)."""

    model_channels: int
    init_channels: int | None = None
    num_channels: int = 3
    out_channels: int | None = None
    time_embed_dim: int | None = None
    context_dim: int | None = None
    groups: int = 32
    head_dim: int = 64
    expansion_ratio: int = 4
    compression_ratio: int = 2
    dim_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_blocks: tuple[int, ...] = (3, 3, 3, 3)
    add_cross_attention: tuple[bool, ...] = (False, True, True, True)
    add_self_attention: tuple[bool, ...] = (False, True, True, True)

    @property
    def resolved_init_channels(self) -> int:
        return self.init_channels or self.model_channels

    @property
    def resolved_out_channels(self) -> int:
        return self.out_channels or self.num_channels

    @property
    def required_time_embed_dim(self) -> int:
        """``time_embed_dim``, which :meth:`validate` requires (the U-Nets validate before they build)."""
        if self.time_embed_dim is None:
            raise ConfigError("time_embed_dim must be a positive integer")
        return self.time_embed_dim

    @property
    def required_context_dim(self) -> int:
        """``context_dim``, which :meth:`validate` requires (the U-Nets validate before they build)."""
        if self.context_dim is None:
            raise ConfigError("context_dim must be a positive integer")
        return self.context_dim

    @property
    def hidden_dims(self) -> tuple[int, ...]:
        """[init_channels, model_channels * m for m in dim_mult]: the channel plan of the levels."""
        return (self.resolved_init_channels,) + tuple(self.model_channels * m for m in self.dim_mult)

    def validate(self, where: str) -> None:
        levels = len(self.dim_mult)
        for name in ("num_blocks", "add_cross_attention", "add_self_attention"):
            _require(len(getattr(self, name)) == levels, where,
                     f"{name} has {len(getattr(self, name))} entries, dim_mult has {levels}")
        _require(self.time_embed_dim is not None and self.time_embed_dim > 0, where,
                 "time_embed_dim must be a positive integer")
        _require(self.context_dim is not None and self.context_dim > 0, where,
                 "context_dim must be a positive integer")
        _require(all(n >= 2 for n in self.num_blocks), where,
                 f"num_blocks must all be >= 2 (got {list(self.num_blocks)}); with 1 the official "
                 "up path produces the wrong width")
        assert self.time_embed_dim is not None  # the _require above raised otherwise
        _require(self.time_embed_dim % self.head_dim == 0, where,
                 f"time_embed_dim {self.time_embed_dim} must be divisible by head_dim {self.head_dim}")


@dataclass(frozen=True)
class UNetT2VConfig(UNetSkeletonConfig):
    """Official ``kandinsky_video.model.unet.UNet`` keywords (text-to-video U-Net, ``t2v.pt``)."""

    noise_augmentation: bool = False
    motion_score: bool = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "t2v") -> UNetT2VConfig:
        cfg = _from_mapping(cls, data, where, allow_extra=False)
        cfg.validate(where)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return _to_mapping(self)


@dataclass(frozen=True)
class UNetInterpolationConfig(UNetSkeletonConfig):
    """Official ``kandinsky_video.model.unet_interpolation.UNet`` keywords (``interpolation.pt``)."""

    out_channels: int | None = 3
    time_downsample: tuple[bool, ...] = (False, False, False, False)
    temporal: bool = True
    use_perturbation_time_embed: bool = True
    merge_perturbation_time_with_diffusion_time: bool = True
    merge_perturbation_time_with_context: bool = False
    pass_skip_frames: bool = True
    temporal_type: str = "conv3D"
    add_new_temporal_params: bool = False
    add_temporal_attention: bool = True

    # Values of the released model; anything else is a different architecture we do not implement.
    _REQUIRED = {
        "temporal": True,
        "use_perturbation_time_embed": True,
        "merge_perturbation_time_with_diffusion_time": True,
        "merge_perturbation_time_with_context": False,
        "pass_skip_frames": True,
        "add_temporal_attention": True,
    }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "interpolation") -> UNetInterpolationConfig:
        cfg = _from_mapping(cls, data, where, allow_extra=False)
        cfg.validate(where)
        return cfg

    def validate(self, where: str) -> None:
        super().validate(where)
        for name, value in self._REQUIRED.items():
            if getattr(self, name) != value:
                raise UnsupportedConfigError(
                    f"{where}: {name}={getattr(self, name)!r} is not supported; the released "
                    f"interpolation U-Net uses {name}={value!r}"
                )
        if any(self.time_downsample):
            raise UnsupportedConfigError(
                f"{where}: time_downsample={list(self.time_downsample)} is not supported; allowed: all False"
            )

    def to_dict(self) -> dict[str, Any]:
        return _to_mapping(self)


@dataclass(frozen=True)
class MoVQConfig:
    """Official ``MoVQ(generator_params)`` keywords (``movq.pt`` and ``video_movq.pt``).

    Unknown keys are kept in ``extra`` and ignored, exactly as the official constructors do.
    """

    ch: int
    out_ch: int
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    in_channels: int
    resolution: int
    z_channels: int
    ch_mult: tuple[int, ...] = (1, 2, 4, 8)
    dropout: float = 0.0
    resamp_with_conv: bool = True
    double_z: bool = True
    give_pre_end: bool = False
    add_conv: bool = False
    temporal: bool = False
    temporal_mid_blocks: bool = True
    temporal_kernel_size: tuple[int, ...] = (3, 3, 3)
    temporal_conv_padding: tuple[int, ...] = (1, 1, 1)
    flicker_augmentation: bool = False
    build_3D_decoder: bool = False
    temporal_attention_block: bool = False
    temporal_blocks: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "movq") -> MoVQConfig:
        cfg = _from_mapping(cls, data, where, allow_extra=True)
        cfg.validate(where)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return _to_mapping(self)

    @property
    def num_resolutions(self) -> int:
        return len(self.ch_mult)

    def validate(self, where: str) -> None:
        if self.double_z:
            raise UnsupportedConfigError(
                f"{where}: double_z=True is not supported; Kandinsky Video's MoVQs use double_z=False"
            )
        if self.build_3D_decoder:
            raise UnsupportedConfigError(
                f"{where}: build_3D_decoder=True is not supported (the official decoder cannot run "
                "with it either); allowed: False"
            )
        if self.temporal_blocks:
            raise UnsupportedConfigError(
                f"{where}: temporal_blocks=True is not supported; the released video MoVQ uses False"
            )
        if self.give_pre_end:
            raise UnsupportedConfigError(f"{where}: give_pre_end=True is not supported; allowed: False")
        if not self.resamp_with_conv:
            raise UnsupportedConfigError(f"{where}: resamp_with_conv=False is not supported; allowed: True")
        if self.temporal:
            _require(tuple(self.temporal_kernel_size) == (3, 3, 3)
                     and tuple(self.temporal_conv_padding) == (1, 1, 1), where,
                     f"temporal_kernel_size {list(self.temporal_kernel_size)} / temporal_conv_padding "
                     f"{list(self.temporal_conv_padding)} are not supported; allowed: [3,3,3] / [1,1,1]")
        _require(self.ch % 32 == 0, where, f"ch={self.ch} must be a multiple of 32 (GroupNorm(32))")


@dataclass(frozen=True)
class TextEncoderConfig:
    """The ``text_encoder`` entry of ``configs.json``: loader keywords of the official ``get_T5encoder``."""

    weights_path: str
    tokens_length: int = 128
    context_dim: int = 4096
    low_cpu_mem_usage: bool = True
    load_in_8bit: bool = False
    load_in_4bit: bool = False

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "text_encoder") -> TextEncoderConfig:
        cfg = _from_mapping(cls, data, where, allow_extra=False)
        if cfg.load_in_8bit or cfg.load_in_4bit:
            raise UnsupportedConfigError(
                f"{where}: load_in_8bit/load_in_4bit are not supported; the encoder runs in fp32 or bf16"
            )
        _require(2 <= cfg.tokens_length <= 512, where,
                 f"tokens_length={cfg.tokens_length} must be in [2, 512]")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return _to_mapping(self)


@dataclass(frozen=True)
class KandinskyVideoConfig:
    """The whole ``configs.json``: one entry per network."""

    t2v: UNetT2VConfig
    interpolation: UNetInterpolationConfig
    text_encoder: TextEncoderConfig
    image_movq: MoVQConfig
    video_movq: MoVQConfig

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "configs.json") -> KandinskyVideoConfig:
        required = tuple(f.name for f in dataclasses.fields(cls))
        missing = [k for k in required if k not in data]
        if missing:
            raise ConfigError(f"{where}: missing entries {missing}; expected {list(required)}")

        def unet_kwargs(key: str) -> Mapping[str, Any]:
            entry = data[key]
            if not isinstance(entry, Mapping) or "configs" not in entry:
                raise ConfigError(f"{where}: entry {key!r} must be an object with a 'configs' object")
            return entry["configs"]

        return cls(
            t2v=UNetT2VConfig.from_dict(unet_kwargs("t2v"), f"{where}:t2v.configs"),
            interpolation=UNetInterpolationConfig.from_dict(
                unet_kwargs("interpolation"), f"{where}:interpolation.configs"),
            text_encoder=TextEncoderConfig.from_dict(data["text_encoder"], f"{where}:text_encoder"),
            image_movq=MoVQConfig.from_dict(unet_kwargs("image_movq"), f"{where}:image_movq.configs"),
            video_movq=MoVQConfig.from_dict(unet_kwargs("video_movq"), f"{where}:video_movq.configs"),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> KandinskyVideoConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        return {
            "t2v": {"configs": self.t2v.to_dict()},
            "interpolation": {"configs": self.interpolation.to_dict()},
            "text_encoder": self.text_encoder.to_dict(),
            "image_movq": {"configs": self.image_movq.to_dict()},
            "video_movq": {"configs": self.video_movq.to_dict()},
        }

    def replace(self, **changes: Any) -> KandinskyVideoConfig:
        return dataclasses.replace(self, **changes)
