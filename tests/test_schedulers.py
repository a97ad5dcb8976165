"""The three samplers against the golden scheduler tensors and against diffusers' own step."""

import pytest
import torch

from kvt.runtime.schedulers import Sampler, interpolation_sampler, key_frame_sampler
from support import refdata

SCHEDULER_FILE = "schedulers/schedulers.safetensors"


@pytest.fixture(scope="module")
def golden():
    refdata.require_reference()
    return refdata.load_tensors(SCHEDULER_FILE), refdata.file_entry(SCHEDULER_FILE)["meta"]


def _sampler_for(prefix: str, meta) -> Sampler:
    if prefix.startswith("keyframe"):
        return key_frame_sampler(meta["keyframe_num_inference_steps"])
    return interpolation_sampler(meta["interpolation_num_inference_steps"])


def test_schedule_tensors_match(golden):
    tensors, meta = golden
    for sampler in (key_frame_sampler(), interpolation_sampler()):
        assert torch.equal(sampler.scheduler.alphas_cumprod, tensors["alphas_cumprod"])
        assert torch.equal(sampler.scheduler.betas, tensors["betas"])
    assert key_frame_sampler(meta["keyframe_num_inference_steps"]).timesteps == tensors["keyframe.timesteps"].tolist()
    assert interpolation_sampler(meta["interpolation_num_inference_steps"]).timesteps == \
        tensors["interpolation.timesteps"].tolist()
    assert key_frame_sampler(meta["e2e_keyframe_steps"]).timesteps == tensors["keyframe_e2e.timesteps"].tolist()
    assert interpolation_sampler(meta["e2e_interpolation_steps"]).timesteps == \
        tensors["interpolation_e2e.timesteps"].tolist()


def test_step_cases(golden):
    tensors, meta = golden
    assert meta["steps"], "no step cases in the manifest"
    atol = refdata.stated_scheduler_atol()  # reference README, "Tolerances"
    for case in meta["steps"]:
        prefix, t = case["prefix"], case["timestep"]
        sampler = _sampler_for(prefix, meta)
        assert sampler.draws_noise(t) == case["noise_drawn"]
        noise = tensors[f"{prefix}.variance_noise"] if case["noise_drawn"] else None
        out = sampler.step(tensors[f"{prefix}.model_output"], t, tensors[f"{prefix}.sample"], noise)
        err = (out - tensors[f"{prefix}.prev_sample"]).abs().max().item()
        assert err <= atol, f"{prefix}: max abs error {err:.2e} > {atol}"
        x0 = sampler.predict_original(tensors[f"{prefix}.model_output"], t, tensors[f"{prefix}.sample"])
        err0 = (x0 - tensors[f"{prefix}.pred_original_sample"]).abs().max().item()
        assert err0 <= atol, f"{prefix}: x0 max abs error {err0:.2e}"


def test_add_noise_uniform_t20(golden):
    tensors, _ = golden
    out = key_frame_sampler().add_noise(tensors["add_noise.t20.original"], tensors["add_noise.t20.noise_uniform"], 20)
    assert torch.equal(out, tensors["add_noise.t20.out"])


@pytest.mark.parametrize("kind,steps", [("epsilon", 50), ("epsilon", 6), ("v_prediction", 10), ("v_prediction", 3)])
def test_step_is_bitwise_diffusers_step(kind, steps):
    """Passing the noise in changes nothing: our step equals DDPMScheduler.step with the same draw."""
    spacing = "leading" if kind == "epsilon" else "trailing"
    sampler = Sampler(kind, spacing, steps)
    gen = torch.Generator().manual_seed(0)
    for t in sampler.timesteps:
        model_output = torch.randn(2, 4, 8, 8, generator=gen)
        sample = torch.randn(2, 4, 8, 8, generator=gen) * 3  # exercise the clamp of x0
        expected = sampler.scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(t)).prev_sample
        noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(t)) if sampler.draws_noise(t) else None
        assert torch.equal(sampler.step(model_output, t, sample, noise), expected), f"t={t}"


def test_step_requires_noise_when_it_draws():
    sampler = key_frame_sampler(6)
    with pytest.raises(ValueError, match="adds variance noise"):
        sampler.step(torch.zeros(1, 4, 2, 2), 830, torch.zeros(1, 4, 2, 2), None)


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5])
def test_bad_step_counts_rejected(steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        key_frame_sampler(steps)
