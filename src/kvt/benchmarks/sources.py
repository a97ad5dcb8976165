"""What a benchmark runs on: the models of a preset or checkpoint source, and named pipelines.

Pipelines are built lazily, in the order asked for: the fast path converts the shared networks'
convolution weights to channels-last in place, so the baseline runs before the fast path is built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from kvt.contract.errors import UserError
from kvt.models.model_set import KandinskyVideoModels
from kvt.runtime.fast_path import FastPathOptions, build_baseline_pipeline, build_fast_pipeline
from kvt.runtime.loading import PipelineSource, open_models
from kvt.runtime.pipeline import KandinskyVideoPipeline

PIPELINES = ("baseline", "fast", "torch", "onnxruntime")


def parse_pipelines(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in PIPELINES]
    if bad or not names:
        raise UserError(f"--pipelines {text!r}: unknown {bad}; allowed: {', '.join(PIPELINES)}")
    return names


def pipeline_factory(name: str, models: Callable[[], KandinskyVideoModels], options: FastPathOptions,
                     onnx_dir: str | None = None) -> Callable[[], KandinskyVideoPipeline]:
    if name == "baseline":
        return lambda: build_baseline_pipeline(models())
    if name == "fast":
        return lambda: build_fast_pipeline(models(), options)
    if name == "torch":
        return lambda: KandinskyVideoPipeline.from_models(models())
    if name == "onnxruntime":
        if not onnx_dir:
            raise UserError("pipeline 'onnxruntime' needs --onnx-dir (a `kvt export` directory)")
        return lambda: KandinskyVideoPipeline.from_onnx(onnx_dir)
    raise UserError(f"unknown pipeline {name!r}; allowed: {', '.join(PIPELINES)}")


def iter_pipelines(names: list[str], source: PipelineSource, options: FastPathOptions,
                   onnx_dir: str | None = None) -> Iterator[tuple[str, KandinskyVideoPipeline]]:
    """(name, pipeline) in order; the models are loaded once and shared."""
    cache: dict[str, KandinskyVideoModels] = {}

    def models() -> KandinskyVideoModels:
        if "models" not in cache:
            cache["models"] = open_models(source)
        return cache["models"]

    for name in names:
        yield name, pipeline_factory(name, models, options, onnx_dir)()
