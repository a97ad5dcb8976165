"""Classifier-free guidance of the three loops, in the official evaluation order (docs/spec/quirks.md, quirk 23).

The batch layouts are fixed by the pipeline: loop A and C stack [conditional | unconditional], loop B
stacks [prompt + image | null prompt + image | null prompt, no image].
"""

from __future__ import annotations

import torch


def two_way(prediction: torch.Tensor, scale: float) -> torch.Tensor:
    """(w + 1) * cond - w * uncond (key frame: w = 5; interpolation: w = 0.5)."""
    cond, uncond = prediction.chunk(2)
    return (scale + 1.0) * cond - scale * uncond


def three_way(prediction: torch.Tensor, weight_prompt: float, weight_image: float) -> torch.Tensor:
    """(1 - w_I) * uncond + (w_I - w_T) * image_only + w_T * full (base frames: w_T = 5, w_I = 2)."""
    full, image_only, uncond = prediction.chunk(3)
    return (1 - weight_image) * uncond + (weight_image - weight_prompt) * image_only + weight_prompt * full
