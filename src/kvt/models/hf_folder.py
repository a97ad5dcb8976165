"""Lazy reading of a transformers model folder (the Flan-UL2 encoder), one tensor at a time.

A Flan-UL2 folder holds the whole T5 (encoder, decoder, LM head: about 20 B parameters) as safetensors or
PyTorch shards. Loading it with ``from_pretrained`` materialises the encoder (35 GB in float32); here a
tensor is read only when asked for, so the loader can assign memory-mapped tensors and the exporter
can stream them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from kvt.models.weight_files import CheckpointError, read_torch_file

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE = ("model.safetensors", "pytorch_model.bin")


class HFFolderError(CheckpointError):
    """The folder holds no weights this reader understands, or a listed shard is missing."""


def _shard_map(folder: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from an index or from a single weights file."""
    for index in _INDEXES:
        path = folder / index
        if path.is_file():
            try:
                weight_map = json.loads(path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise HFFolderError(f"{path}: not a weights index ({exc})") from None
            missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
            if missing:
                raise HFFolderError(f"{path}: shard file(s) {missing} are missing")
            return {name: folder / file for name, file in weight_map.items()}
    for single in _SINGLE:
        path = folder / single
        if path.is_file():
            return {name: path for name in _keys_of(path)}
    raise HFFolderError(f"{folder}: no weights (expected one of {list(_SINGLE + _INDEXES)})")


def _keys_of(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    return list(_torch_shard(path).keys())


def _torch_shard(path: Path) -> Mapping[str, torch.Tensor]:
    data = read_torch_file(path)
    if not isinstance(data, Mapping):
        raise HFFolderError(f"{path}: not a state dict")
    return data


class HFWeights(Mapping[str, torch.Tensor]):
    """Read-only mapping over a folder's tensors; values are read (memory-mapped) on access."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._where = _shard_map(self.folder)
        self._torch_shards: dict[Path, Mapping[str, torch.Tensor]] = {}
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self._where[name]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(name)
        if path not in self._torch_shards:
            self._torch_shards[path] = _torch_shard(path)
        return self._torch_shards[path][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, read from headers (no tensor data)."""
        if self._shapes is None:
            from safetensors import safe_open

            shapes: dict[str, tuple[int, ...]] = {}
            for path in sorted(set(self._where.values())):
                if path.suffix == ".safetensors":
                    with safe_open(str(path), framework="pt") as handle:
                        for key in handle.keys():
                            shapes[key] = tuple(handle.get_slice(key).get_shape())
                else:
                    shapes.update({k: tuple(v.shape) for k, v in _torch_shard(path).items()})
            self._shapes = shapes
        return self._shapes

    def files(self) -> list[Path]:
        return sorted(set(self._where.values()))
