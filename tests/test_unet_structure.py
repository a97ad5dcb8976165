"""Structure and robustness of UNetT2V / UNetInterpolation: sizes, checkpoint keys, dtypes, gating."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from kvt.models import FULL, TINY
from kvt.models.unet_interpolation import UNetInterpolation
from kvt.models.unet_t2v import UNetT2V
from support import refdata

# Keys that only the add_new_temporal_params=True variant of the interpolation U-Net has.
NEW_TEMPORAL_KEY = re.compile(
    r"^(temporal_conv_in|temporal_conv_out)\.|\.temporal_post_(upsample|downsample)\.")


def _with_new_temporal_params(config):
    return dataclasses.replace(config, add_new_temporal_params=True)


BUILDERS: dict[str, Callable[[object], nn.Module]] = {
    "t2v": lambda preset: UNetT2V(preset.config.t2v),
    "interpolation": lambda preset: UNetInterpolation(preset.config.interpolation),
    "interpolation_new_temporal": lambda preset: UNetInterpolation(
        _with_new_temporal_params(preset.config.interpolation)),
}


# ---------------------------------------------------------------------------------------------------
# full size (meta device: no memory, well under a second each)


@pytest.mark.parametrize("name, params, tensors", [
    ("t2v", 4_149_077_956, 1910),
    ("interpolation", 3_979_941_530, 1723),
    # 1765 tensors: our count; the key set equals the official module's (checked against it in /tmp).
    ("interpolation_new_temporal", 4_038_236_008, 1765),
])
def test_full_size_parameter_counts(name: str, params: int, tensors: int) -> None:
    with torch.device("meta"):
        model = BUILDERS[name](FULL)
    state = model.state_dict()
    assert sum(v.numel() for v in state.values()) == params
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(state) == tensors
    assert not list(model.buffers()), "buffers break meta-device construction + assign=True loading"


# ---------------------------------------------------------------------------------------------------
# tiny: keys and shapes of the reference checkpoints


@pytest.mark.parametrize("name, checkpoint", [("t2v", "t2v.pt"), ("interpolation", "interpolation.pt")])
def test_tiny_keys_and_shapes_match_reference_checkpoint(name: str, checkpoint: str) -> None:
    ref = refdata.require_reference()
    official = torch.load(ref / "checkpoints" / checkpoint, weights_only=True)["unet"]
    ours = BUILDERS[name](TINY).state_dict()
    assert set(ours) == set(official), (
        f"missing {sorted(set(official) - set(ours))[:5]}, unexpected {sorted(set(ours) - set(official))[:5]}")
    wrong = {k: (tuple(ours[k].shape), tuple(v.shape)) for k, v in official.items()
             if ours[k].shape != v.shape}
    assert not wrong, f"shape mismatches (ours, official): {dict(list(wrong.items())[:5])}"


def test_new_temporal_params_add_only_their_keys() -> None:
    base = BUILDERS["interpolation"](TINY).state_dict()
    new = BUILDERS["interpolation_new_temporal"](TINY).state_dict()
    assert set(base) <= set(new)
    extra = set(new) - set(base)
    assert extra and all(NEW_TEMPORAL_KEY.search(k) for k in extra), sorted(extra)[:5]
    assert not any(NEW_TEMPORAL_KEY.search(k) for k in base)


def test_meta_device_build_loads_with_assign() -> None:
    """The checkpoint loader builds on the meta device and loads with assign=True."""
    ref = refdata.require_reference()
    state = torch.load(ref / "checkpoints/t2v.pt", weights_only=True)["unet"]
    with torch.device("meta"):
        model = UNetT2V(TINY.config.t2v)
    model.load_state_dict(state, strict=True, assign=True)
    assert all(p.device.type == "cpu" for p in model.parameters())
    t = refdata.load_tensors("modules/t2v_unet_image_A.safetensors")
    with torch.no_grad():
        out = model.eval().forward_image(t["x"], t["time"], t["context"], t["context_mask"])
    err = (out - t["out"]).abs().max().item()
    assert err <= refdata.recommended_atol("t2v_unet_image_A"), err


# ---------------------------------------------------------------------------------------------------
# low precision


def _load(name: str, checkpoint: str) -> nn.Module:
    ref = refdata.require_reference()
    model = BUILDERS[name](TINY).eval()
    model.load_state_dict(torch.load(ref / "checkpoints" / checkpoint, weights_only=True)["unet"])
    return model


def _t2v_video(model: nn.Module, t: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
    return model.forward_video(t["x"].to(dtype), t["time"], t["context"].to(dtype), t["context_mask"],
                               t["temporal_embed"], t["noise_aug_time"], t["motion_score"], num_frames=4)


def _interpolation(model: nn.Module, t: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
    return model(t["x"].to(dtype), t["time"], t["context"].to(dtype), t["context_mask"], t["skip_frames"],
                 t["perturbation_time"], t["temporal_mask"], num_groups=3)


# Measured max |low precision - fp32 official|: bf16 0.026 (t2v video B) / 0.013 (interp skip3);
# fp16 0.0024 / 0.0017. The bounds leave ~2x headroom; outputs are |x| <= 0.28.
@pytest.mark.parametrize("dtype, bound", [(torch.bfloat16, 5e-2), (torch.float16, 1e-2)],
                         ids=["bf16", "fp16"])
@pytest.mark.parametrize("name, checkpoint, case, run", [
    ("t2v", "t2v.pt", "modules/t2v_unet_video_B.safetensors", _t2v_video),
    ("interpolation", "interpolation.pt", "modules/interpolation_unet_skip3.safetensors", _interpolation),
], ids=["t2v", "interpolation"])
def test_low_precision_runs_and_stays_close(name: str, checkpoint: str, case: str,
                                            run: Callable[..., Tensor], dtype: torch.dtype,
                                            bound: float) -> None:
    model = _load(name, checkpoint).to(dtype)
    t = refdata.load_tensors(case)
    with torch.no_grad():
        out = run(model, t, dtype)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    err = (out.float() - t["out"]).abs().max().item()
    assert err < bound, f"{name} {dtype}: max|low precision - fp32 official| = {err:.3g} >= {bound}"


# ---------------------------------------------------------------------------------------------------
# interpolation gating


def test_rows_with_temporal_mask_zero_are_exact_pass_throughs() -> None:
    """An inf in one unconditional row must not reach the other rows of its temporal sequence.

    Temporal convs/attention mix the G rows of a sequence; with mask 0 the gated blend must return x
    exactly (0 * inf would be NaN with the plain (1 - m) x + m f(x) formula).
    """
    model = _load("interpolation", "interpolation.pt")
    t = refdata.load_tensors("modules/interpolation_unet_skip1.safetensors")
    groups = 4
    assert t["temporal_mask"][groups:].eq(0).all()
    poisoned = t["x"].clone()
    poisoned[groups] = float("inf")  # first row of the unconditional sequence

    def run(x: Tensor) -> Tensor:
        with torch.no_grad():
            return model(x, t["time"], t["context"], t["context_mask"], t["skip_frames"],
                         t["perturbation_time"], t["temporal_mask"], num_groups=groups)

    clean, dirty = run(t["x"]), run(poisoned)
    others = torch.ones(2 * groups, dtype=torch.bool)
    others[groups] = False
    assert torch.isfinite(dirty[others]).all()
    err = (dirty[others] - clean[others]).abs().max().item()
    assert err <= 1e-6, f"rows next to the poisoned one changed by {err:.3g}"


def test_new_temporal_params_forward_shape() -> None:
    """The add_new_temporal_params=True variant runs (all its extra temporal convs active)."""
    model = BUILDERS["interpolation_new_temporal"](TINY).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():  # zero-initialised merges/convs would be no-ops
            p.copy_(torch.rand(p.shape, generator=gen) if "merge" in name
                    else torch.randn(p.shape, generator=gen) * 0.1)
    cfg = TINY.config.interpolation
    groups, batch = 3, 6
    x = torch.randn(batch, cfg.num_channels, 8, 16, generator=gen)
    context = torch.randn(batch, 5, cfg.context_dim, generator=gen)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    temporal_mask = torch.tensor([1.0] * groups + [0.0] * groups)
    with torch.no_grad():
        out = model(x, torch.full((batch,), 999), context, mask, torch.full((batch,), 3, dtype=torch.int32),
                    torch.zeros(batch, dtype=torch.int32), temporal_mask, num_groups=groups)
        default_groups = model(x, torch.full((batch,), 999), context, mask,
                               torch.full((batch,), 3, dtype=torch.int32),
                               torch.zeros(batch, dtype=torch.int32), temporal_mask)
    assert out.shape == (batch, cfg.resolved_out_channels, 8, 16)
    assert torch.isfinite(out).all()
    assert torch.equal(out, default_groups)
