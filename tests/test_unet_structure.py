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
    "t2v": lambda config: UNetT2V(config.t2v),
    "interpolation": lambda config: UNetInterpolation(config.interpolation),
    "interpolation_new_temporal": lambda config: UNetInterpolation(
        _with_new_temporal_params(config.interpolation)),
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
        model = BUILDERS[name](FULL.config)
    state = model.state_dict()
    assert sum(v.numel() for v in state.values()) == params
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(state) == tensors
    assert not list(model.buffers()), "buffers break meta-device construction + assign=True loading"


# ---------------------------------------------------------------------------------------------------
# the reference folder: its configs.json builds exactly the keys and shapes of its checkpoints


@pytest.mark.parametrize("name, checkpoint", [("t2v", "t2v.pt"), ("interpolation", "interpolation.pt")])
def test_keys_and_shapes_match_reference_checkpoint(name: str, checkpoint: str) -> None:
    ref = refdata.require_reference()
    official = torch.load(ref / "checkpoints" / checkpoint, weights_only=True)["unet"]
    ours = BUILDERS[name](refdata.config()).state_dict()
    assert set(ours) == set(official), (
        f"missing {sorted(set(official) - set(ours))[:5]}, unexpected {sorted(set(ours) - set(official))[:5]}")
    wrong = {k: (tuple(ours[k].shape), tuple(v.shape)) for k, v in official.items()
             if ours[k].shape != v.shape}
    assert not wrong, f"shape mismatches (ours, official): {dict(list(wrong.items())[:5])}"


def test_new_temporal_params_add_only_their_keys() -> None:
    base = BUILDERS["interpolation"](TINY.config).state_dict()
    new = BUILDERS["interpolation_new_temporal"](TINY.config).state_dict()
    assert set(base) <= set(new)
    extra = set(new) - set(base)
    assert extra and all(NEW_TEMPORAL_KEY.search(k) for k in extra), sorted(extra)[:5]
    assert not any(NEW_TEMPORAL_KEY.search(k) for k in base)


def _first_case(producer: str, video: bool | None = None) -> str:
    """The first module case of an official U-Net forward (t2v: image or video mode)."""
    refdata.require_reference()
    for path in refdata.module_cases(producer):
        if video is None or ("temporal_embed" in refdata.file_entry(path)["tensors"]) == video:
            return path
    pytest.skip(f"no {producer} case{'' if video is None else (' in video mode' if video else ' in image mode')}")


T2V_PRODUCER = "kandinsky_video.model.unet.UNet.forward"
INTERPOLATION_PRODUCER = "unet_interpolation.UNet.forward"


def test_meta_device_build_loads_with_assign() -> None:
    """The checkpoint loader builds on the meta device and loads with assign=True."""
    ref = refdata.require_reference()
    state = torch.load(ref / "checkpoints/t2v.pt", weights_only=True)["unet"]
    with torch.device("meta"):
        model = UNetT2V(refdata.config().t2v)
    model.load_state_dict(state, strict=True, assign=True)
    assert all(p.device.type == "cpu" for p in model.parameters())
    path = _first_case(T2V_PRODUCER, video=False)
    t = refdata.load_tensors(path)
    with torch.no_grad():
        out = model.eval().forward_image(t["x"], t["time"], t["context"], t["context_mask"])
    err = (out - t["out"]).abs().max().item()
    assert err <= refdata.recommended_atol(refdata.case_name(path)), err


# ---------------------------------------------------------------------------------------------------
# low precision


def _load(name: str, checkpoint: str) -> nn.Module:
    ref = refdata.require_reference()
    model = BUILDERS[name](refdata.config()).eval()
    model.load_state_dict(torch.load(ref / "checkpoints" / checkpoint, weights_only=True)["unet"])
    return model


def _t2v_video(model: nn.Module, path: str, t: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
    frames = int(refdata.file_entry(path)["meta"]["num_frames"])
    return model.forward_video(t["x"].to(dtype), t["time"], t["context"].to(dtype), t["context_mask"],
                               t["temporal_embed"], t["noise_aug_time"], t["motion_score"], num_frames=frames)


def _interpolation(model: nn.Module, path: str, t: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
    groups = int(refdata.file_entry(path)["meta"]["num_predicted_groups"])
    return model(t["x"].to(dtype), t["time"], t["context"].to(dtype), t["context_mask"], t["skip_frames"],
                 t["perturbation_time"], t["temporal_mask"], num_groups=groups)


# Bounds relative to the case's largest |output| (MANIFEST). Measured on the shared reference (|out| <=
# 0.28): bf16 0.026 (t2v video B) / 0.013 (interp skip3) = 0.11 / 0.05 of it; fp16 0.0024 / 0.0017 =
# 0.010 / 0.006. The bounds leave ~2x headroom.
@pytest.mark.parametrize("dtype, bound", [(torch.bfloat16, 0.2), (torch.float16, 0.04)],
                         ids=["bf16", "fp16"])
@pytest.mark.parametrize("name, checkpoint, producer, video, run", [
    ("t2v", "t2v.pt", T2V_PRODUCER, True, _t2v_video),
    ("interpolation", "interpolation.pt", INTERPOLATION_PRODUCER, None, _interpolation),
], ids=["t2v", "interpolation"])
def test_low_precision_runs_and_stays_close(name: str, checkpoint: str, producer: str, video: bool | None,
                                            run: Callable[..., Tensor], dtype: torch.dtype,
                                            bound: float) -> None:
    path = _first_case(producer, video)
    model = _load(name, checkpoint).to(dtype)
    t = refdata.load_tensors(path)
    with torch.no_grad():
        out = run(model, path, t, dtype)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    err = (out.float() - t["out"]).abs().max().item()
    scale = refdata.max_abs_output(refdata.case_name(path))
    assert err < bound * scale, (
        f"{name} {dtype}: max|low precision - fp32 official| = {err:.3g} >= {bound} x {scale:.3g}")


# ---------------------------------------------------------------------------------------------------
# interpolation gating


def test_rows_with_temporal_mask_zero_are_exact_pass_throughs() -> None:
    """An inf in one unconditional row must not reach the other rows of its temporal sequence.

    Temporal convs/attention mix the G rows of a sequence; with mask 0 the gated blend must return x
    exactly (0 * inf would be NaN with the plain (1 - m) x + m f(x) formula).
    """
    model = _load("interpolation", "interpolation.pt")
    path = _first_case(INTERPOLATION_PRODUCER)
    t = refdata.load_tensors(path)
    groups = int(refdata.file_entry(path)["meta"]["num_predicted_groups"])
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
    model = BUILDERS["interpolation_new_temporal"](TINY.config).eval()
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
