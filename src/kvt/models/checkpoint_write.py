"""Writing a model set as a checkpoint directory in the official layout (kvt make-weights, tests).

What it writes is exactly what :mod:`kvt.models.checkpoints` loads: the official files, a Flan-UL2
folder with the tokenizer, and ``kvt-weights.json`` with every binary file's size and SHA-256.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn

from kvt.contract.errors import UserError
from kvt.contract.files import default_file_mode, replace_dir, temporary_dir_beside
from kvt.models.model_set import KandinskyVideoModels
from kvt.models.presets import TEXT_ENCODER_FOLDER
from kvt.models.registry import CONFIGS_FILE, NETWORK_FILES, PROJECTIONS_FILE
from kvt.models.text_encoder import PROJECTION_HEADS
from kvt.models.weight_files import write_weights_manifest


class OutputExistsError(UserError, FileExistsError):
    """The output directory exists and replacing it was not asked for."""


def write_checkpoint_dir(models: KandinskyVideoModels, out_dir: str | Path, overwrite: bool = False,
                         dtype: torch.dtype | None = None) -> Path:
    """Write ``models`` as a complete checkpoint directory in the official layout.

    The directory is assembled under a temporary name beside ``out_dir`` and renamed when complete, so
    a failed or interrupted write never leaves a directory that looks complete. ``dtype`` optionally
    casts floating weights (e.g. float16 to halve the size of full-size U-Nets).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise OutputExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
    tmp = temporary_dir_beside(out_dir)

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
        nulls = {"unet_t2v": models.t2v_null_embedding, "unet_interpolation": models.interpolation_null_embedding}
        networks = models.networks()
        for entry in NETWORK_FILES:
            state = sd(networks[entry.name])
            data = {"unet": state, "null_embedding": nulls[entry.name].cpu()} if entry.layout == "unet" else state
            torch.save(data, tmp / entry.file)
        torch.save({head: sd(getattr(models.text_encoder, head)) for head in PROJECTION_HEADS},
                   tmp / PROJECTIONS_FILE)
        t5_dir = tmp / TEXT_ENCODER_FOLDER
        _save_t5(models.text_encoder.t5, t5_dir)
        spiece = models.tokenizer.folder / "spiece.model"
        if spiece.is_file():
            shutil.copy2(spiece, t5_dir / "spiece.model")
        else:
            models.tokenizer.save(t5_dir)
        write_weights_manifest(tmp)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _save_t5(t5: nn.Module, folder: Path) -> None:
    """transformers' ``save_pretrained`` without its progress bar (unless -v) and with files readable
    under the umask (it writes safetensors 0600)."""
    from transformers.utils import logging as hf_logging

    quiet = not logging.getLogger(__name__).isEnabledFor(logging.INFO) and hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        t5.save_pretrained(str(folder), safe_serialization=True)  # type: ignore[operator]
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
    default_file_mode(*(path for path in folder.iterdir() if path.is_file()))
