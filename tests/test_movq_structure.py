"""Structure of kvt.models.movq.MoVQ: parameter counts, key sets, dtypes, chunk validation, export.

Full-size counts are the official modules' counts measured on the meta device
(docs/spec/checkpoints.md); the key sets built from the reference folder's configs.json must equal its
checkpoints' exactly.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from kvt.models import FULL, TINY, MoVQConfig
from kvt.models.movq import MoVQ, decoder_attention_levels, encoder_attention_levels
from support import refdata

# bf16 has an 8-bit significand; through ~40 layers the tiny MoVQs drift by up to 3.5 % of the
# output range (measured max abs / max output: movq_encode_B 0.052 / 2.97, movq_decode_B 0.135 / 3.93,
# video_movq_decode_A 0.064 / 4.35).
BF16_TOL_FRACTION_OF_RANGE = 0.06


def n_params(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def meta_movq(config: MoVQConfig) -> MoVQ:
    with torch.device("meta"):
        return MoVQ(config)


@pytest.mark.fullsize
def test_full_image_movq_parameter_counts() -> None:
    model = meta_movq(FULL.config.image_movq)
    assert n_params(model) == 270_603_567
    assert n_params(model.encoder, model.quant_conv) == 109_485_336
    assert n_params(model.decoder, model.post_quant_conv) == 161_118_231
    assert len(model.state_dict()) == 430


@pytest.mark.fullsize
def test_full_video_movq_parameter_counts() -> None:
    config = FULL.config.video_movq
    model = meta_movq(config)
    base = n_params(model)
    assert base == 666_131_275
    assert n_params(model.decoder, model.post_quant_conv) == 556_645_939
    assert len(model.state_dict()) == 570

    with_conv = meta_movq(dataclasses.replace(config, add_conv=True))
    assert n_params(with_conv) - base == 5_476
    conv_keys = {k for k in with_conv.state_dict() if ".conv." in k and ".norm" in k}
    assert conv_keys and all(k.startswith("decoder.") for k in conv_keys)

    flicker = meta_movq(dataclasses.replace(config, flicker_augmentation=True))
    assert n_params(flicker) - base == 2_048
    extra = set(flicker.state_dict()) - set(model.state_dict())
    assert extra == {"decoder.mid.block_1.temporal_flicker_proj.weight",
                     "decoder.mid.block_1.temporal_flicker_proj.bias"}


def test_attention_levels_follow_nominal_resolution() -> None:
    # "attn_resolutions [32] of resolution 256" = the lowest of four levels, on both sides.
    for config in (FULL.config.image_movq, TINY.config.video_movq):
        assert encoder_attention_levels(config) == (False, False, False, True)
        assert decoder_attention_levels(config) == (False, False, False, True)
    model = meta_movq(FULL.config.video_movq)
    assert [len(level.attn) for level in model.decoder.up] == [0, 0, 0, 3]
    assert [len(level.temporal_attn) for level in model.decoder.up] == [0, 0, 0, 3]
    assert [len(level.attn) for level in model.encoder.down] == [0, 0, 0, 2]


@pytest.mark.parametrize("kind", ["image", "video"])
def test_state_dict_matches_reference_checkpoint(kind: str) -> None:
    ref = refdata.require_reference()
    config = refdata.config().video_movq if kind == "video" else refdata.config().image_movq
    checkpoint = torch.load(ref / "checkpoints" / ("video_movq.pt" if kind == "video" else "movq.pt"),
                            weights_only=True)
    model = MoVQ(config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in checkpoint.items()}
    assert sorted(set(ours) - set(theirs)) == [], "keys we have that the checkpoint lacks"
    assert sorted(set(theirs) - set(ours)) == [], "checkpoint keys we lack"
    assert ours == theirs
    model.load_state_dict(checkpoint, strict=True)
    assert list(model.buffers()) == [], "no buffers: the loader builds on meta and loads with assign=True"


def _bf16_cases() -> list[tuple[str, str]]:
    """The last image-MoVQ encode and decode cases and the first video-MoVQ decode case of the manifest."""
    cases: dict[str, str] = {}
    for path in refdata.files_with_prefix("modules/"):
        producer = refdata.file_entry(path)["producer"]
        if not producer.startswith("kandinsky_video.movq.MoVQ"):
            continue
        kind = "video" if "(video MoVQ" in producer else "image"
        role = f"{kind} {'encode' if 'MoVQ.encode' in producer else 'decode'}"
        if kind == "image" or role not in cases:
            cases[role] = refdata.case_name(path)
    return [(case, role.split()[0]) for role, case in cases.items()]


@pytest.mark.parametrize("case,kind", _bf16_cases())
@torch.no_grad()
def test_bf16_run_is_finite_and_close_to_fp32(case: str, kind: str) -> None:
    ref = refdata.require_reference()
    path = refdata.case_path(case)
    config = refdata.config().video_movq if kind == "video" else refdata.config().image_movq
    model = MoVQ(config).eval()
    checkpoint = "video_movq.pt" if kind == "video" else "movq.pt"
    model.load_state_dict(torch.load(ref / "checkpoints" / checkpoint, weights_only=True), strict=True)
    model = model.to(torch.bfloat16)
    tensors = refdata.load_tensors(path)
    if "MoVQ.encode" in refdata.file_entry(path)["producer"]:
        out = model.encode(tensors["x"].to(torch.bfloat16))
    else:
        frames = refdata.file_entry(path)["meta"].get("num_frames")
        out = model.decode(tensors["z"].to(torch.bfloat16), chunk_size=frames)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    expected = tensors["out"]
    err = (out.float() - expected).abs().max().item()
    tol = BF16_TOL_FRACTION_OF_RANGE * expected.abs().max().item()
    assert err <= tol, f"{case} bf16 vs fp32 reference: max abs {err:.3e} > {tol:.3e}"


def test_decode_rejects_batch_not_multiple_of_chunk_size() -> None:
    model = MoVQ(TINY.config.video_movq).eval()
    z = torch.zeros(6, 4, 8, 8)
    with pytest.raises(ValueError, match=r"batch of 6 latents is not a whole number of chunks of chunk_size=4"):
        model.decode(z, chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size=0"):
        model.decode(z, chunk_size=0)


class _Decode(nn.Module):
    def __init__(self, movq: MoVQ, chunk_size: int | None) -> None:
        super().__init__()
        self.movq = movq
        self.chunk_size = chunk_size

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.movq.decode(z, chunk_size=self.chunk_size)


def _random_video_movq() -> MoVQ:
    torch.manual_seed(0)
    model = MoVQ(TINY.config.video_movq).eval()
    with torch.no_grad():  # non-zero temporal branches (they are zero-initialised)
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    return model


@torch.no_grad()
def test_video_decode_exports_with_dynamic_frame_count() -> None:
    """Stage contract: one chunk per call, F dynamic (1..8): torch.export must not specialise F."""
    model = _random_video_movq()
    frames = torch.export.Dim("frames", min=1, max=8)
    program = torch.export.export(_Decode(model, None), (torch.randn(5, 4, 4, 4),),
                                  dynamic_shapes={"z": {0: frames}})
    for n in (1, 3):
        z = torch.randn(n, 4, 4, 4)
        torch.testing.assert_close(program.module()(z), model.decode(z), rtol=0, atol=1e-5)


@torch.no_grad()
def test_video_decode_exports_with_dynamic_number_of_chunks() -> None:
    """The chunk regrouping uses -1 for the number of chunks, so K chunks of F can be one dynamic dim.

    (torch.export's default 0/1 specialisation makes this program require K >= 2; exporting under
    ``torch.fx.experimental._config.patch(backed_size_oblivious=True)`` also admits K = 1.)
    """
    model = _random_video_movq()
    chunks = torch.export.Dim("chunks", min=1, max=16)
    program = torch.export.export(_Decode(model, 2), (torch.randn(4, 4, 4, 4),),
                                  dynamic_shapes={"z": {0: 2 * chunks}})
    z = torch.randn(6, 4, 4, 4)
    torch.testing.assert_close(program.module()(z), model.decode(z, chunk_size=2), rtol=0, atol=1e-5)
