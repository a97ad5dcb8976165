"""The three DDPM samplers of Kandinsky Video 1.1, on diffusers' ``DDPMScheduler``.

diffusers owns the schedule (betas, zero-terminal-SNR rescale, timesteps, previous timestep, variance,
``add_noise``). ``DDPMScheduler.step`` draws its variance noise internally; :class:`Sampler` exposes the
same step with the noise passed in, so a run can be seeded per request, or replay recorded noise
exactly. Per-timestep coefficients are taken from the scheduler once (same float32 tensors, same
operation order as ``DDPMScheduler.step``), so the loop does only tensor arithmetic: no host syncs,
no per-step schedule work. ``tests/test_schedulers.py`` checks the step against ``DDPMScheduler.step``
bit for bit and against the golden tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvt.contract.request import GenerationRequest

if TYPE_CHECKING:
    # By its module: the package top level shows mypy diffusers' torch-less placeholder class.
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

NUM_TRAIN_TIMESTEPS = 1000

# Loop A (key frame image) and loop B (base frames): epsilon, 'leading', 50 steps (980 ... 0).
# Loop C (interpolation): v-prediction, 'trailing', 10 steps (999 ... 99).


def make_scheduler(prediction_type: str, timestep_spacing: str, num_inference_steps: int) -> DDPMScheduler:
    """A diffusers DDPMScheduler with the official settings (``get_sampler`` of the release)."""
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

    scheduler: DDPMScheduler = DDPMScheduler(  # an untyped decorator on __init__ hides the type from mypy
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_schedule="squaredcos_cap_v2",
        rescale_betas_zero_snr=True,
        variance_type="fixed_small_log",
        thresholding=True,
        dynamic_thresholding_ratio=0.995,
        prediction_type=prediction_type,
        timestep_spacing=timestep_spacing,
    )
    scheduler.set_timesteps(num_inference_steps)
    return scheduler


@dataclass(frozen=True)
class _StepCoefficients:
    sqrt_alpha_prod: torch.Tensor  # 0-dim float32, as DDPMScheduler.step computes them
    sqrt_beta_prod: torch.Tensor
    x0_coeff: torch.Tensor
    sample_coeff: torch.Tensor
    std: torch.Tensor  # fixed_small_log standard deviation (unused when no noise is drawn)
    draws_noise: bool  # DDPMScheduler draws variance noise iff t > 0


class Sampler:
    """One denoising schedule: timesteps, ``step(model_output, t, sample, noise)`` and ``add_noise``."""

    def __init__(self, prediction_type: str, timestep_spacing: str, num_inference_steps: int) -> None:
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= NUM_TRAIN_TIMESTEPS:
            raise ValueError(
                f"num_inference_steps={num_inference_steps!r}: must be an integer in [1, {NUM_TRAIN_TIMESTEPS}]"
            )
        self.scheduler = make_scheduler(prediction_type, timestep_spacing, num_inference_steps)
        config = self.scheduler.config
        # Dynamic thresholding with sample_max_value 1 clamps the per-sample quantile s into [1, 1],
        # so it is exactly clamp(x0, -1, 1) (docs/spec/sampling.md, step 2).
        if not (config["thresholding"] and config["sample_max_value"] == 1.0):
            raise ValueError("the sampler expects thresholding with sample_max_value 1.0")
        self.prediction_type = prediction_type
        self.timesteps: list[int] = [int(t) for t in self.scheduler.timesteps]
        self._coefficients = {t: self._coefficients_for(t) for t in self.timesteps}

    def _coefficients_for(self, t: int) -> _StepCoefficients:
        s = self.scheduler
        prev_t = int(s.previous_timestep(t))
        alpha_prod_t = s.alphas_cumprod[t]
        alpha_prod_t_prev = s.alphas_cumprod[prev_t] if prev_t >= 0 else s.one
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        return _StepCoefficients(
            sqrt_alpha_prod=alpha_prod_t ** 0.5,
            sqrt_beta_prod=beta_prod_t ** 0.5,
            x0_coeff=(alpha_prod_t_prev ** 0.5 * current_beta_t) / beta_prod_t,
            sample_coeff=current_alpha_t ** 0.5 * beta_prod_t_prev / beta_prod_t,
            std=s._get_variance(t),
            draws_noise=t > 0,
        )

    def __len__(self) -> int:
        return len(self.timesteps)

    def draws_noise(self, t: int) -> bool:
        """Whether the step at ``t`` adds variance noise (all t > 0; the official RNG order needs it)."""
        return self._coefficients[t].draws_noise

    def predict_original(self, model_output: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        c = self._coefficients[t]
        if self.prediction_type == "epsilon":
            x0 = (sample - c.sqrt_beta_prod * model_output) / c.sqrt_alpha_prod
        else:  # v_prediction
            x0 = c.sqrt_alpha_prod * sample - c.sqrt_beta_prod * model_output
        return x0.clamp(-1.0, 1.0)

    def step(self, model_output: torch.Tensor, t: int, sample: torch.Tensor,
             noise: torch.Tensor | None) -> torch.Tensor:
        """x_{t-1} from the guided model output; ``noise`` is the variance noise (None when t == 0)."""
        c = self._coefficients[t]
        x0 = self.predict_original(model_output, t, sample)
        prev = c.x0_coeff * x0 + c.sample_coeff * sample
        if c.draws_noise:
            if noise is None:
                raise ValueError(f"the step at t={t} adds variance noise; pass noise of shape {tuple(model_output.shape)}")
            prev = prev + c.std * noise
        return prev

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
        """Forward diffusion to timestep ``t`` (the key frame's noise augmentation), via diffusers."""
        # diffusers annotates the timesteps as IntTensor; the int64 tensor it gets here is what it indexes with
        return self.scheduler.add_noise(original, noise, torch.tensor([t]))  # type: ignore[arg-type]


def key_frame_sampler(steps: int = GenerationRequest.key_frame_steps) -> Sampler:
    return Sampler("epsilon", "leading", steps)


def base_frame_sampler(steps: int = GenerationRequest.base_frame_steps) -> Sampler:
    return Sampler("epsilon", "leading", steps)


def interpolation_sampler(steps: int = GenerationRequest.interpolation_steps) -> Sampler:
    return Sampler("v_prediction", "trailing", steps)
