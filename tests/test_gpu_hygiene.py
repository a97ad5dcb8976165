"""GPU hygiene switches of the fast path (issue 18, item 2) and the headline benchmark's CPU dry run
(item 3). What needs a GPU is under the ``gpu`` marker; everything else runs here on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from kvt.benchmarks.flops import DevicePeak, achieved, precision_key
from kvt.benchmarks.headline import PHASES
from kvt.cli.main import main
from kvt.models.attention_kernels import auto_choices, math_attention, movq_attention, movq_attention_kernel
from kvt.models.norms import FP32GroupNorm, native_group_norm
from kvt.models.presets import TINY
from kvt.models.random_weights import random_models
from kvt.runtime.fast_path import FastPathOptions, FastTorchBackend, build_fast_pipeline
from kvt.runtime.images import psnr_db, to_uint8, to_uint8_tensor

STEPS = dict(key_frame_steps=1, base_frame_steps=1, interpolation_steps=1)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def models():
    return random_models(TINY, seed=6)


def test_switches_resolve_per_device():
    cpu = FastPathOptions().resolved(torch.device("cpu"))
    gpu = FastPathOptions().resolved(torch.device("cuda"))  # resolving needs no GPU
    assert (cpu.channels_last, cpu.native_group_norm, cpu.cudnn_benchmark, cpu.movq_attention, cpu.hoist_text) == (
        False, False, False, "sdpa", True)
    assert (gpu.channels_last, gpu.native_group_norm, gpu.cudnn_benchmark, gpu.movq_attention, gpu.hoist_text) == (
        "auto", True, True, "auto", True)
    assert FastPathOptions(native_group_norm=False).resolved(torch.device("cuda")).native_group_norm is False
    with pytest.raises(ValueError, match="channels_last='sideways'"):
        FastPathOptions(channels_last="sideways").resolved(torch.device("cpu"))
    with pytest.raises(ValueError, match="movq_attention='flash'"):
        FastPathOptions(movq_attention="flash").resolved(torch.device("cpu"))


def test_native_group_norm_is_cuda_half_only():
    norm = FP32GroupNorm(2, 8)
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)
    with native_group_norm(True):
        on_cpu = norm(x)
    assert torch.equal(on_cpu, norm(x))  # the CPU keeps the float32 round trip
    expected = F.group_norm(x.float(), 2, norm.weight, norm.bias, norm.eps).to(x.dtype)
    assert torch.equal(on_cpu, expected)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_native_group_norm_matches_the_float32_path_on_cuda(dtype):
    torch.manual_seed(0)
    norm = FP32GroupNorm(32, 384).cuda()
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
        norm.bias.normal_(0.0, 0.05)
    x = (torch.randn(36, 384, 64, 64, device="cuda") * 3 + 1).to(dtype)
    reference = norm(x)
    with native_group_norm(True):
        native = norm(x)
    # Both accumulate in float32; at most one rounding step apart in the output dtype.
    ulp = torch.finfo(dtype).eps * reference.float().abs().clamp_min(1.0)
    assert ((native.float() - reference.float()).abs() <= ulp).all()


def test_movq_attention_kernels_agree_and_auto_records_its_choice():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 1, 300, 48) for _ in range(3))
    reference = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(math_attention(q, k, v), reference, rtol=1e-5, atol=1e-6)
    with movq_attention_kernel("math"):
        torch.testing.assert_close(movq_attention(q, k, v), reference, rtol=1e-5, atol=1e-6)
    with movq_attention_kernel("auto"):
        torch.testing.assert_close(movq_attention(q, k, v), reference, rtol=1e-5, atol=1e-6)
    entry = next(e for e in auto_choices() if e["q"] == [2, 1, 300, 48])
    assert entry["chosen"] in ("sdpa", "math") and set(entry["ms"]) == {"sdpa", "math"}
    with pytest.raises(ValueError, match="allowed sdpa, math, auto"):
        with movq_attention_kernel("flash"):
            pass


def test_math_attention_chunks_queries(monkeypatch):
    import kvt.models.attention_kernels as kernels

    monkeypatch.setattr(kernels, "MATH_CHUNK_BYTES", 64 * 4 * 16)  # 16 query rows per chunk
    q, k, v = (torch.randn(1, 1, 70, 8) for _ in range(3))
    torch.testing.assert_close(kernels.math_attention(q, k, v), F.scaled_dot_product_attention(q, k, v),
                               rtol=1e-5, atol=1e-6)


def test_random_weights_drawn_on_the_device_follow_the_recipe():
    """On the CPU the on-device draw is the CPU draw itself: same generator, same values."""
    a, b = random_models(TINY, seed=4), random_models(TINY, seed=4, init_on_device=True)
    for name, network in a.networks().items():
        other = b.networks()[name]
        for (key, p), (_, q) in zip(network.state_dict().items(), other.state_dict().items()):
            assert torch.equal(p, q), f"{name}.{key}"
    assert "drawn on cpu" in b.source


def test_memory_format_measured_and_switches_keep_outputs(models):
    plain = build_fast_pipeline(models, FastPathOptions(channels_last=False))
    reference = plain("a cat", fps="low", seed=2, progress=False, **STEPS)
    auto = build_fast_pipeline(models, FastPathOptions(channels_last="auto", movq_attention="auto"))
    out = auto("a cat", fps="low", seed=2, progress=False, **STEPS)
    backend = auto.backend
    assert isinstance(backend, FastTorchBackend)
    assert set(backend.memory_formats) == {"unet_t2v", "image_movq", "video_movq"}  # fps low: no interpolation
    for record in backend.memory_formats.values():
        assert record["chosen"] in ("contiguous", "channels_last") and set(record["ms"]) == {"contiguous", "channels_last"}
    assert (out.latents - reference.latents).abs().max() <= 1e-4
    assert abs(out.frames.astype(int) - reference.frames.astype(int)).max() <= 1


def test_video_decoder_bf16_gate(models):
    reference = build_fast_pipeline(models)("a cat", fps="low", seed=3, progress=False, **STEPS)
    refused = build_fast_pipeline(models, FastPathOptions(video_movq_dtype=torch.bfloat16, video_movq_min_psnr_db=200))
    out = refused("a cat", fps="low", seed=3, progress=False, **STEPS)
    gate = refused.backend.video_decoder_gate
    assert gate["passed"] is False and gate["psnr_db"] < 200
    assert (out.frames == reference.frames).all()  # fell back to the float32 decoder for every chunk
    accepted = build_fast_pipeline(models, FastPathOptions(video_movq_dtype=torch.bfloat16, video_movq_min_psnr_db=10))
    out = accepted("a cat", fps="low", seed=3, progress=False, **STEPS)
    gate = accepted.backend.video_decoder_gate
    assert gate["passed"] is True and gate["dtype"] == "bfloat16"
    assert psnr_db(torch.from_numpy(out.frames), torch.from_numpy(reference.frames)) >= 10
    assert not (out.frames == reference.frames).all()  # really decoded in bfloat16


def test_decode_on_device_is_the_same_video(models):
    pipe = build_fast_pipeline(models)
    latents = torch.randn(12, 4, 8, 8)  # fps low's 12 frames: chunks of 3 (the decoder's table stops at 5)
    on_device = pipe.decode_video(latents)
    pipe.decode_on_device = False
    assert (pipe.decode_video(latents) == on_device).all()
    frames = torch.rand(2, 3, 4, 4) * 2 - 1
    assert (to_uint8(frames) == to_uint8_tensor(frames).numpy()).all()
    assert psnr_db(to_uint8_tensor(frames), to_uint8_tensor(frames)) == float("inf")


def test_mfu_per_precision_and_against_the_measured_ceiling():
    peak = DevicePeak("H100", 989.4, {"fp16": 989.4, "bf16": 989.4, "tf32": 494.7, "fp32": 66.9},
                      measured={"fp16": 700.0, "tf32": 350.0})
    assert achieved(494.7e12, 1.0, peak, "tf32")[1] == pytest.approx(1.0)
    assert achieved(350e12, 1.0, peak, "tf32", measured=True)[1] == pytest.approx(1.0)
    assert achieved(1e12, 1.0, peak, "bf16", measured=True)[1] is None  # not measured
    assert precision_key(torch.float32, convolutions=True) == ("tf32" if torch.backends.cudnn.allow_tf32 else "fp32")
    assert precision_key(torch.float32, convolutions=True, cuda=False) == "fp32"
    assert precision_key(torch.bfloat16) == "bf16"


@pytest.mark.gpu
@cuda
def test_cuda_graphs_with_hoisting_equal_eager_without():
    models = random_models(TINY, seed=1, device="cuda", init_on_device=True)
    eager = build_fast_pipeline(models, FastPathOptions(cuda_graphs=False, hoist_text=False,
                                                        native_group_norm=False, channels_last=False))
    graphs = build_fast_pipeline(models, FastPathOptions(cuda_graphs=True, hoist_text=True,
                                                         native_group_norm=False, channels_last=False))
    for prompt, seed in (("a cat", 1), ("a red fox in the snow", 2)):  # the second request refreshes the K/V
        a = eager(prompt, fps="medium", seed=seed, progress=False, **STEPS)
        b = graphs(prompt, fps="medium", seed=seed, progress=False, **STEPS)
        assert (a.latents - b.latents).abs().max() <= 1e-2, prompt
    assert graphs.backend.captured_graphs > 0


@pytest.mark.gpu
@cuda
def test_each_hygiene_switch_flipped_alone_keeps_the_video_on_cuda():
    """The A/B of item 2 on the device: every switch off on its own gives the same video as the defaults.

    Float32 U-Nets and T5 so that only kernel choices differ (TF32 convolutions: loose, not bit-exact)."""
    models = random_models(TINY, seed=7, device="cuda", init_on_device=True)
    exact = dict(unet_dtype=torch.float32, text_encoder_dtype=torch.float32)
    reference = build_fast_pipeline(models, FastPathOptions(**exact))("a cat", fps="medium", seed=5, progress=False,
                                                                       **STEPS)
    assert reference.latents.isfinite().all()
    for switch in (dict(native_group_norm=False), dict(cudnn_benchmark=False), dict(channels_last=False),
                   dict(channels_last=True), dict(movq_attention="math"), dict(movq_attention="sdpa"),
                   dict(cuda_graphs=False), dict(hoist_text=False)):
        pipe = build_fast_pipeline(models, FastPathOptions(**exact, **switch))
        out = pipe("a cat", fps="medium", seed=5, progress=False, **STEPS)
        assert (out.latents - reference.latents).abs().max() <= 1e-2, switch
        assert abs(out.frames.astype(int) - reference.frames.astype(int)).max() <= 2, switch
    pipe = build_fast_pipeline(models, FastPathOptions(**exact))
    latents = reference.latents.to("cuda")
    pipe.decode_on_device = False
    per_chunk = pipe.decode_video(latents)
    pipe.decode_on_device = True
    assert abs(pipe.decode_video(latents).astype(int) - per_chunk.astype(int)).max() <= 1


# ------------------------------------------------------------------------------------------ headline


@pytest.mark.bench
def test_headline_dry_run_on_the_cpu(tmp_path):
    """Every phase of the GPU headline command, on the tiny preset and the CPU (item 3's dry run)."""
    code = main(["bench", "headline", "--preset", "tiny", "--device", "cpu", "--fps", "low", "--steps", "1,1,1",
                 "--iterations", "1", "--threads", "1", "--out", str(tmp_path), "--budget", "3000"])
    record = json.loads((tmp_path / "headline.json").read_text())
    statuses = {name: entry["status"] for name, entry in record["phases"].items()}
    assert code == 0, record
    assert list(statuses) == list(PHASES)
    assert statuses == {**{p: "done" for p in PHASES}, "groupnorm": "skipped"}  # GroupNorm: CUDA half only
    phases = record["phases"]
    assert phases["calibrate"]["gemm_tflops"]["fp32"] > 0 and phases["calibrate"]["copy_gb_per_s"] > 0
    census = phases["attention"]["shapes"]
    assert {r["stage"] for r in census} >= {"unet_t2v_image", "unet_t2v_video", "movq_decoder", "video_movq_decoder"}
    assert all(r["backend"] and r["sdpa_ms"] > 0 for r in census)
    e2e = phases["e2e"]
    assert e2e["baseline"]["t5_runs"] == 2 and e2e["fast"]["t5_runs"] == 1
    assert e2e["agreement"]["frames_max_abs"] <= 1 and e2e["speedup"] > 0
    assert e2e["fast"]["stages"]["unet_t2v_video"]["flops"] < e2e["baseline"]["stages"]["unet_t2v_video"]["flops"]
    variants = phases["stages"]["variants"]
    assert "fast, official per-row form (no cuts)" in variants and "baseline (official style)" in variants
    assert all("error" not in v for v in variants.values()), variants
    assert phases["movq_precision"]["bf16_psnr_db"] > 20
    markdown = (tmp_path / "headline.md").read_text()
    for section in ("### Measured ceilings", "### Attention census", "### End to end", "### Per-stage A/B",
                    "### Video decoder precision"):
        assert section in markdown


@pytest.mark.bench
def test_headline_stops_at_the_budget(tmp_path, capsys):
    code = main(["bench", "headline", "--preset", "tiny", "--device", "cpu", "--out", str(tmp_path),
                 "--budget", "0.001", "--phases", "env,calibrate"])
    record = json.loads((tmp_path / "headline.json").read_text())
    assert code == 0
    assert record["phases"]["calibrate"]["status"] == "skipped" and "budget" in record["phases"]["calibrate"]["reason"]
    assert record["phases"]["e2e"]["status"] == "not requested"
    assert main(["bench", "headline", "--preset", "tiny", "--device", "cpu", "--out", str(tmp_path),
                 "--phases", "nope"]) == 2
    assert "unknown ['nope']" in capsys.readouterr().err
