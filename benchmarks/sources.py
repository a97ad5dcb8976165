"""What a benchmark runs on: models (random preset weights or a checkpoint) and named pipelines.

Pipelines are built lazily, in the order asked for: the fast path converts the shared networks'
convolution weights to channels-last in place, so the baseline runs before the fast path is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..models.checkpoints import KandinskyVideoModels
from ..runtime.fast_path import FastPathOptions, build_baseline_pipeline, build_fast_pipeline
from ..runtime.pipeline import KandinskyVideoPipeline

PIPELINES = ("baseline", "fast", "torch", "onnxruntime")


@dataclass(frozen=True)
class ModelSource:
    preset: str = "tiny"
    weights: str | None = None
    text_encoder: str | None = None
    seed: int = 0
    device: str = "cpu"

    def load(self) -> KandinskyVideoModels:
        from ..models.checkpoints import Precision, load_checkpoint_dir, random_models
        from ..models.presets import get_preset

        cuda = torch.device(self.device).type == "cuda"
        # U-Nets FP16 on CUDA (both paths use them so: official weights dtype); the rest FP32.
        precision = Precision(unet=torch.float16 if cuda else torch.float32)
        if self.weights:
            return load_checkpoint_dir(self.weights, self.text_encoder, device=self.device, precision=precision)
        return random_models(get_preset(self.preset), seed=self.seed, device=self.device, precision=precision)

    def describe(self) -> str:
        return f"checkpoint {self.weights}" if self.weights else f"preset {self.preset!r}, random weights seed {self.seed}"


def parse_pipelines(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in PIPELINES]
    if bad or not names:
        raise ValueError(f"--pipelines {text!r}: unknown {bad}; allowed: {', '.join(PIPELINES)}")
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
            raise ValueError("pipeline 'onnxruntime' needs --onnx-dir (a `kvt export` directory)")
        return lambda: KandinskyVideoPipeline.from_onnx(onnx_dir)
    raise ValueError(f"unknown pipeline {name!r}; allowed: {', '.join(PIPELINES)}")


def iter_pipelines(names: list[str], source: ModelSource, options: FastPathOptions,
                   onnx_dir: str | None = None) -> Iterator[tuple[str, KandinskyVideoPipeline]]:
    """(name, pipeline) in order; the models are loaded once and shared."""
    cache: dict[str, KandinskyVideoModels] = {}

    def models() -> KandinskyVideoModels:
        if "models" not in cache:
            cache["models"] = source.load()
        return cache["models"]

    for name in names:
        yield name, pipeline_factory(name, models, options, onnx_dir)()
