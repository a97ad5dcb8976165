"""The fast path's text-only hoisting (docs/spec/deployment.md, rewrite 3): exact, and really done once per loop."""

from __future__ import annotations

import pytest
import torch

from kvt.models.presets import TINY
from kvt.models.random_weights import random_models
from kvt.models.unet_layers import AttentionBlock, text_constant
from kvt.runtime.fast_path import FastPathOptions, build_fast_pipeline

STEPS = dict(key_frame_steps=3, base_frame_steps=3, interpolation_steps=2)


@pytest.fixture(scope="module")
def models():
    return random_models(TINY, seed=3)


def _cross_attention_blocks(network) -> list[AttentionBlock]:
    return [m for m in network.modules()
            if isinstance(m, AttentionBlock) and m.attention.to_key.in_features != m.attention.to_query.in_features]


def test_hoisting_is_exact_and_runs_text_work_once_per_loop(models):
    plain = build_fast_pipeline(models, FastPathOptions(hoist_text=False))
    hoisted = build_fast_pipeline(models, FastPathOptions(hoist_text=True))
    assert hoisted.backend.options.hoist_text and not plain.backend.options.hoist_text
    t2v, interp = _cross_attention_blocks(models.unet_t2v), _cross_attention_blocks(models.unet_interpolation)
    assert t2v and interp
    calls = [0]
    for block in t2v + interp:
        block.attention.to_key.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    a = plain("a cat", fps="medium", seed=5, progress=False, **STEPS)
    plain_calls, calls[0] = calls[0], 0
    b = hoisted("a cat", fps="medium", seed=5, progress=False, **STEPS)
    assert torch.equal(a.latents, b.latents) and (a.frames == b.frames).all(), "hoisting changed the math"
    # Per step without hoisting (3 key-frame + 3 base-frame steps on the t2v U-Net, 2 interpolation
    # steps); once per loop with it (two t2v loops, one interpolation pass).
    assert plain_calls == 6 * len(t2v) + 2 * len(interp)
    assert calls[0] == 2 * len(t2v) + 1 * len(interp)


def test_cache_is_dropped_after_the_loop(models):
    with text_constant(models.unet_t2v):
        holders = [m for m in models.unet_t2v.modules() if isinstance(m, AttentionBlock)]
        assert all(m._text_cache == {} for m in holders)
    assert all(m._text_cache is None for m in holders)


def test_hoisting_refuses_cuda_graphs_and_compile():
    with pytest.raises(ValueError, match="cannot be combined with CUDA graphs or torch.compile"):
        FastPathOptions(hoist_text=True, compile=True).resolved(torch.device("cpu"))
    assert FastPathOptions(compile=True).resolved(torch.device("cpu")).hoist_text is False
    assert FastPathOptions().resolved(torch.device("cpu")).hoist_text is True
