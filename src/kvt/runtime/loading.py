"""Where a pipeline's networks come from, and how it is opened: one source type for every kind.

A :class:`PipelineSource` names a preset (seeded random weights), a checkpoint directory in the
official layout, an ONNX export (``kvt export``) or an engine directory (``kvt build``). Before loading
anything it answers what a caller validates a request against (:meth:`PipelineSource.stage_table`,
:meth:`PipelineSource.default_size`); :func:`open_parts` then builds the backend and reads the tokenizer
and null embeddings. :class:`kvt.runtime.pipeline.KandinskyVideoPipeline` is made from those parts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvt.contract.errors import UserError
from kvt.contract.stages import StageTable, any_size_range
from kvt.formats.engine_dir import EngineManifest, EngineManifestError, stage_table_of
from kvt.formats.export_dir import ExportManifest, ExportManifestError
from kvt.models.checkpoints import check_checkpoint_dir, load_checkpoint_dir
from kvt.models.configs import KandinskyVideoConfig
from kvt.models.model_set import KandinskyVideoModels, Precision
from kvt.models.presets import get_preset, preset_for_config
from kvt.models.random_weights import random_models
from kvt.models.stage_modules import stage_table_for
from kvt.models.text_encoder import PromptTokenizer
from kvt.runtime.backends.base import StageBackend
from kvt.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from kvt.runtime.backends.tensorrt.backend import TensorRTBackend
from kvt.runtime.backends.torch_backend import TorchBackend

SOURCE_KINDS = ("preset", "checkpoint", "onnx", "engines")


@dataclass(frozen=True)
class PipelineParts:
    """What a pipeline is made of."""

    backend: StageBackend
    tokenizer: PromptTokenizer
    t2v_null_embedding: torch.Tensor
    interpolation_null_embedding: torch.Tensor
    default_size: tuple[int, int]


@dataclass(frozen=True)
class PipelineSource:
    """One source of networks. Build it with :meth:`preset`, :meth:`checkpoint`, :meth:`onnx` or
    :meth:`engines`; ``options`` holds the kind's loading options (device, dtypes, providers...)."""

    kind: str
    path: Path | None = None
    preset_name: str = "tiny"
    seed: int = 0
    text_encoder_dir: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise UserError(f"pipeline source kind {self.kind!r}: allowed: {', '.join(SOURCE_KINDS)}")

    # ------------------------------------------------------------------ constructors

    @classmethod
    def preset(cls, name: str = "tiny", seed: int = 0, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, init_on_device: bool = False) -> PipelineSource:
        """``init_on_device``: draw the random weights on ``device`` (see random_models)."""
        return cls("preset", preset_name=name, seed=seed,
                   options={"device": device, "dtype": dtype, "init_on_device": init_on_device})

    @classmethod
    def checkpoint(cls, path: str | Path, text_encoder_dir: str | Path | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   text_encoder_dtype: torch.dtype = torch.float32,
                   movq_dtype: torch.dtype = torch.float32) -> PipelineSource:
        return cls("checkpoint", path=Path(path),
                   text_encoder_dir=Path(text_encoder_dir) if text_encoder_dir is not None else None,
                   options={"device": device, "dtype": dtype, "text_encoder_dtype": text_encoder_dtype,
                            "movq_dtype": movq_dtype})

    @classmethod
    def onnx(cls, export_dir: str | Path, providers: list[str] | str | None = None,
             device: str | torch.device | None = None, session_options: Any = None) -> PipelineSource:
        return cls("onnx", path=Path(export_dir),
                   options={"providers": providers, "device": device, "session_options": session_options})

    @classmethod
    def engines(cls, engine_dir: str | Path, device: str | torch.device = "cuda",
                cuda_graphs: bool = False) -> PipelineSource:
        return cls("engines", path=Path(engine_dir), options={"device": device, "cuda_graphs": cuda_graphs})

    @property
    def device(self) -> torch.device:
        return torch.device(self.options.get("device") or ("cuda" if self.kind == "engines" else "cpu"))

    # ------------------------------------------------------------------ what it serves (nothing loaded)

    def _path(self) -> Path:
        assert self.path is not None, f"a {self.kind} source has a path"
        return self.path

    def _config(self) -> KandinskyVideoConfig:
        if self.kind == "preset":
            return get_preset(self.preset_name).config
        config, _ = check_checkpoint_dir(self._path(), self.text_encoder_dir)
        return config

    def stage_table(self) -> StageTable:
        """The stage table the source serves (its frame-size range), from its files or preset only: the
        built range of engines; every size within the memory-based limit on torch and ONNX Runtime
        (``StageBackend.any_frame_size``)."""
        if self.kind == "engines":
            return stage_table_of(EngineManifest.read(self._path()), self._path())
        table = (ExportManifest.read(self._path()).stage_table() if self.kind == "onnx"
                 else stage_table_for(self._config()))
        return table.with_resolution(any_size_range(table.resolution.opt))

    def default_size(self) -> tuple[int, int]:
        """(width, height) of a request that gives none: a preset's own, else the range's opt."""
        if self.kind in ("preset", "checkpoint"):
            return default_size_for(self._config())
        opt = self.stage_table().resolution.opt
        return (opt, opt)

    def describe(self) -> str:
        if self.kind == "preset":
            return (f"the embedded {self.preset_name!r} preset with seeded random weights (seed {self.seed}; "
                    "the video is noise)")
        return {"checkpoint": "weights", "onnx": "ONNX export", "engines": "TensorRT engines"}[self.kind] + \
            f" {self.path}"


# ---------------------------------------------------------------------------------------- opening

def default_unet_dtype(device: str | torch.device) -> torch.dtype:
    """float16 on CUDA, as the official release runs the U-Nets; float32 on CPU."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def default_size_for(config: KandinskyVideoConfig) -> tuple[int, int]:
    """A preset's default frame size when ``config`` is that preset's; otherwise the official 512."""
    preset = preset_for_config(config)
    return (preset.default_width, preset.default_height) if preset else (512, 512)


def parts_from_models(models: KandinskyVideoModels, default_size: tuple[int, int] | None = None,
                      validate: bool = True, backend: StageBackend | None = None) -> PipelineParts:
    """Parts of a torch pipeline over already loaded networks (or over ``backend`` built on them)."""
    return PipelineParts(backend or TorchBackend(models, validate=validate), models.tokenizer,
                         models.t2v_null_embedding, models.interpolation_null_embedding,
                         default_size or default_size_for(models.config))


def read_assets(tokenizer_dir: Path, null_path: Path, table: StageTable,
                error: Callable[[str], Exception]) -> tuple[PromptTokenizer, dict[str, torch.Tensor]]:
    """The tokenizer and null embeddings an export (or engine directory) carries, checked against the
    stage table; a missing or malformed one raises ``error`` naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tokenizer = PromptTokenizer(tokenizer_dir, table.model.tokens_length)
    except (OSError, ValueError) as exc:
        raise error(f"{tokenizer_dir}: could not load the tokenizer ({exc})") from None
    try:
        nulls = load_file(str(null_path))
    except (OSError, SafetensorError) as exc:
        raise error(f"{null_path}: could not read the null embeddings ({exc})") from None
    for key in ("t2v", "interpolation"):
        value = nulls.get(key)
        if value is None or tuple(value.shape) != (table.model.context_dim,):
            found = "missing" if value is None else f"shape {list(value.shape)}"
            raise error(f"{null_path}: null embedding {key!r} is {found}, expected "
                        f"float32 [{table.model.context_dim}]")
    return tokenizer, nulls


def _open_onnx(source: PipelineSource) -> PipelineParts:
    export_dir = source._path()
    manifest = ExportManifest.read(export_dir)
    table = manifest.stage_table()
    tokenizer, nulls = read_assets(export_dir / manifest.assets["tokenizer"],
                                   export_dir / manifest.assets["null_embeddings"], table, ExportManifestError)
    options = source.options
    backend = OnnxRuntimeBackend(export_dir, providers=options.get("providers"), device=options.get("device"),
                                 stages=list(table.names), session_options=options.get("session_options"))
    opt = table.resolution.opt
    return PipelineParts(backend, tokenizer, nulls["t2v"], nulls["interpolation"], (opt, opt))


def _open_engines(source: PipelineSource) -> PipelineParts:
    engine_dir = source._path()
    manifest = EngineManifest.read(engine_dir)
    table = stage_table_of(manifest, engine_dir)
    assets = manifest.onnx_manifest.get("assets") or ExportManifest.default_assets()

    def asset(name: str) -> Path:
        for base in (engine_dir, Path(manifest.onnx_dir)):
            if (base / assets[name]).exists():
                return base / assets[name]
        raise EngineManifestError(f"{engine_dir}: asset {assets[name]!r} is neither in the engine directory "
                                  f"nor in the export {manifest.onnx_dir}; rerun `kvt build`")

    tokenizer, nulls = read_assets(asset("tokenizer"), asset("null_embeddings"), table, EngineManifestError)
    # Every stage with a plan is loaded; a stage built for no requested mode (the interpolation U-Net
    # of a build for fps low only) fails when called, naming the stage.
    backend = TensorRTBackend(engine_dir, device=source.options.get("device", "cuda"),
                              cuda_graphs=bool(source.options.get("cuda_graphs", False)))
    opt = table.resolution.opt
    return PipelineParts(backend, tokenizer, nulls["t2v"], nulls["interpolation"], (opt, opt))


def open_models(source: PipelineSource) -> KandinskyVideoModels:
    """The torch networks of a preset or checkpoint source."""
    options = source.options
    device = options.get("device") or "cpu"
    unet = options.get("dtype") or default_unet_dtype(device)
    if source.kind == "preset":
        return random_models(get_preset(source.preset_name), seed=source.seed, device=device,
                             precision=Precision(unet=unet), init_on_device=bool(options.get("init_on_device")))
    if source.kind == "checkpoint":
        precision = Precision(unet=unet, text_encoder=options.get("text_encoder_dtype", torch.float32),
                              movq=options.get("movq_dtype", torch.float32))
        return load_checkpoint_dir(source._path(), source.text_encoder_dir, device=device, precision=precision)
    raise UserError(f"a {source.kind} source has no torch networks")


def open_parts(source: PipelineSource) -> PipelineParts:
    """Build the backend of ``source`` and read what the pipeline needs beside it."""
    if source.kind == "onnx":
        return _open_onnx(source)
    if source.kind == "engines":
        return _open_engines(source)
    models = open_models(source)
    size = None
    if source.kind == "preset":
        preset = get_preset(source.preset_name)
        size = (preset.default_width, preset.default_height)
    return parts_from_models(models, default_size=size)
