"""configs.json parsing: the official layout, strict U-Net keys, tolerated MoVQ extras, clear errors."""

import json

import pytest

from kvt.models import (
    FULL,
    TINY,
    ConfigError,
    KandinskyVideoConfig,
    MoVQConfig,
    UNetInterpolationConfig,
    UNetT2VConfig,
    UnsupportedConfigError,
)
from support import refdata


def test_reference_configs_parse_field_for_field():
    """The reference folder's configs.json (the official loader's layout) parses, keeps every value it
    gives and round-trips; the values it omits take the official constructors' defaults."""
    refdata.require_reference()
    raw = refdata.configs_json()
    config = refdata.config()
    assert KandinskyVideoConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    parsed = config.to_dict()
    for network in ("t2v", "interpolation", "image_movq", "video_movq"):
        for key, value in raw[network]["configs"].items():
            ours = parsed[network]["configs"][key]
            assert ours == value, f"{network}.{key}: parsed {ours!r}, configs.json says {value!r}"
    for key, value in raw["text_encoder"].items():
        assert parsed["text_encoder"][key] == value, key


@pytest.mark.parametrize("preset", [FULL, TINY], ids=lambda p: p.name)
def test_round_trip(preset):
    data = json.loads(json.dumps(preset.config.to_dict()))
    assert KandinskyVideoConfig.from_dict(data) == preset.config


def test_full_preset_hidden_dims():
    assert FULL.config.t2v.hidden_dims == (192, 384, 768, 1536, 3072)
    assert FULL.config.interpolation.resolved_out_channels == 12


def test_unet_rejects_unknown_keys():
    data = dict(TINY.config.t2v.to_dict(), heads=8)
    with pytest.raises(ConfigError, match=r"t2v: unknown key\(s\) \['heads'\]"):
        UNetT2VConfig.from_dict(data, "t2v")


def test_unet_defaults_follow_the_official_constructor():
    cfg = UNetT2VConfig.from_dict({"model_channels": 8, "time_embed_dim": 16, "context_dim": 8,
                                   "head_dim": 8})
    assert cfg.resolved_init_channels == 8 and cfg.resolved_out_channels == 3
    assert not cfg.noise_augmentation and not cfg.motion_score


def test_movq_keeps_and_ignores_extra_keys():
    """The official MoVQ constructors swallow unknown keywords; a real configs.json may carry some."""
    data = dict(TINY.config.image_movq.to_dict(), embed_dim=4, n_embed=16384)
    cfg = MoVQConfig.from_dict(data)
    assert cfg.extra == {"embed_dim": 4, "n_embed": 16384}
    assert cfg == TINY.config.image_movq  # extras do not change the architecture
    assert cfg.to_dict()["n_embed"] == 16384


@pytest.mark.parametrize("key,value,message", [
    ("build_3D_decoder", True, "build_3D_decoder=True is not supported"),
    ("double_z", True, "double_z=True is not supported"),
    ("temporal_blocks", True, "temporal_blocks=True is not supported"),
])
def test_movq_unsupported_variants(key, value, message):
    data = dict(TINY.config.video_movq.to_dict(), **{key: value})
    with pytest.raises(UnsupportedConfigError, match=message):
        MoVQConfig.from_dict(data, "video_movq")


@pytest.mark.parametrize("key,value", [("merge_perturbation_time_with_context", True), ("temporal", False),
                                       ("time_downsample", [True, False, False, False])])
def test_interpolation_unsupported_variants(key, value):
    data = dict(TINY.config.interpolation.to_dict(), **{key: value})
    with pytest.raises(UnsupportedConfigError, match=key):
        UNetInterpolationConfig.from_dict(data, "interpolation")


def test_missing_entries_and_bad_json(tmp_path):
    data = TINY.config.to_dict()
    del data["video_movq"]
    with pytest.raises(ConfigError, match=r"missing entries \['video_movq'\]"):
        KandinskyVideoConfig.from_dict(data)
    bad = tmp_path / "configs.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        KandinskyVideoConfig.from_json(bad)


def test_inconsistent_lengths_are_rejected():
    data = dict(TINY.config.t2v.to_dict(), num_blocks=[3, 3, 3])
    with pytest.raises(ConfigError, match="num_blocks has 3 entries, dim_mult has 4"):
        UNetT2VConfig.from_dict(data)


def test_quantised_text_encoder_is_rejected():
    with pytest.raises(UnsupportedConfigError, match="load_in_8bit"):
        KandinskyVideoConfig.from_dict(dict(TINY.config.to_dict(), text_encoder={
            "weights_path": "x", "load_in_8bit": True}))
