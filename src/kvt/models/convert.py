"""``kvt convert-weights``: an official checkpoint directory rewritten as safetensors, same keys.

For users who do not want to keep pickles around: every ``.pt`` is read once with
``weights_only=True`` (a pickle that would run code is refused) and written as ``<stem>.safetensors``
(see kvt.models.weight_files for the flattening); ``configs.json`` is copied; the Flan-UL2 folder is
copied with any ``pytorch_model*.bin`` shard rewritten as safetensors. The result loads with
``--weights OUT`` exactly like the original (strict keys) and carries ``kvt-weights.json`` (sizes and
SHA-256 of every file). It is assembled beside ``out`` and renamed when complete.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from kvt.contract.files import replace_dir, temporary_dir_beside
from kvt.models.checkpoints import check_checkpoint_dir, read_weight_file
from kvt.models.presets import TEXT_ENCODER_FOLDER
from kvt.models.registry import CONFIGS_FILE, FILE_LAYOUTS
from kvt.models.weight_files import (
    CheckpointError,
    flatten,
    read_torch_file,
    safetensors_name,
    verify_weights_manifest,
    write_safetensors,
    write_weights_manifest,
)

_BIN_INDEX = "pytorch_model.bin.index.json"
_ST_INDEX = "model.safetensors.index.json"


def _bin_to_safetensors_name(name: str) -> str:
    """``pytorch_model-00001-of-00002.bin`` -> ``model-00001-of-00002.safetensors``."""
    stem = Path(name).stem
    return (stem.replace("pytorch_model", "model", 1) if stem.startswith("pytorch_model") else stem) + ".safetensors"


def _convert_text_encoder(src: Path, dst: Path, report: Callable[[str], None]) -> None:
    """Copy a transformers T5 folder, rewriting pickled shards as safetensors (same tensor names)."""
    dst.mkdir()
    renamed: dict[str, str] = {}
    for path in sorted(src.iterdir()):
        if path.is_dir():
            continue
        if path.suffix == ".bin":
            data = read_torch_file(path)
            if not isinstance(data, dict):
                raise CheckpointError(f"{path}: expected a state dict, found {type(data).__name__}")
            renamed[path.name] = _bin_to_safetensors_name(path.name)
            write_safetensors(data, dst / renamed[path.name])
            report(f"{path.name} -> {renamed[path.name]}")
        elif path.name != _BIN_INDEX:
            shutil.copy2(path, dst / path.name)
    index = src / _BIN_INDEX
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: renamed.get(v, v) for k, v in data["weight_map"].items()}
        (dst / _ST_INDEX).write_text(json.dumps(data, indent=1) + "\n")


def convert_checkpoint_dir(src: str | Path, out: str | Path, text_encoder_dir: str | Path | None = None,
                           overwrite: bool = False, include_text_encoder: bool = True,
                           report: Callable[[str], None] = lambda message: None) -> Path:
    """Write ``src`` (official layout, pickles or safetensors) as safetensors under ``out``.

    ``include_text_encoder=False`` leaves the Flan-UL2 folder where it is (its absolute path goes into
    the new configs.json), for a folder that is already safetensors or too large to copy.
    """
    src, out = Path(src), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    if out.resolve() == src.resolve():
        raise CheckpointError(f"--out {out} is the source directory; write the conversion elsewhere")
    _, t5_dir = check_checkpoint_dir(src, text_encoder_dir)
    verify_weights_manifest(src, check_hashes=True)
    tmp = temporary_dir_beside(out)
    try:
        for pt_name, layout in FILE_LAYOUTS.items():
            data = read_weight_file(src, pt_name)
            write_safetensors(flatten(data, layout), tmp / safetensors_name(pt_name))
            report(f"{pt_name} -> {safetensors_name(pt_name)}")
            del data
        weights_path = str(t5_dir.resolve())
        if include_text_encoder:
            _convert_text_encoder(t5_dir, tmp / TEXT_ENCODER_FOLDER, report)
            weights_path = TEXT_ENCODER_FOLDER
        raw = json.loads((src / CONFIGS_FILE).read_text())
        raw.setdefault("text_encoder", {})["weights_path"] = weights_path
        (tmp / CONFIGS_FILE).write_text(json.dumps(raw, indent=1) + "\n")
        write_weights_manifest(tmp)
        check_checkpoint_dir(tmp)  # the result is a complete directory before it is put in place
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
