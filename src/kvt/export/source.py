"""Where an export's weights come from: a checkpoint directory, or a preset with seeded random weights.

A checkpoint directory brings its own architecture (its configs.json and the key sets of its files);
a preset named beside it is a check that the checkpoint is that architecture, nothing more.

An :class:`ExportSource` is a small picklable description, sent to worker processes; ``open()`` turns
it into an :class:`OpenedSource` that builds networks on the meta device and hands out one weight
tensor at a time, so no process ever holds a whole network's weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvt.contract.files import sha256_file
from kvt.models.checkpoints import VARIANT_RULES, open_checkpoint_dir
from kvt.models.configs import KandinskyVideoConfig
from kvt.models.presets import get_preset
from kvt.models.random_weights import RandomTensors, random_null_embeddings
from kvt.models.registry import NETWORK_FILES, NETWORK_NAMES, build_network
from kvt.models.text_encoder import TINY_TOKENIZER_DIR
from kvt.models.weight_files import CheckpointError

# Bumped when the random-weight recipe changes, so digests of random exports stay honest.
RANDOM_RECIPE_VERSION = 2


DEFAULT_PRESET = "tiny"  # the architecture of random weights when no preset is named


@dataclass(frozen=True)
class ExportSource:
    preset: str | None = None  # random weights: their architecture (default tiny); checkpoint: a check
    weights: str | None = None  # checkpoint directory; None = seeded random weights
    text_encoder: str | None = None
    seed: int = 0

    @property
    def label(self) -> str:
        """How reports name the source: the preset, or the checkpoint directory's name."""
        if self.weights is None or self.preset is not None:
            return self.preset or DEFAULT_PRESET
        return Path(self.weights).name

    def open(self) -> OpenedSource:
        return _open(self)

    def describe(self) -> dict[str, Any]:
        if self.weights is None:
            return {"kind": "random", "preset": self.preset or DEFAULT_PRESET, "seed": self.seed,
                    "recipe": RANDOM_RECIPE_VERSION}
        return {"kind": "checkpoint", "preset": self.preset, "path": str(Path(self.weights).resolve()),
                "text_encoder": None if self.text_encoder is None else str(Path(self.text_encoder).resolve())}


@dataclass
class OpenedSource:
    source: ExportSource
    config: KandinskyVideoConfig
    t5_config: Any
    tensors: dict[str, Callable[[str], torch.Tensor]]  # network -> parameter name -> tensor
    t2v_null_embedding: torch.Tensor
    interpolation_null_embedding: torch.Tensor
    tokenizer_dir: Path
    files: list[Path]

    def build(self, network: str) -> nn.Module:
        """The network's architecture on the meta device."""
        return build_network(network, self.config, self.t5_config, device="meta")

    def digest(self) -> dict[str, Any]:
        """Identity of the weights: file hashes for checkpoints, the recipe for random weights."""
        if self.source.weights is None:
            text = repr(sorted(self.source.describe().items()))
            return {"digest": hashlib.sha256(text.encode()).hexdigest()}
        files = {str(p): sha256_file(p) for p in self.files}
        # The digest is the content's, not the folder's: a copied or moved checkpoint is the same export.
        root = Path(self.source.weights)
        named = sorted((self._role(Path(path), root), sha) for path, sha in files.items())
        combined = hashlib.sha256(repr(named).encode()).hexdigest()
        return {"digest": combined, "files": files}

    def _role(self, path: Path, root: Path) -> str:
        for base, prefix in ((root, ""), (self.tokenizer_dir, "text_encoder/")):
            try:
                return prefix + path.relative_to(base).as_posix()
            except ValueError:
                continue
        return path.name


def config_differences(ours: KandinskyVideoConfig, preset: KandinskyVideoConfig) -> list[str]:
    """Fields where a checkpoint's architecture differs from a preset's (variant flags excepted)."""
    out = []
    variant_flags = {(net, flag) for net, rules in VARIANT_RULES.items() for flag in rules}
    field_of = {entry.name: entry.config_field for entry in NETWORK_FILES}
    network_of = {v: k for k, v in field_of.items()}
    for field in dataclasses.fields(ours):
        a, b = getattr(ours, field.name), getattr(preset, field.name)
        for sub in dataclasses.fields(a):
            if sub.name in ("extra", "weights_path", "low_cpu_mem_usage"):
                continue
            if (network_of.get(field.name), sub.name) in variant_flags:
                continue
            if getattr(a, sub.name) != getattr(b, sub.name):
                out.append(f"{field.name}.{sub.name}: {getattr(a, sub.name)!r} (checkpoint) != "
                           f"{getattr(b, sub.name)!r} (preset)")
    return out


@lru_cache(maxsize=2)
def _open(source: ExportSource) -> OpenedSource:
    if source.weights is None:
        preset = get_preset(source.preset or DEFAULT_PRESET)
        from transformers import T5Config

        t5_config = T5Config(**preset.t5)
        tensors: dict[str, Callable[[str], torch.Tensor]] = {
            network: RandomTensors(network, build_network(network, preset.config, t5_config), source.seed)
            for network in NETWORK_NAMES}
        t2v_null, interp_null = random_null_embeddings(preset.config.text_encoder.context_dim, source.seed)
        return OpenedSource(source, preset.config, t5_config, tensors, t2v_null, interp_null,
                            TINY_TOKENIZER_DIR, [])
    ckpt = open_checkpoint_dir(source.weights, source.text_encoder)
    if source.preset is None:
        differences = []
    else:
        preset = get_preset(source.preset)
        differences = config_differences(ckpt.config, preset.config)
    if differences:
        raise CheckpointError(
            f"{source.weights}: the checkpoint is not the {preset.name!r} preset's architecture: "
            + "; ".join(differences[:5]) + (f" ({len(differences)} differences)" if len(differences) > 5 else "")
            + ". Pass the matching --preset, or none: the checkpoint's own configs.json decides.")
    tensors = {network: weights.__getitem__ for network, weights in ckpt.weights.items()}
    return OpenedSource(source, ckpt.config, ckpt.t5_config, tensors, ckpt.t2v_null_embedding,
                        ckpt.interpolation_null_embedding, ckpt.t5_dir, ckpt.files())
