"""The fast path's text-only hoisting (docs/spec/deployment.md, rewrite 3): exact, and really done once per loop."""

from __future__ import annotations

import pytest
import torch

from kvt.models.presets import TINY
from kvt.models.random_weights import random_models
from kvt.models.stage_modules import stage_module, stage_table_for
from kvt.models.unet_layers import AttentionBlock, HoistedText, TextContext, text_constant, text_holders
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
    holders = text_holders(models.unet_t2v)
    blocks = [m for m in models.unet_t2v.modules() if isinstance(m, AttentionBlock)]
    assert 0 < len([m for m in holders if isinstance(m, AttentionBlock)]) < len(blocks)  # cross only
    with text_constant(models.unet_t2v):
        assert all(m._text_cache is not None for m in holders)
    assert all(m._text_cache is None for m in blocks + holders)


def test_hoisting_refuses_compile_only():
    with pytest.raises(ValueError, match="cannot be combined with torch.compile"):
        FastPathOptions(hoist_text=True, compile=True).resolved(torch.device("cpu"))
    assert FastPathOptions(compile=True).resolved(torch.device("cpu")).hoist_text is False
    assert FastPathOptions().resolved(torch.device("cpu")).hoist_text is True
    # CUDA graphs no longer turn hoisting off: the hoisted tensors are static graph inputs.
    assert FastPathOptions(cuda_graphs=True).hoist_text is None


def _text(models, seed: int) -> TextContext:
    spec = stage_table_for(models.config)["unet_t2v_video"]
    inputs = spec.sample_inputs(spec.opt_dims(), seed=seed)
    module = stage_module("unet_t2v_video", models.unet_t2v)
    return module.text_context(inputs["context"], inputs["context_mask"], inputs["context_len"], 36)


def test_hoisted_tensors_are_static_across_loops(models):
    """A refresh copies the new loop's values into the tensors already held (what a captured CUDA graph
    reads), and they equal a fresh computation."""
    hoisted = HoistedText(models.unet_t2v)
    first, second = _text(models, 1), _text(models, 2)
    assert not torch.equal(first.context, second.context)
    with torch.inference_mode():
        with hoisted.loop():
            hoisted.refresh(first)
            pointers = [[v.data_ptr() for v in h._text_cache.get(first).values()] for h in hoisted.holders]
        with hoisted.loop():
            assert all(h._text_cache.get(second) is None for h in hoisted.holders)  # invalid until refreshed
            hoisted.refresh(second)
            for holder, ptrs in zip(hoisted.holders, pointers):
                values = holder._text_cache.get(second)
                assert [v.data_ptr() for v in values.values()] == ptrs
                fresh = holder.text_work(second)
                assert all(torch.equal(values[k], fresh[k]) for k in fresh)
