"""The exact cuts of the U-Net stages (issue 18, item 1): the stage contract's distinct contexts, text work
once per context, the null rows' cross-attention as a constant, the interpolation U-Net's temporal layers
on the conditional half only. Each is checked against the official per-row form (``cuts=False``, today's
math) and shown to skip the work it claims to skip.

Tolerance: float reassociation in fp32. Measured max |cut - official| per stage call on the tiny preset
<= 7.9e-7 (outputs of order 0.3) and on the small preset <= 9.0e-7; ATOL below leaves 10x room.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from kvt.contract.plan import request_plan
from kvt.contract.stages import TEXT_CONTEXTS, StageSpec
from kvt.models.presets import TINY
from kvt.models.random_weights import random_models
from kvt.models.stage_modules import stage_module, stage_table_for
from kvt.models.unet_interpolation import TemporalConv3D
from kvt.models.unet_layers import AttentionBlock, text_holders
from kvt.runtime.backends.base import DelegatingBackend, StageBackend
from kvt.runtime.backends.torch_backend import TorchBackend
from kvt.runtime.pipeline import KandinskyVideoPipeline

ATOL = 1e-5
UNET_STAGES = ("unet_t2v_image", "unet_t2v_video", "unet_interp")
STEPS = dict(key_frame_steps=2, base_frame_steps=2, interpolation_steps=2)


@pytest.fixture(scope="module")
def models():
    return random_models(TINY, seed=2)


def _unet_calls() -> list[tuple[str, dict[str, int]]]:
    seen: dict[tuple, tuple[str, dict[str, int]]] = {}
    for call in request_plan(TINY.default_width, TINY.default_height, "high", False):
        if call.stage in UNET_STAGES:
            seen.setdefault((call.stage, tuple(sorted(call.dims.items()))), (call.stage, dict(call.dims)))
    return list(seen.values())


def _run(models, stage: str, inputs: Mapping[str, torch.Tensor], cuts: bool) -> torch.Tensor:
    spec = stage_table_for(models.config)[stage]
    module = stage_module(stage, models.networks()[spec.network], cuts)
    with torch.inference_mode():
        return module(*(inputs[name] for name in spec.input_names))


@pytest.mark.parametrize("stage,dims", _unet_calls(), ids=lambda v: str(v))
def test_cuts_equal_the_official_form(models, stage, dims):
    spec = stage_table_for(models.config)[stage]
    for seed in (0, 1):
        inputs = spec.sample_inputs(dims, seed=seed)
        cut, official = _run(models, stage, inputs, True), _run(models, stage, inputs, False)
        assert (cut - official).abs().max() <= ATOL
        assert official.abs().max() > 0.05  # not vacuous
    # The row mapping matters: the same inputs with the contexts swapped give another output.
    swapped = dict(inputs, context=inputs["context"].flip(0), context_mask=inputs["context_mask"].flip(0))
    assert (_run(models, stage, swapped, False) - official).abs().max() > 1e-3


def _cross_attention_query_rows(network) -> tuple[list[int], object]:
    rows: list[int] = []
    blocks = [m for m in network.modules() if isinstance(m, AttentionBlock) and m.holds_text]
    handles = [b.attention.to_query.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[:-1].numel()))
               for b in blocks]
    return rows, handles


@pytest.mark.parametrize("stage", UNET_STAGES)
def test_null_rows_compute_no_cross_attention(models, stage):
    """Queries are computed for the prompt rows only: the null rows get the per-layer constant."""
    spec = stage_table_for(models.config)[stage]
    dims = spec.opt_dims()
    inputs = spec.sample_inputs(dims)
    network = models.networks()[spec.network]
    counts = {}
    for cuts in (False, True):
        rows, handles = _cross_attention_query_rows(network)
        _run(models, stage, inputs, cuts)
        for handle in handles:
            handle.remove()
        counts[cuts] = sum(rows)
    prompt_share = spec.text_rows.count("prompt") / len(spec.text_rows)
    assert counts[True] == pytest.approx(counts[False] * prompt_share)
    assert 0 < counts[True] < counts[False]


def test_interpolation_temporal_layers_run_on_the_conditional_half(models):
    spec = stage_table_for(models.config)["unet_interp"]
    inputs = spec.sample_inputs({"N": 22, "h": 8, "w": 8})
    convs = [m.temporal_projection for m in models.unet_interpolation.modules() if isinstance(m, TemporalConv3D)]
    assert convs
    for cuts, clips in ((False, 2), (True, 1)):
        seen: list[int] = []
        hook = (lambda record: lambda _m, args, _o: record.append(args[0].shape[0]))(seen)
        handles = [c.register_forward_hook(hook) for c in convs]
        _run(models, "unet_interp", inputs, cuts)
        for handle in handles:
            handle.remove()
        assert set(seen) == {clips}, f"cuts={cuts}: Conv3d batches {set(seen)}"  # one batch item per clip
    # The unconditional half is a pass-through of the temporal layers only because its mask is 0: with
    # the mask on there, the official form changes and so the cut would not be exact.
    on = dict(inputs, temporal_mask=torch.ones(22))
    assert (_run(models, "unet_interp", on, False) - _run(models, "unet_interp", inputs, False))[11:].abs().max() > 1e-3


def test_text_work_is_done_once_per_context(models):
    """Keys/values for the prompt context only (the null context's constant needs its value row alone)."""
    spec = stage_table_for(models.config)["unet_t2v_video"]
    inputs = spec.sample_inputs(spec.opt_dims())
    module = stage_module("unet_t2v_video", models.unet_t2v)
    text = module.text_context(inputs["context"], inputs["context_mask"], inputs["context_len"], 36)
    for holder in text_holders(models.unet_t2v):
        work = holder.text_work(text)
        if isinstance(holder, AttentionBlock):
            assert set(work) == {"key0", "value0", "constant1"}
            assert work["key0"].shape[0] == 1 and work["constant1"].shape == (1, holder.attention.output_layer.out_features)
        else:
            assert work["pooled"].shape[0] == len(TEXT_CONTEXTS)


class _Recorder(DelegatingBackend):
    """Records the bytes of every stage call's inputs."""

    def __init__(self, inner: StageBackend) -> None:
        super().__init__(inner)
        self.calls: list[tuple[str, dict[str, int], int]] = []

    def _run(self, stage, inputs):
        spec: StageSpec = self.table[stage]
        sent = sum(t.numel() * t.element_size() for t in inputs.values())
        self.calls.append((stage, spec.bind_dims(inputs), sent))
        return self.inner.run(stage, inputs)


def _pipeline(models, cuts: bool) -> tuple[KandinskyVideoPipeline, _Recorder]:
    recorder = _Recorder(TorchBackend(models, cuts=cuts))
    pipe = KandinskyVideoPipeline(recorder, models.tokenizer, models.t2v_null_embedding,
                                  models.interpolation_null_embedding, (TINY.default_width, TINY.default_height))
    return pipe, recorder


def test_pipeline_with_cuts_equals_the_official_form_and_sends_what_the_table_says(models):
    cut_pipe, recorder = _pipeline(models, True)
    official_pipe, _ = _pipeline(models, False)
    cut = cut_pipe("a red fox", fps="medium", seed=4, progress=False, **STEPS)
    official = official_pipe("a red fox", fps="medium", seed=4, progress=False, **STEPS)
    assert (cut.latents - official.latents).abs().max() <= 1e-4
    assert abs(cut.frames.astype(int) - official.frames.astype(int)).max() <= 1
    table = stage_table_for(models.config)
    unet_calls = [c for c in recorder.calls if c[0] in UNET_STAGES]
    assert {c[0] for c in unet_calls} == set(UNET_STAGES)
    for stage, dims, sent in recorder.calls:
        assert sent == table[stage].input_bytes(dims), stage
    # The text inputs are the two distinct contexts, whatever the rows: context, mask and L per context.
    S, D = table.model.tokens_length, table.model.context_dim
    per_context = S * D * 4 + S + 4
    for stage, dims, sent in unet_calls:
        without_text = sum(t.numel() * t.element_size() for name, t in table[stage].sample_inputs(dims).items()
                           if not name.startswith("context"))
        assert sent == without_text + len(TEXT_CONTEXTS) * per_context, stage
