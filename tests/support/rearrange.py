"""A copy of a reference folder whose checkpoints are arranged differently, in ways the official loader
(``kandinsky_video/__init__.py`` ``get_T2V_pipeline``: ``UNet(**configs['t2v']['configs'])``,
``MoVQ(generator_params)``, ``T5Tokenizer / T5EncoderModel.from_pretrained(weights_path)``,
``load_state_dict``) builds into exactly the same networks, so every golden output stays valid:

* configs.json: every object's keys in reverse order;
* the U-Nets' channel plan written another way: ``hidden_dims = [init_channels] + [model_channels * m
  for m in dim_mult]`` and ``model_channels`` is used nowhere else (official unet.py /
  unet_interpolation.py), so ``model_channels = 1`` with ``dim_mult`` scaled by the old value and
  ``init_channels`` written out builds the same layers;
* constructor keywords equal to the official constructors' defaults left out;
* the MoVQs' nominal ``resolution`` and ``attn_resolutions`` both doubled: attention sits where the
  halved-per-level resolution is listed, i.e. at the same levels; plus keys the official MoVQ ignores
  (``**ignore_kwargs``), as the released configs carry (``embed_dim``, ``n_embed``);
* the T5 folder moved to another (nested) ``weights_path``;
* every state dict (and the U-Net files' top-level dict, the projection heads) in reverse key order.

A loader or test that takes any architecture fact from a preset, a file name or a key order instead of
the folder's own files fails on this copy.
"""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

# Official constructor defaults (kandinsky_video/model/unet.py UNet.__init__, unet_interpolation.py
# UNet.__init__, movq.py Encoder / MOVQDecoder.__init__), for the keys this rearrangement leaves out.
_UNET_DEFAULTS: dict[str, Any] = {
    "groups": 32, "head_dim": 64, "expansion_ratio": 4, "compression_ratio": 2,
    "num_blocks": [3, 3, 3, 3], "add_cross_attention": [False, True, True, True],
    "add_self_attention": [False, True, True, True],
}
_INTERPOLATION_DEFAULTS: dict[str, Any] = {
    **_UNET_DEFAULTS, "time_downsample": [False, False, False, False], "temporal": True,
    "use_perturbation_time_embed": True, "merge_perturbation_time_with_diffusion_time": True,
    "merge_perturbation_time_with_context": False, "pass_skip_frames": True, "temporal_type": "conv3D",
    "add_new_temporal_params": False, "add_temporal_attention": True,
}
_MOVQ_DEFAULTS: dict[str, Any] = {  # keys both Encoder and MOVQDecoder default the same way
    "dropout": 0.0, "resamp_with_conv": True, "temporal_mid_blocks": True, "temporal_kernel_size": [3, 3, 3],
    "temporal_conv_padding": [1, 1, 1], "flicker_augmentation": False, "build_3D_decoder": False,
    "temporal_blocks": False, "temporal_attention_block": False, "add_conv": False,
}
T5_FOLDER = "encoders/flan_t5_moved"


def _reversed(mapping: dict[str, Any]) -> dict[str, Any]:
    return dict(reversed(list(mapping.items())))


def _without_defaults(configs: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in configs.items() if not (k in defaults and defaults[k] == v)}


def _unet(configs: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    out = dict(configs)
    channels = int(out["model_channels"])
    out["init_channels"] = out.get("init_channels") or channels
    out["model_channels"] = 1
    out["dim_mult"] = [channels * m for m in out.get("dim_mult", [1, 2, 4, 8])]
    return _reversed(_without_defaults(out, defaults))


def _movq(configs: dict[str, Any]) -> dict[str, Any]:
    out = dict(configs)
    out["resolution"] = 2 * int(out["resolution"])
    out["attn_resolutions"] = [2 * int(r) for r in out["attn_resolutions"]]
    out.update(embed_dim=int(out["z_channels"]), n_embed=16384)
    return _reversed(_without_defaults(out, _MOVQ_DEFAULTS))


def _resave_reversed(path: Path) -> None:
    data = torch.load(path, weights_only=True, map_location="cpu")

    def flip(value: Any) -> Any:
        if isinstance(value, dict):
            return OrderedDict(reversed([(k, flip(v)) for k, v in value.items()]))
        return value

    path.unlink()
    torch.save(flip(data), path)


def rearranged_copy(reference: Path, out: Path) -> Path:
    """Copy ``reference`` to ``out`` (made here) with its checkpoints rearranged as described above."""
    shutil.copytree(reference, out, copy_function=shutil.copy)
    for entry in out.rglob("*"):
        entry.chmod(0o755 if entry.is_dir() else 0o644)
    checkpoints = out / "checkpoints"
    configs = json.loads((checkpoints / "configs.json").read_text())
    old_t5 = checkpoints / configs["text_encoder"]["weights_path"]
    new_t5 = checkpoints / T5_FOLDER
    new_t5.parent.mkdir(parents=True)
    old_t5.rename(new_t5)
    arranged = {
        "video_movq": {"configs": _movq(configs["video_movq"]["configs"])},
        "image_movq": {"configs": _movq(configs["image_movq"]["configs"])},
        "text_encoder": _reversed({**configs["text_encoder"], "weights_path": T5_FOLDER}),
        "interpolation": {"configs": _unet(configs["interpolation"]["configs"], _INTERPOLATION_DEFAULTS)},
        "t2v": {"configs": _unet(configs["t2v"]["configs"], _UNET_DEFAULTS)},
    }
    assert set(arranged) == set(configs), "every entry of configs.json is rearranged"
    (checkpoints / "configs.json").write_text(json.dumps(arranged, indent=1))
    for name in ("t2v.pt", "interpolation.pt", "movq.pt", "video_movq.pt", "t5_projections.pt"):
        _resave_reversed(checkpoints / name)
    return out
