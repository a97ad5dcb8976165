"""Parity of kvt.models.movq.MoVQ with the official MoVQ golden tensors (fp32).

The networks are the reference folder's own (configs.json and checkpoints, through the project's
loader); the cases come from MANIFEST.json (every ``modules/`` file produced by
``kandinsky_video.movq.MoVQ``) and the batch effect from its notes, so another reference folder in the
same format runs unchanged. Besides plain parity, this pins the two batch-coupling behaviours of the
official decoder: chunks of frames are independent temporal contexts, and the spatial attention norms
use the first item's ``zq`` (docs/spec/movq.md, quirks 25-26).
"""

from __future__ import annotations

import pytest
import torch

from kvt.models.movq import MoVQ
from support import refdata

PRODUCER = "kandinsky_video.movq.MoVQ"
# A chunk boundary must change the decoded frames by this many times the case's tolerance.
DETECTABLE = 10


def movq_cases() -> list[str]:
    return [p for p in refdata.files_with_prefix("modules/")
            if refdata.file_entry(p)["producer"].startswith(PRODUCER)]


def movq_kind(producer: str) -> str:
    """'video' or 'image': decode cases name their MoVQ; encode cases always use the image MoVQ."""
    return "video" if "(video MoVQ" in producer else "image"


def load_movq(kind: str) -> MoVQ:
    models = refdata.models()
    return models.video_movq if kind == "video" else models.image_movq


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("path", movq_cases())
@torch.no_grad()
def test_movq_case_matches_official(path: str) -> None:
    refdata.require_reference()
    entry = refdata.file_entry(path)
    producer = entry["producer"]
    tensors = refdata.load_tensors(path)
    model = load_movq(movq_kind(producer))
    if "MoVQ.encode" in producer:
        out = model.encode(tensors["x"])
    elif "MoVQ.decode" in producer:
        # One file = one official decode call = one chunk.
        out = model.decode(tensors["z"], chunk_size=entry["meta"].get("num_frames"))
    else:
        pytest.fail(f"{path}: unknown MoVQ producer {producer!r}")
    expected = tensors["out"]
    assert out.shape == expected.shape, f"{path}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    atol = refdata.recommended_atol(refdata.case_name(path))
    err = max_abs(out, expected)
    assert err <= atol, f"{path}: max abs error {err:.3e} > atol {atol:.0e}"


def _video_decode_case() -> tuple[str, dict[str, torch.Tensor]]:
    """The first video-MoVQ decode case of the manifest (one official decode call = one chunk)."""
    for path in movq_cases():
        producer = refdata.file_entry(path)["producer"]
        if "MoVQ.decode" in producer and movq_kind(producer) == "video":
            return path, refdata.load_tensors(path)
    pytest.skip("no video MoVQ decode case in this reference folder")


@torch.no_grad()
def test_video_decode_equal_chunks_in_one_call_equal_separate_calls() -> None:
    refdata.require_reference()
    path, tensors = _video_decode_case()
    z = tensors["z"]
    frames = z.shape[0]
    z2 = torch.cat([z, z.flip(0)])  # two different chunks
    model = load_movq("video")
    atol = refdata.recommended_atol(refdata.case_name(path))

    together = model.decode(z2, chunk_size=frames)
    separate = torch.cat([model.decode(z2[:frames]), model.decode(z2[frames:])])
    err = max_abs(together, separate)
    assert err <= atol, f"2 chunks in one call vs 2 calls: max abs {err:.3e} > {atol:.0e}"
    err_ref = max_abs(together[:frames], tensors["out"])
    assert err_ref <= atol, f"first chunk vs reference: max abs {err_ref:.3e} > {atol:.0e}"
    # The chunk boundary is real: one chunk of 2F frames is a different computation.
    coupled = max_abs(model.decode(z2), separate)
    assert coupled > DETECTABLE * atol, (
        f"decoding 2F frames as one chunk should differ from two chunks ({coupled:.3e})")


@torch.no_grad()
def test_image_decode_batch_uses_first_item_zq_in_attention() -> None:
    """The manifest's note: decoding the noted case as one batch vs item by item changes item 0 by
    float noise and item 1 by the official figure; ours must change them by the same amounts."""
    refdata.require_reference()
    case = refdata.note_case("movq_batch_dependence")
    note = refdata.note("movq_batch_dependence")
    assert note is not None
    path = refdata.case_path(case)
    tensors = refdata.load_tensors(path)
    z = tensors["z"]
    assert z.shape[0] >= 2, f"{case}: the batch effect needs a batch of at least 2"
    model = load_movq("image")
    atol = refdata.recommended_atol(case)

    batched = model.decode(z)
    alone = torch.cat([model.decode(z[i : i + 1]) for i in range(z.shape[0])])
    err0 = max_abs(batched[0], alone[0])
    err1 = max_abs(batched[1], alone[1])
    assert err0 <= atol, f"item 0 batched vs alone: {err0:.3e} > {atol:.0e}"
    official = float(note["item1_max_abs_diff"])
    assert err1 == pytest.approx(official, abs=4 * atol), (
        f"item 1 batched vs alone: {err1:.6f}; the official decoder gives {official:.6f}")
    # chunk_size=1 makes every item its own chunk, i.e. item-by-item decoding.
    err_c1 = max_abs(model.decode(z, chunk_size=1), alone)
    assert err_c1 <= atol, f"chunk_size=1 vs item by item: {err_c1:.3e} > {atol:.0e}"
