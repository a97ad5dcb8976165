"""Checkpoint directories in the official Kandinsky Video 1.1 layout: strict loading and writing.

Layout (what ``ai-forever/KandinskyVideo_1_1`` ships, plus the Flan-UL2 folder it points at)::

    configs.json          {"t2v": {"configs": ...}, "interpolation": ..., "text_encoder": {...}, ...}
    t2v.pt                {"unet": state_dict, "null_embedding": [D]}
    interpolation.pt      {"unet": state_dict, "null_embedding": [D]}
    movq.pt               flat MoVQ state_dict
    video_movq.pt         flat MoVQ state_dict (temporal decoder)
    t5_projections.pt     {"projection_base": {...}, "projection_interpolation": {...}}
    <text encoder folder> transformers T5 folder (config.json, weights, spiece.model)

Loading is strict: every key present, none extra, every shape right; otherwise a
:class:`CheckpointError` names the file, the keys (first few and the count) and the expected shapes.
Architecture variants that configs cannot pin (spec quirk 34) are decided by the key set. Networks are
built on the meta device and filled with ``load_state_dict(assign=True)`` from memory-mapped files, so a
full-size load needs no second copy of the weights. ``.pt`` files are read with ``weights_only=True``:
a pickle that would run code is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import re
import shutil
import uuid
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .configs import ConfigError, KandinskyVideoConfig
from .init import random_null_embedding, randomize_
from .presets import TEXT_ENCODER_FOLDER, Preset
from .text_encoder import PROJECTION_HEADS, TINY_TOKENIZER_DIR, PromptTokenizer, TextEncoder

log = logging.getLogger(__name__)

CONFIGS_FILE = "configs.json"
T2V_FILE = "t2v.pt"
INTERPOLATION_FILE = "interpolation.pt"
IMAGE_MOVQ_FILE = "movq.pt"
VIDEO_MOVQ_FILE = "video_movq.pt"
PROJECTIONS_FILE = "t5_projections.pt"
REQUIRED_FILES = (CONFIGS_FILE, T2V_FILE, INTERPOLATION_FILE, IMAGE_MOVQ_FILE, VIDEO_MOVQ_FILE,
                  PROJECTIONS_FILE)

# Per-network seed offsets for random weights (same spirit as the reference data's per-network seeds).
_SEED_OFFSETS = {"t2v": 1, "interpolation": 2, "image_movq": 3, "video_movq": 4, "t5": 5,
                 "projections": 6}
_NULL_SEED_OFFSET = 50
_OUTPUT_SCALES = {"unet": {"out_layer.2": 0.1}, "movq": {"decoder.conv_out": 0.5}}

_SHOW_KEYS = 5


class CheckpointError(ValueError):
    """A checkpoint file or folder is missing, unreadable, or does not match the architecture."""


# ----------------------------------------------------------------------------------------------
# strict state-dict checking
# ----------------------------------------------------------------------------------------------

def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW_KEYS])
    more = f", ... ({len(keys)} in all)" if len(keys) > _SHOW_KEYS else f" ({len(keys)})"
    return shown + more


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` has exactly ``module``'s keys and shapes."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    mismatched = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    problems = []
    if missing:
        problems.append(
            "missing keys: " + _listing([f"{k} {list(expected[k])}" for k in missing])
        )
    if unexpected:
        problems.append("unexpected keys: " + _listing(unexpected))
    if mismatched:
        problems.append(
            "mis-shaped keys: "
            + _listing([f"{k} expected {list(expected[k])} got {list(found[k])}" for k in mismatched])
        )
    if not_tensors:
        problems.append("entries that are not tensors: " + _listing(not_tensors))
    if problems:
        raise CheckpointError(f"{where}: does not match the architecture; " + "; ".join(problems))


def _no_meta_left(module: nn.Module, where: str) -> None:
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{where}: tensors left unloaded: {_listing(left)}")


# ----------------------------------------------------------------------------------------------
# reading .pt files safely
# ----------------------------------------------------------------------------------------------

def read_torch_file(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True`` (no arbitrary objects) and mmap; clear errors."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to unpickle: the file contains objects other than tensors and plain "
            f"containers ({str(exc).splitlines()[0]}). Only weight files are loaded."
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: unreadable or corrupted checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})"
        ) from None


def _split_unet_file(data: Any, path: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    if not isinstance(data, Mapping) or "unet" not in data or "null_embedding" not in data:
        keys = sorted(data.keys()) if isinstance(data, Mapping) else type(data).__name__
        raise CheckpointError(
            f"{path}: expected a dict with 'unet' (state dict) and 'null_embedding', found {keys}"
        )
    null = data["null_embedding"]
    if not isinstance(null, torch.Tensor):
        raise CheckpointError(f"{path}: 'null_embedding' is not a tensor")
    return data["unet"], null.reshape(-1).float()


def _check_null_embedding(null: torch.Tensor, context_dim: int, path: Path) -> torch.Tensor:
    if null.numel() != context_dim:
        raise CheckpointError(
            f"{path}: null_embedding has {null.numel()} values, expected context_dim={context_dim}"
        )
    return null.clone()


# ----------------------------------------------------------------------------------------------
# architecture variants decided by the key set (spec quirk 34)
# ----------------------------------------------------------------------------------------------

_ADD_CONV_KEY = re.compile(r"^decoder\..*norm[^.]*\.conv\.(weight|bias)$")

VariantRule = Callable[[set[str]], bool]
VARIANT_RULES: dict[str, dict[str, VariantRule]] = {
    "t2v": {
        "noise_augmentation": lambda keys: "temporal_noise_aug_time_encoding.1.weight" in keys,
        "motion_score": lambda keys: "temporal_motion_score_encoding.1.weight" in keys,
    },
    "interpolation": {
        "add_new_temporal_params": lambda keys: any(k.startswith("temporal_conv_in.") for k in keys),
    },
    "image_movq": {
        "add_conv": lambda keys: any(_ADD_CONV_KEY.match(k) for k in keys),
    },
    "video_movq": {
        "add_conv": lambda keys: any(_ADD_CONV_KEY.match(k) for k in keys),
        "flicker_augmentation": lambda keys: any(
            k.startswith("decoder.mid.block_1.temporal_flicker_proj.") for k in keys),
    },
}


def apply_key_variants(network: str, config: Any, keys: set[str], where: str) -> Any:
    """Return ``config`` with the flags the key set decides; say when configs.json disagreed."""
    changes = {}
    for flag, rule in VARIANT_RULES.get(network, {}).items():
        detected = rule(keys)
        if getattr(config, flag) != detected:
            log.warning("%s: configs.json has %s=%s but the checkpoint's keys are those of %s=%s; "
                        "using the checkpoint's", where, flag, getattr(config, flag), flag, detected)
            changes[flag] = detected
    return dataclasses.replace(config, **changes) if changes else config


# ----------------------------------------------------------------------------------------------
# the loaded model set
# ----------------------------------------------------------------------------------------------

@dataclass
class KandinskyVideoModels:
    """Every network of the pipeline, loaded and in eval mode, plus what the loops need beside them."""

    config: KandinskyVideoConfig
    unet_t2v: nn.Module
    unet_interpolation: nn.Module
    image_movq: nn.Module
    video_movq: nn.Module
    text_encoder: TextEncoder
    tokenizer: PromptTokenizer
    t2v_null_embedding: torch.Tensor  # [D] fp32, loops A and B
    interpolation_null_embedding: torch.Tensor  # [D] fp32, loop C
    source: str

    @property
    def context_dim(self) -> int:
        return self.config.text_encoder.context_dim

    @property
    def tokens_length(self) -> int:
        return self.config.text_encoder.tokens_length

    def networks(self) -> dict[str, nn.Module]:
        return {
            "unet_t2v": self.unet_t2v, "unet_interpolation": self.unet_interpolation,
            "image_movq": self.image_movq, "video_movq": self.video_movq,
            "text_encoder": self.text_encoder,
        }


@dataclass(frozen=True)
class Precision:
    """Weight dtypes per network family (official: U-Nets fp16 on GPU, T5 and MoVQs fp32)."""

    unet: torch.dtype = torch.float32
    text_encoder: torch.dtype = torch.float32
    movq: torch.dtype = torch.float32


def _network_classes() -> dict[str, type]:
    from .movq import MoVQ
    from .unet_interpolation import UNetInterpolation
    from .unet_t2v import UNetT2V

    return {"t2v": UNetT2V, "interpolation": UNetInterpolation, "image_movq": MoVQ,
            "video_movq": MoVQ}


def _finish(module: nn.Module, device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _load_network(network: str, config: Any, state_dict: Mapping[str, torch.Tensor], path: Path,
                  device: torch.device | str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    config = apply_key_variants(network, config, set(state_dict), str(path))
    cls = _network_classes()[network]
    with torch.device("meta"):
        module = cls(config)
    check_state_dict(module, state_dict, str(path))
    module.load_state_dict(state_dict, strict=True, assign=True)
    _no_meta_left(module, str(path))
    return _finish(module, device, dtype), config


def resolve_text_encoder_dir(checkpoint_dir: Path, config: KandinskyVideoConfig,
                             text_encoder_dir: str | Path | None) -> Path:
    """The Flan-UL2 folder: ``text_encoder_dir`` if given, else configs.json's ``weights_path``
    (absolute, or relative to the checkpoint directory). Never a hub download."""
    if text_encoder_dir is not None:
        path = Path(text_encoder_dir)
        if not path.is_dir():
            raise CheckpointError(f"text encoder folder {path} does not exist (from --text-encoder)")
        return path
    declared = Path(config.text_encoder.weights_path)
    for candidate in ([declared] if declared.is_absolute() else [checkpoint_dir / declared]):
        if candidate.is_dir():
            return candidate
    raise CheckpointError(
        f"{checkpoint_dir / CONFIGS_FILE}: text_encoder.weights_path={str(declared)!r} is not a folder "
        f"(looked for {checkpoint_dir / declared if not declared.is_absolute() else declared}); "
        "models are never downloaded: pass --text-encoder DIR (a Flan-UL2 folder in transformers "
        "format with spiece.model)"
    )


def missing_files(checkpoint_dir: str | Path) -> list[str]:
    checkpoint_dir = Path(checkpoint_dir)
    return [name for name in REQUIRED_FILES if not (checkpoint_dir / name).is_file()]


def check_checkpoint_dir(checkpoint_dir: str | Path,
                         text_encoder_dir: str | Path | None = None) -> tuple[KandinskyVideoConfig, Path]:
    """Cheap checks before any loading: folder, files, configs.json and the text encoder folder."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {checkpoint_dir} does not exist")
    missing = missing_files(checkpoint_dir)
    if missing:
        raise CheckpointError(
            f"{checkpoint_dir}: missing checkpoint file(s) {missing}; a Kandinsky Video 1.1 directory "
            f"holds {list(REQUIRED_FILES)} and a Flan-UL2 folder"
        )
    try:
        config = KandinskyVideoConfig.from_json(checkpoint_dir / CONFIGS_FILE)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    t5_dir = resolve_text_encoder_dir(checkpoint_dir, config, text_encoder_dir)
    if not (t5_dir / "config.json").is_file():
        raise CheckpointError(f"{t5_dir}: not a transformers model folder (no config.json)")
    return config, t5_dir


def load_text_encoder(t5_dir: Path, projections_path: Path, context_dim: int,
                      device: torch.device | str, dtype: torch.dtype) -> TextEncoder:
    from transformers import T5Config, T5EncoderModel
    from transformers.utils import logging as hf_logging

    try:
        t5_config = T5Config.from_pretrained(str(t5_dir))
    except Exception as exc:  # transformers raises several types for a bad config.json
        raise CheckpointError(f"{t5_dir / 'config.json'}: not a T5 config ({exc})") from None
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            t5, info = T5EncoderModel.from_pretrained(
                str(t5_dir), dtype=torch.float32, output_loading_info=True)
        except Exception as exc:
            raise CheckpointError(f"{t5_dir}: could not load the T5 encoder ({exc})") from None
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise CheckpointError(f"{t5_dir}: T5 encoder weights do not match its config.json: {problems}")

    projections = read_torch_file(projections_path)
    if not isinstance(projections, Mapping) or set(PROJECTION_HEADS) - set(projections):
        found = sorted(projections) if isinstance(projections, Mapping) else type(projections).__name__
        raise CheckpointError(
            f"{projections_path}: expected a dict with {list(PROJECTION_HEADS)}, found {found}")
    encoder = TextEncoder(t5, context_dim)
    if encoder.projection_base[0].in_features != t5_config.d_model:
        raise CheckpointError(f"{t5_dir}: d_model={t5_config.d_model} does not fit the projections")
    for head in PROJECTION_HEADS:
        check_state_dict(getattr(encoder, head), projections[head], f"{projections_path}:{head}")
        getattr(encoder, head).load_state_dict(projections[head], strict=True)
    return _finish(encoder, device, dtype)


def load_checkpoint_dir(
    checkpoint_dir: str | Path,
    text_encoder_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    precision: Precision = Precision(),
) -> KandinskyVideoModels:
    """Load every network of a checkpoint directory in the official layout (strict)."""
    checkpoint_dir = Path(checkpoint_dir)
    config, t5_dir = check_checkpoint_dir(checkpoint_dir, text_encoder_dir)
    context_dim = config.text_encoder.context_dim

    t2v_sd, t2v_null = _split_unet_file(read_torch_file(checkpoint_dir / T2V_FILE),
                                        checkpoint_dir / T2V_FILE)
    unet_t2v, t2v_cfg = _load_network("t2v", config.t2v, t2v_sd, checkpoint_dir / T2V_FILE,
                                      device, precision.unet)
    del t2v_sd
    interp_sd, interp_null = _split_unet_file(read_torch_file(checkpoint_dir / INTERPOLATION_FILE),
                                              checkpoint_dir / INTERPOLATION_FILE)
    unet_interp, interp_cfg = _load_network("interpolation", config.interpolation, interp_sd,
                                            checkpoint_dir / INTERPOLATION_FILE, device, precision.unet)
    del interp_sd
    image_movq, image_cfg = _load_network(
        "image_movq", config.image_movq, _flat_state_dict(checkpoint_dir / IMAGE_MOVQ_FILE),
        checkpoint_dir / IMAGE_MOVQ_FILE, device, precision.movq)
    video_movq, video_cfg = _load_network(
        "video_movq", config.video_movq, _flat_state_dict(checkpoint_dir / VIDEO_MOVQ_FILE),
        checkpoint_dir / VIDEO_MOVQ_FILE, device, precision.movq)
    text_encoder = load_text_encoder(t5_dir, checkpoint_dir / PROJECTIONS_FILE, context_dim, device,
                                     precision.text_encoder)
    try:
        tokenizer = PromptTokenizer(t5_dir, config.text_encoder.tokens_length)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise CheckpointError(f"{t5_dir}: could not load the T5 tokenizer ({exc})") from None

    config = config.replace(t2v=t2v_cfg, interpolation=interp_cfg, image_movq=image_cfg,
                            video_movq=video_cfg)
    return KandinskyVideoModels(
        config=config,
        unet_t2v=unet_t2v,
        unet_interpolation=unet_interp,
        image_movq=image_movq,
        video_movq=video_movq,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        t2v_null_embedding=_check_null_embedding(t2v_null, context_dim, checkpoint_dir / T2V_FILE),
        interpolation_null_embedding=_check_null_embedding(
            interp_null, context_dim, checkpoint_dir / INTERPOLATION_FILE),
        source=str(checkpoint_dir),
    )


def _flat_state_dict(path: Path) -> dict[str, torch.Tensor]:
    data = read_torch_file(path)
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: expected a flat state dict, found {type(data).__name__}")
    return dict(data)


# ----------------------------------------------------------------------------------------------
# random weights, in memory or written in the official layout
# ----------------------------------------------------------------------------------------------

def random_models(
    preset: Preset,
    seed: int = 0,
    device: torch.device | str = "cpu",
    precision: Precision = Precision(),
    tokenizer_dir: str | Path | None = None,
) -> KandinskyVideoModels:
    """Every network of ``preset`` with seeded random weights (no files needed).

    The tokenizer comes from ``tokenizer_dir`` or the tiny SentencePiece model shipped with the
    package (its ids fit any preset's vocabulary; use a real Flan-UL2 folder for real prompts).
    """
    from transformers import T5Config, T5EncoderModel

    config = preset.config
    classes = _network_classes()

    def build(network: str, cfg: Any, dtype: torch.dtype, scales: dict[str, float]) -> nn.Module:
        module = classes[network](cfg)
        randomize_(module, seed + _SEED_OFFSETS[network], scales)
        return _finish(module, device, dtype)

    t5 = T5EncoderModel(T5Config(**preset.t5))
    text_encoder = TextEncoder(t5, config.text_encoder.context_dim)
    randomize_(text_encoder.t5, seed + _SEED_OFFSETS["t5"])
    randomize_(text_encoder.projection_base, seed + _SEED_OFFSETS["projections"])
    randomize_(text_encoder.projection_interpolation, seed + _SEED_OFFSETS["projections"] + 100)
    context_dim = config.text_encoder.context_dim
    return KandinskyVideoModels(
        config=config,
        unet_t2v=build("t2v", config.t2v, precision.unet, _OUTPUT_SCALES["unet"]),
        unet_interpolation=build("interpolation", config.interpolation, precision.unet,
                                 _OUTPUT_SCALES["unet"]),
        image_movq=build("image_movq", config.image_movq, precision.movq, _OUTPUT_SCALES["movq"]),
        video_movq=build("video_movq", config.video_movq, precision.movq, _OUTPUT_SCALES["movq"]),
        text_encoder=_finish(text_encoder, device, precision.text_encoder),
        tokenizer=PromptTokenizer(tokenizer_dir or TINY_TOKENIZER_DIR, config.text_encoder.tokens_length),
        t2v_null_embedding=random_null_embedding(context_dim, seed + _SEED_OFFSETS["t2v"] + _NULL_SEED_OFFSET),
        interpolation_null_embedding=random_null_embedding(
            context_dim, seed + _SEED_OFFSETS["interpolation"] + _NULL_SEED_OFFSET),
        source=f"preset {preset.name!r}, random weights, seed {seed}",
    )


def write_checkpoint_dir(models: KandinskyVideoModels, out_dir: str | Path, overwrite: bool = False,
                         dtype: torch.dtype | None = None) -> Path:
    """Write ``models`` as a complete checkpoint directory in the official layout.

    The directory is assembled under a temporary name beside ``out_dir`` and renamed when complete, so
    a failed or interrupted write never leaves a directory that looks complete. ``dtype`` optionally
    casts floating weights (e.g. float16 to halve the size of full-size U-Nets).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()

    def sd(module: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in module.state_dict().items():
            v = v.detach().cpu()
            out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
        return {k: v.contiguous().clone() for k, v in out.items()}

    try:
        config = models.config.replace(
            text_encoder=dataclasses.replace(models.config.text_encoder, weights_path=TEXT_ENCODER_FOLDER))
        (tmp / CONFIGS_FILE).write_text(json.dumps(config.to_dict(), indent=1) + "\n")
        torch.save({"unet": sd(models.unet_t2v), "null_embedding": models.t2v_null_embedding.cpu()},
                   tmp / T2V_FILE)
        torch.save({"unet": sd(models.unet_interpolation),
                    "null_embedding": models.interpolation_null_embedding.cpu()}, tmp / INTERPOLATION_FILE)
        torch.save(sd(models.image_movq), tmp / IMAGE_MOVQ_FILE)
        torch.save(sd(models.video_movq), tmp / VIDEO_MOVQ_FILE)
        torch.save({head: sd(getattr(models.text_encoder, head)) for head in PROJECTION_HEADS},
                   tmp / PROJECTIONS_FILE)
        t5_dir = tmp / TEXT_ENCODER_FOLDER
        models.text_encoder.t5.save_pretrained(str(t5_dir), safe_serialization=True)
        spiece = models.tokenizer.folder / "spiece.model"
        if spiece.is_file():
            shutil.copy2(spiece, t5_dir / "spiece.model")
        else:
            models.tokenizer.save(t5_dir)
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir

