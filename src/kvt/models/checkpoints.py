"""Checkpoint directories in the official Kandinsky Video 1.1 layout: strict checking and loading.

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
Architecture variants that configs cannot pin (the interpolation U-Net's
``add_new_temporal_params``, the MoVQs' ``add_conv`` / ``flicker_augmentation``) are decided by the key set. Networks are
built on the meta device and filled with ``load_state_dict(assign=True)`` from memory-mapped files, so a
full-size load needs no second copy of the weights. ``.pt`` files are read with ``weights_only=True``:
a pickle that would run code is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from kvt.models.configs import ConfigError, KandinskyVideoConfig
from kvt.models.hf_folder import HFFolderError, HFWeights
from kvt.models.model_set import KandinskyVideoModels, Precision, finish_network
from kvt.models.registry import (
    CONFIGS_FILE,
    FILE_LAYOUTS,
    NETWORK_FILES,
    PROJECTIONS_FILE,
    REQUIRED_FILES,
    build_network,
)
from kvt.models.text_encoder import PROJECTION_HEADS, PromptTokenizer, TextEncoder
from kvt.models.weight_files import (
    SAFETENSORS_SUFFIX,
    CheckpointError,
    WeightFileError,
    read_safetensors,
    read_torch_file,
    safetensors_name,
    unflatten,
    verify_weights_manifest,
    weight_file,
)

log = logging.getLogger(__name__)

_SHOW_KEYS = 5


# ----------------------------------------------------------------------------------------------
# strict state-dict checking
# ----------------------------------------------------------------------------------------------

def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW_KEYS])
    more = f", ... ({len(keys)} in all)" if len(keys) > _SHOW_KEYS else f" ({len(keys)})"
    return shown + more


def check_state_dict(module: nn.Module, state_dict: Mapping[str, Any], where: str,
                     shapes: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Raise :class:`CheckpointError` unless ``state_dict`` has exactly ``module``'s keys and shapes.

    ``shapes`` (name -> shape) avoids touching tensor data for lazily read weights.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if shapes is None:
        not_tensors = sorted(k for k, v in state_dict.items() if not isinstance(v, torch.Tensor))
        found = {k: tuple(v.shape) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    else:
        not_tensors, found = [], {k: tuple(v) for k, v in shapes.items()}
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



def read_weight_file(directory: Path, pt_name: str) -> Any:
    """The content of official weight file ``pt_name`` (``t2v.pt`` ...), read from its safetensors form
    when the directory has one (``kvt convert-weights``), else from the pickle (weights only)."""
    path = weight_file(directory, pt_name)
    if path is None:
        raise CheckpointError(f"{directory / pt_name}: file not found (nor {safetensors_name(pt_name)})")
    if path.suffix != SAFETENSORS_SUFFIX:
        return read_torch_file(path)
    try:
        return unflatten(read_safetensors(path), FILE_LAYOUTS[pt_name], PROJECTION_HEADS)
    except WeightFileError as exc:
        raise CheckpointError(str(exc)) from None


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
# architecture variants decided by the key set
# ----------------------------------------------------------------------------------------------

_ADD_CONV_KEY = re.compile(r"^decoder\..*norm[^.]*\.conv\.(weight|bias)$")

VariantRule = Callable[[set[str]], bool]
VARIANT_RULES: dict[str, dict[str, VariantRule]] = {
    "unet_t2v": {
        "noise_augmentation": lambda keys: "temporal_noise_aug_time_encoding.1.weight" in keys,
        "motion_score": lambda keys: "temporal_motion_score_encoding.1.weight" in keys,
    },
    "unet_interpolation": {
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


class _TextEncoderWeights(Mapping[str, torch.Tensor]):
    """TextEncoder state-dict names over a T5 folder and t5_projections.pt, read lazily.

    ``t5.encoder.embed_tokens.weight`` is the same tensor as ``t5.shared.weight`` (tied); both names
    return one tensor object so loading keeps the tie.
    """

    _ALIAS = ("encoder.embed_tokens.weight", "shared.weight")

    def __init__(self, t5: Mapping[str, torch.Tensor], projections: Mapping[str, Mapping[str, torch.Tensor]],
                 t5_keys: list[str]) -> None:
        self._t5 = t5
        self._projections = projections
        self._keys = [f"t5.{k}" for k in t5_keys] + [
            f"{head}.{k}" for head in PROJECTION_HEADS for k in projections[head]]
        self._shared: torch.Tensor | None = None

    def _t5_name(self, name: str) -> str:
        if name == self._ALIAS[0] and name not in self._t5:
            return self._ALIAS[1]
        return name

    def __getitem__(self, key: str) -> torch.Tensor:
        if key.startswith("t5."):
            name = self._t5_name(key[3:])
            if name == self._ALIAS[1]:
                if self._shared is None:
                    self._shared = self._t5[name]
                return self._shared
            return self._t5[name]
        head, _, rest = key.partition(".")
        return self._projections[head][rest]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@dataclass
class OpenCheckpoint:
    """A checkpoint directory, checked strictly against the architecture, with nothing loaded yet.

    ``weights[network]`` maps exactly the network's state-dict names to tensors that are read on access
    (memory-mapped ``.pt`` files, safetensors headers): the loader assigns them into modules built on
    the meta device, the exporter streams them into ONNX external data.
    """

    directory: Path
    config: KandinskyVideoConfig  # architecture variants decided by the key sets
    t5_config: Any
    t5_dir: Path
    weights: dict[str, Mapping[str, torch.Tensor]]
    t2v_null_embedding: torch.Tensor
    interpolation_null_embedding: torch.Tensor

    def build(self, network: str, device: torch.device | str = "meta") -> nn.Module:
        return build_network(network, self.config, self.t5_config, device)

    def files(self) -> list[Path]:
        """Every file the weights come from (for hashing)."""
        files = [self.directory / CONFIGS_FILE] + [weight_file(self.directory, name) or self.directory / name
                                                   for name in REQUIRED_FILES if name != CONFIGS_FILE]
        t5 = self.weights["text_encoder"]._t5  # type: ignore[attr-defined]
        if isinstance(t5, HFWeights):
            files += t5.files()
        return files + [self.t5_dir / "config.json"]


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
    candidate = declared if declared.is_absolute() else checkpoint_dir / declared
    if candidate.is_dir():
        return candidate
    raise CheckpointError(
        f"{checkpoint_dir / CONFIGS_FILE}: text_encoder.weights_path={str(declared)!r} is not a folder "
        f"(looked for {candidate}); models are never downloaded: pass --text-encoder DIR (a Flan-UL2 "
        "folder in transformers format with spiece.model)"
    )


def missing_files(checkpoint_dir: str | Path) -> list[str]:
    """Required files present in neither form (``X.pt`` or ``X.safetensors``)."""
    checkpoint_dir = Path(checkpoint_dir)
    return [name for name in REQUIRED_FILES
            if not (checkpoint_dir / name).is_file()
            and not (name in FILE_LAYOUTS and (checkpoint_dir / safetensors_name(name)).is_file())]


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
        verify_weights_manifest(checkpoint_dir)  # directories kvt wrote: sizes of every file
        config = KandinskyVideoConfig.from_json(checkpoint_dir / CONFIGS_FILE)
    except (ConfigError, WeightFileError) as exc:
        raise CheckpointError(str(exc)) from None
    t5_dir = resolve_text_encoder_dir(checkpoint_dir, config, text_encoder_dir)
    if not (t5_dir / "config.json").is_file():
        raise CheckpointError(f"{t5_dir}: not a transformers model folder (no config.json)")
    return config, t5_dir


def _open_text_encoder(t5_dir: Path, projections_path: Path,
                       config: KandinskyVideoConfig) -> tuple[Any, Mapping[str, torch.Tensor]]:
    """T5 config and the lazy TextEncoder weights, checked against the architecture."""
    from transformers import T5Config

    try:
        t5_config = T5Config.from_pretrained(str(t5_dir))
    except Exception as exc:  # transformers raises several types for a bad config.json
        raise CheckpointError(f"{t5_dir / 'config.json'}: not a T5 config ({exc})") from None
    try:
        t5 = HFWeights(t5_dir)
        t5_shapes = t5.shapes()
    except (HFFolderError, OSError) as exc:
        raise CheckpointError(f"{t5_dir}: {exc}") from None
    projections = read_weight_file(projections_path.parent, projections_path.name)
    if not isinstance(projections, Mapping) or set(PROJECTION_HEADS) - set(projections):
        found = sorted(projections) if isinstance(projections, Mapping) else type(projections).__name__
        raise CheckpointError(
            f"{projections_path}: expected a dict with {list(PROJECTION_HEADS)}, found {found}")

    encoder = cast(TextEncoder, build_network("text_encoder", config, t5_config))  # the registry's row builds one
    if encoder.projection_base[0].in_features != t5_config.d_model:
        raise CheckpointError(f"{t5_dir}: d_model={t5_config.d_model} does not fit the projections")
    for head in PROJECTION_HEADS:
        check_state_dict(getattr(encoder, head), projections[head], f"{projections_path}:{head}")
    # The folder may hold a whole T5 (decoder, LM head): only the encoder's tensors are read.
    encoder_keys = [k for k in t5_shapes if k == "shared.weight" or k.startswith("encoder.")]
    shapes = {k: t5_shapes[k] for k in encoder_keys}
    if "encoder.embed_tokens.weight" not in shapes and "shared.weight" in shapes:
        shapes["encoder.embed_tokens.weight"] = shapes["shared.weight"]
    check_state_dict(encoder.t5, {}, str(t5_dir), shapes=shapes)
    return t5_config, _TextEncoderWeights(t5, projections, sorted(shapes))


def open_checkpoint_dir(checkpoint_dir: str | Path,
                        text_encoder_dir: str | Path | None = None) -> OpenCheckpoint:
    """Check a checkpoint directory strictly without loading weights (see :class:`OpenCheckpoint`)."""
    checkpoint_dir = Path(checkpoint_dir)
    config, t5_dir = check_checkpoint_dir(checkpoint_dir, text_encoder_dir)
    context_dim = config.text_encoder.context_dim
    weights: dict[str, Mapping[str, torch.Tensor]] = {}
    nulls: dict[str, torch.Tensor] = {}
    for entry in NETWORK_FILES:
        path = weight_file(checkpoint_dir, entry.file) or checkpoint_dir / entry.file
        data = read_weight_file(checkpoint_dir, entry.file)
        state_dict: Mapping[str, torch.Tensor]
        if entry.layout == "unet":
            state_dict, null = _split_unet_file(data, path)
            nulls[entry.name] = _check_null_embedding(null, context_dim, path)
        elif isinstance(data, Mapping):
            state_dict = data
        else:
            raise CheckpointError(f"{path}: expected a flat state dict, found {type(data).__name__}")
        net_config = apply_key_variants(entry.name, getattr(config, entry.config_field), set(state_dict),
                                        str(path))
        config = config.replace(**{entry.config_field: net_config})
        check_state_dict(build_network(entry.name, config), state_dict, str(path))
        weights[entry.name] = state_dict
    t5_config, weights["text_encoder"] = _open_text_encoder(
        t5_dir, checkpoint_dir / PROJECTIONS_FILE, config)
    return OpenCheckpoint(checkpoint_dir, config, t5_config, t5_dir, weights,
                          nulls["unet_t2v"], nulls["unet_interpolation"])


def load_checkpoint_dir(
    checkpoint_dir: str | Path,
    text_encoder_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    precision: Precision = Precision(),
) -> KandinskyVideoModels:
    """Load every network of a checkpoint directory in the official layout (strict)."""
    ckpt = open_checkpoint_dir(checkpoint_dir, text_encoder_dir)
    networks: dict[str, nn.Module] = {}
    for network in ckpt.weights:
        module = ckpt.build(network)
        module.load_state_dict(dict(ckpt.weights[network].items()), strict=True, assign=True)
        _no_meta_left(module, f"{ckpt.directory}:{network}")
        networks[network] = finish_network(module, device, precision.of_network(network))
    try:
        tokenizer = PromptTokenizer(ckpt.t5_dir, ckpt.config.text_encoder.tokens_length)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise CheckpointError(f"{ckpt.t5_dir}: could not load the T5 tokenizer ({exc})") from None
    return KandinskyVideoModels(
        config=ckpt.config,
        unet_t2v=networks["unet_t2v"],
        unet_interpolation=networks["unet_interpolation"],
        image_movq=networks["image_movq"],
        video_movq=networks["video_movq"],
        text_encoder=cast(TextEncoder, networks["text_encoder"]),  # what the registry builds for it
        tokenizer=tokenizer,
        t2v_null_embedding=ckpt.t2v_null_embedding,
        interpolation_null_embedding=ckpt.interpolation_null_embedding,
        source=str(ckpt.directory),
    )
