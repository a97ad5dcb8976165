"""Parity of UNetT2V / UNetInterpolation with the golden outputs of the official U-Nets.

The networks are the reference folder's own (its configs.json and checkpoints, through the project's
loader); cases come from MANIFEST.json (module files whose producer is one of the official U-Net
forwards) and are dispatched by content: a t2v file with a ``temporal_embed`` tensor is a video-mode
call. Tolerances are the reference README's "recommended atol" per case (rtol 0); the padding effect is
the manifest's own note.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import Tensor

from kvt.models.unet_interpolation import UNetInterpolation
from kvt.models.unet_layers import ContextRows
from kvt.models.unet_t2v import UNetT2V
from support import refdata

T2V_PRODUCER = "kandinsky_video.model.unet.UNet.forward"
INTERPOLATION_PRODUCER = "unet_interpolation.UNet.forward"

T2V_CASES = refdata.module_cases(T2V_PRODUCER)
INTERPOLATION_CASES = refdata.module_cases(INTERPOLATION_PRODUCER)
UNET_CASES = T2V_CASES + INTERPOLATION_CASES
# A padding change must stand out from the case's tolerance by this factor to count as detected.
DETECTABLE = 10


def _ids(paths: list[str]) -> list[str]:
    return [refdata.case_name(p) for p in paths]


def _t2v() -> UNetT2V:
    return refdata.models().unet_t2v


def _interpolation() -> UNetInterpolation:
    return refdata.models().unet_interpolation


def _run(path: str, t: dict[str, Tensor], context: Tensor | None = None,
         context_mask: Tensor | None = None, context_len: Tensor | None = None,
         context_rows: ContextRows | None = None, temporal_clips: int | None = None) -> Tensor:
    """Our module on the case's inputs (optionally with a replaced context)."""
    entry: dict[str, Any] = refdata.file_entry(path)
    meta = entry.get("meta", {})
    context = t["context"] if context is None else context
    context_mask = t["context_mask"] if context_mask is None else context_mask
    text = dict(context_len=context_len, context_rows=context_rows)
    with torch.no_grad():
        if T2V_PRODUCER in entry["producer"]:
            if "temporal_embed" in t:
                return _t2v().forward_video(
                    t["x"], t["time"], context, context_mask, frame_index=t["temporal_embed"],
                    noise_aug=t["noise_aug_time"], motion_score=t["motion_score"],
                    num_frames=int(meta["num_frames"]), **text)
            return _t2v().forward_image(t["x"], t["time"], context, context_mask, **text)
        return _interpolation()(
            t["x"], t["time"], context, context_mask, skip_frames=t["skip_frames"],
            perturbation_time=t["perturbation_time"], temporal_mask=t["temporal_mask"],
            num_groups=int(meta["num_predicted_groups"]), temporal_clips=temporal_clips, **text)


def distinct_contexts(t: dict[str, Tensor]) -> tuple[Tensor, Tensor, ContextRows]:
    """The golden per-row context as the stage contract sends it: the distinct contexts [prompt, null]
    (first and last row) and the block layout of the rows, checked against every row."""
    context, mask = t["context"], t["context_mask"]
    distinct = torch.stack([context[0], context[-1]]), torch.stack([mask[0], mask[-1]])
    assert int(mask[-1].sum()) == 1, "the last rows are the null context: one valid position"
    rows = context.shape[0]
    blocks = (0, 1, 1) if rows % 3 == 0 and torch.equal(context[rows // 3], context[-1]) else (0, 1)
    layout = ContextRows(blocks, constant=(1,))
    assert torch.equal(layout.per_row(distinct[0], rows), context)
    assert torch.equal(layout.per_row(distinct[1], rows), mask)
    return distinct[0], distinct[1], layout


def _max_err(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a.double() - b.double()).abs().max().item()


def _padded(t: dict[str, Tensor], length: int) -> tuple[Tensor, Tensor]:
    """The case's context and mask with zero rows (mask 0) appended up to ``length`` positions; the
    mask as int64, to cover integer masks."""
    batch, current, dim = t["context"].shape
    pad = length - current
    context = torch.cat([t["context"], t["context"].new_zeros(batch, pad, dim)], dim=1)
    mask = torch.cat([t["context_mask"], t["context_mask"].new_zeros(batch, pad)], dim=1).long()
    return context, mask


@pytest.mark.parametrize("path", UNET_CASES, ids=_ids(UNET_CASES))
def test_matches_official(path: str) -> None:
    refdata.require_reference()
    case = refdata.case_name(path)
    atol = refdata.recommended_atol(case)
    t = refdata.load_tensors(path)
    err = _max_err(_run(path, t), t["out"])
    assert err <= atol, f"{case}: max|ours - official| = {err:.3g} > atol {atol:g}"


@pytest.mark.parametrize("path", UNET_CASES, ids=_ids(UNET_CASES))
def test_static_context_with_context_len_is_exact(path: str) -> None:
    """Zero rows (mask 0) appended to the context up to the static length S of configs.json (one more
    row where the case already has S) + context_len = original L give the official output; without
    context_len the pooled query changes, and so does the output, far beyond the tolerance."""
    refdata.require_reference()
    case = refdata.case_name(path)
    atol = refdata.recommended_atol(case)
    t = refdata.load_tensors(path)
    batch, length, _ = t["context"].shape
    context, mask = _padded(t, max(refdata.tokens_length(), length + 1))
    context_len = torch.full((batch,), float(length))

    err = _max_err(_run(path, t, context, mask, context_len), t["out"])
    assert err <= atol, f"{case}: static context: max|ours - official| = {err:.3g} > atol {atol:g}"

    shifted = _max_err(_run(path, t, context, mask), t["out"])
    assert shifted > DETECTABLE * atol, (
        f"{case}: padding without context_len should change the output (got {shifted:.3g})")


def test_padding_effect_equals_the_official_one() -> None:
    """The manifest's note on the official module (context padded from L to L' with masked zero rows,
    no length correction) is reproduced: the same change of the output, within the case's tolerance."""
    refdata.require_reference()
    case = refdata.note_case("context_padding_changes_output")
    note = refdata.note("context_padding_changes_output")
    assert note is not None
    lengths = re.search(r"from L=(\d+) to L=(\d+)", str(note["case"]))
    assert lengths, f"note {note['case']!r} does not say which lengths"
    path = refdata.case_path(case)
    t = refdata.load_tensors(path)
    assert t["context"].shape[1] == int(lengths.group(1))
    context, mask = _padded(t, int(lengths.group(2)))
    change = _max_err(_run(path, t, context, mask), _run(path, t))
    atol = refdata.recommended_atol(case)
    official = float(note["max_abs_change"])
    assert abs(change - official) <= 4 * atol, (
        f"{case}: padding changes our output by {change:.6g}, the official one by {official:.6g}")


# Distinct contexts vs the per-row form on the same case: float reassociation only (measured <= 1e-6 on
# the reference cases; fp32, outputs of order 1).
REASSOCIATION_ATOL = 1e-5


@pytest.mark.parametrize("path", UNET_CASES, ids=_ids(UNET_CASES))
def test_distinct_contexts_with_cuts_match_official(path: str) -> None:
    """The stage contract's form: each distinct context once, K/V and pooling per context, the null rows'
    cross-attention as a constant and (interpolation) temporal layers on the conditional half only."""
    refdata.require_reference()
    case = refdata.case_name(path)
    t = refdata.load_tensors(path)
    context, mask, rows = distinct_contexts(t)
    clips = 1 if "temporal_mask" in t else None
    if clips:
        groups = int(refdata.file_entry(path)["meta"]["num_predicted_groups"])
        assert t["temporal_mask"][groups:].eq(0).all(), "the unconditional half's temporal mask is 0"
    cut = _run(path, t, context, mask, context_rows=rows, temporal_clips=clips)
    per_row = _run(path, t)
    assert _max_err(cut, t["out"]) <= refdata.recommended_atol(case)
    assert _max_err(cut, per_row) <= REASSOCIATION_ATOL, f"{case}: cuts moved the output by more than reassociation"
    swapped = _run(path, t, context.flip(0), mask.flip(0), context_rows=rows, temporal_clips=clips)
    assert _max_err(swapped, per_row) > 1e-3, "the row mapping must matter"


@pytest.mark.parametrize("path", T2V_CASES, ids=_ids(T2V_CASES))
def test_t2v_forward_dispatches_on_frame_index(path: str) -> None:
    """forward() picks the mode from the presence of frame_index, never from the batch size."""
    refdata.require_reference()
    t = refdata.load_tensors(path)
    model = _t2v()
    with torch.no_grad():
        if "temporal_embed" in t:
            frames = int(refdata.file_entry(path)["meta"]["num_frames"])
            got = model(t["x"], t["time"], t["context"], t["context_mask"], t["temporal_embed"],
                        t["noise_aug_time"], t["motion_score"], frames)
            want = model.forward_video(t["x"], t["time"], t["context"], t["context_mask"],
                                       t["temporal_embed"], t["noise_aug_time"], t["motion_score"], frames)
            image_mode = model.forward_image(t["x"], t["time"], t["context"], t["context_mask"])
            assert _max_err(image_mode, want) > 1e-3, "video and image mode should differ"
        else:
            got = model(t["x"], t["time"], t["context"], t["context_mask"])
            want = model.forward_image(t["x"], t["time"], t["context"], t["context_mask"])
    assert torch.equal(got, want)


@pytest.mark.parametrize("path", INTERPOLATION_CASES, ids=_ids(INTERPOLATION_CASES))
def test_interpolation_default_groups_is_half_batch(path: str) -> None:
    """num_groups=None means the [G cond | G uncond] layout, i.e. G = B // 2."""
    refdata.require_reference()
    t = refdata.load_tensors(path)
    groups = int(refdata.file_entry(path)["meta"]["num_predicted_groups"])
    assert t["x"].shape[0] == 2 * groups
    args = (t["x"], t["time"], t["context"], t["context_mask"], t["skip_frames"],
            t["perturbation_time"], t["temporal_mask"])
    with torch.no_grad():
        assert torch.equal(_interpolation()(*args), _interpolation()(*args, num_groups=groups))
