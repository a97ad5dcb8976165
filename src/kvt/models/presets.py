"""Model presets: ``full`` (the released Kandinsky Video 1.1 sizes), ``tiny`` (the reference sizes)
and ``small`` (a mid-size for CPU benchmarks).

``full`` follows docs/spec (unet_t2v.md, unet_interpolation.md, movq.md, text_encoder.md);
``tiny`` is the configuration of the golden reference data, small enough to run end to end on a CPU in
seconds; ``small`` keeps the full layout and 128-token context at 1/12 of the U-Net width. A preset
is a complete description: network configs, the T5 encoder architecture, and the default output size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvt.models.configs import (
    KandinskyVideoConfig,
    MoVQConfig,
    TextEncoderConfig,
    UNetInterpolationConfig,
    UNetT2VConfig,
)

# Folder name of the T5 encoder inside checkpoint directories this project writes.
TEXT_ENCODER_FOLDER = "text_encoder"


@dataclass(frozen=True)
class Preset:
    name: str
    config: KandinskyVideoConfig
    t5: dict[str, Any]  # transformers.T5Config keywords of the encoder
    default_width: int
    default_height: int
    description: str
    # Frame sizes (pixels, multiples of 64) the stage ranges cover: min, opt, max.
    resolution: tuple[int, int, int] = (256, 512, 1024)


def _unet_skeleton(model_channels: int, init_channels: int, time_embed_dim: int, context_dim: int,
                   groups: int, head_dim: int, dim_mult: tuple[int, ...]) -> dict[str, Any]:
    return dict(
        model_channels=model_channels, init_channels=init_channels, time_embed_dim=time_embed_dim,
        context_dim=context_dim, groups=groups, head_dim=head_dim, expansion_ratio=4,
        compression_ratio=2, dim_mult=dim_mult, num_blocks=(3, 3, 3, 3),
        add_cross_attention=(False, True, True, True), add_self_attention=(False, True, True, True),
    )


def _config(skeleton: dict[str, Any], text: TextEncoderConfig, image_movq: MoVQConfig,
            video_movq: MoVQConfig) -> KandinskyVideoConfig:
    return KandinskyVideoConfig(
        t2v=UNetT2VConfig(num_channels=9, out_channels=4, noise_augmentation=True, motion_score=True,
                          **skeleton),
        interpolation=UNetInterpolationConfig(num_channels=20, out_channels=12, **skeleton),
        text_encoder=text,
        image_movq=image_movq,
        video_movq=video_movq,
    )


def _video_movq(image: MoVQConfig, ch_mult: tuple[int, ...]) -> MoVQConfig:
    return MoVQConfig(
        ch=image.ch, out_ch=3, num_res_blocks=image.num_res_blocks, attn_resolutions=(32,),
        in_channels=3, resolution=256, z_channels=4, ch_mult=ch_mult, dropout=0.0, double_z=False,
        temporal=True, temporal_mid_blocks=True, temporal_kernel_size=(3, 3, 3),
        temporal_conv_padding=(1, 1, 1), temporal_attention_block=True, temporal_blocks=False,
        flicker_augmentation=False, build_3D_decoder=False,
    )


def _t5_encoder(**sizes: int) -> dict:
    """T5Config kwargs of a Flan-UL2-style encoder (gated-SiLU, untied, relative positions) of these sizes."""
    return dict(**sizes, feed_forward_proj="gated-silu", relative_attention_num_buckets=32,
                relative_attention_max_distance=128, layer_norm_epsilon=1e-6, dropout_rate=0.0,
                tie_word_embeddings=False, is_encoder_decoder=False, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0)


_FULL_IMAGE_MOVQ = MoVQConfig(
    ch=256, out_ch=3, num_res_blocks=2, attn_resolutions=(32,), in_channels=3, resolution=256,
    z_channels=4, ch_mult=(1, 2, 2, 4), dropout=0.0, double_z=False,
)

FULL = Preset(
    name="full",
    config=_config(
        _unet_skeleton(384, 192, 1536, 4096, 32, 64, (1, 2, 4, 8)),
        TextEncoderConfig(weights_path=TEXT_ENCODER_FOLDER, tokens_length=128, context_dim=4096),
        _FULL_IMAGE_MOVQ,
        _video_movq(_FULL_IMAGE_MOVQ, (1, 2, 2, 4)),
    ),
    t5=_t5_encoder(  # google/flan-ul2 encoder
        vocab_size=32128, d_model=4096, d_kv=256, d_ff=16384, num_layers=32, num_heads=16),
    default_width=512,
    default_height=512,
    description="released Kandinsky Video 1.1 sizes (t2v U-Net 4.15B, interpolation U-Net 3.98B, "
                "Flan-UL2 encoder 8.7B)",
)

_TINY_IMAGE_MOVQ = MoVQConfig(
    ch=32, out_ch=3, num_res_blocks=1, attn_resolutions=(32,), in_channels=3, resolution=256,
    z_channels=4, ch_mult=(1, 1, 2, 1), dropout=0.0, double_z=False,
)

TINY = Preset(
    name="tiny",
    config=_config(
        _unet_skeleton(8, 4, 24, 32, 2, 8, (1, 2, 3, 4)),
        TextEncoderConfig(weights_path=TEXT_ENCODER_FOLDER, tokens_length=16, context_dim=32),
        _TINY_IMAGE_MOVQ,
        _video_movq(_TINY_IMAGE_MOVQ, (1, 1, 1, 1)),
    ),
    t5=_t5_encoder(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    default_width=64,
    default_height=64,
    description="reference-data sizes (under 4 MB per network); runs end to end on a CPU in seconds",
    resolution=(64, 64, 256),
)

_SMALL_IMAGE_MOVQ = MoVQConfig(
    ch=32, out_ch=3, num_res_blocks=1, attn_resolutions=(32,), in_channels=3, resolution=256,
    z_channels=4, ch_mult=(1, 2, 2, 4), dropout=0.0, double_z=False,
)

SMALL = Preset(
    name="small",
    config=_config(
        _unet_skeleton(32, 16, 128, 256, 8, 16, (1, 2, 4, 8)),
        TextEncoderConfig(weights_path=TEXT_ENCODER_FOLDER, tokens_length=128, context_dim=256),
        _SMALL_IMAGE_MOVQ,
        _video_movq(_SMALL_IMAGE_MOVQ, (1, 2, 2, 4)),
    ),
    t5=_t5_encoder(vocab_size=256, d_model=256, d_kv=32, d_ff=1024, num_layers=4, num_heads=8),
    default_width=128,
    default_height=128,
    description="mid-size benchmark preset (full layout and 128-token context, about 1/12 the U-Net "
                "width); CPU benchmark figures between tiny and full",
    resolution=(64, 128, 256),
)

PRESETS: dict[str, Preset] = {p.name: p for p in (FULL, TINY, SMALL)}


def preset_for_config(config: KandinskyVideoConfig) -> Preset | None:
    """The preset whose networks ``config`` describes (the text encoder's folder name aside)."""
    import dataclasses

    for preset in PRESETS.values():
        if dataclasses.replace(config, text_encoder=preset.config.text_encoder) == preset.config:
            return preset
    return None


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}") from None
