"""Precision of the U-Nets' FP16 policies and of the text encoder's BF16, measured on the CPU.

For each U-Net call of a reference folder's module cases (t2v image mode, t2v video mode, interpolation)
this computes the relative L2 error ``||y - y64|| / ||y64||`` (and the max abs error over max |y64|)
against a float64 evaluation of the **official** module, for:

* ``official``: the unmodified official module (``kandinsky_video/model``, loaded from an official
  checkout) with FP16 weights under an emulation of ``torch.cuda.amp.autocast(dtype=float16)`` on the
  CPU: the CUDA autocast op lists applied to the torch functions the module calls (convolutions,
  linears and matmuls in FP16; group / layer norm, softmax, exp, log, pow and sums in FP32; everything
  else in its inputs' dtype, so mixed FP16 x FP32 arithmetic promotes to FP32 as on the GPU);
* ``ours``: this project's module as its FP16 export computes it: FP16 weights, the stage module's
  casts (sample and context cast to FP16, the rest as given), the modules' own FP32 islands;
* ``ours_fp32``: the same module in FP32 (the parity baseline).

For the text encoder (T5 encoder + projection_base + zeroed padding) it compares BF16 and FP32 weights
and activations with a float64 run, on the reference folder's text case.

The float64 truth is the official module in float64 under a function mode that keeps every
intermediate in float64 (requested dtypes and ``.float()`` included). Run:

    python benchmarks/precision_policy.py --official /path/to/KandinskyVideo --reference ../shared/reference \\
        [--out benchmarks/results/precision_tiny.json]

CPU kernels are not CUDA kernels: FP16 convolutions and matmuls here accumulate in FP32 and round once,
as cuDNN / cuBLAS do by default; fused attention kernels differ in summation order. Figures are
therefore an emulation of the GPU policies, not GPU measurements.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

F = torch.nn.functional
T = torch.Tensor

# The CUDA autocast op lists (torch/csrc/autograd/autocast_mode.cpp), at the level autocast applies
# them: the torch functions the modules call (autocast sits above the ops' own dtype checks, so a
# dispatcher-level emulation would come too late).
_FP16_FUNCS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
               F.linear, torch.matmul, T.matmul, T.__matmul__, torch.mm, T.mm, torch.bmm, T.bmm,
               torch.addmm, torch.baddbmm, torch.einsum, F.scaled_dot_product_attention, F.prelu}
_FP32_FUNCS = {F.group_norm, F.layer_norm, F.softmax, T.softmax, torch.softmax, F.log_softmax, T.log_softmax,
               torch.exp, T.exp, torch.log, T.log, torch.pow, T.pow, T.__pow__, torch.rsqrt, T.rsqrt,
               torch.reciprocal, T.reciprocal, torch.sum, T.sum, torch.prod, T.prod, torch.cumsum, T.cumsum,
               torch.logsumexp, F.softplus, torch.norm, T.norm}


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


class AutocastFP16(TorchFunctionMode):
    """torch.cuda.amp.autocast(dtype=torch.float16) on the CPU, by function list (module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func in _FP16_FUNCS:
            args, kwargs = _cast(args, torch.float16), {k: _cast(v, torch.float16) for k, v in kwargs.items()}
        elif func in _FP32_FUNCS:
            args, kwargs = _cast(args, torch.float32), {k: _cast(v, torch.float32) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _wide(value: Any) -> Any:
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return torch.float64
    if isinstance(value, (list, tuple)):
        return type(value)(_wide(v) for v in value)
    return _cast(value, torch.float64)


class Float64(TorchFunctionMode):
    """Every floating computation in float64 (the truth): tensors, requested dtypes, ``.float()``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in (T.float, T.half, T.bfloat16, T.double):
            return _wide(args[0])
        return func(*_wide(args), **{k: _wide(v) for k, v in (kwargs or {}).items()})


def rel(y: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    d = y.double() - truth.double()
    return {"rel_l2": float(d.norm() / truth.double().norm()),
            "max_abs_over_max": float(d.abs().max() / truth.double().abs().max())}


def official_package(root: Path) -> Any:
    """The official ``kandinsky_video.model`` package, imported from a checkout without running
    ``kandinsky_video/__init__.py`` (which needs torchvision, diffusers, a Hub download...)."""
    model_dir = root / "kandinsky_video" / "model"
    if not (model_dir / "unet.py").is_file():
        raise SystemExit(f"{root}: no kandinsky_video/model/unet.py (an official KandinskyVideo checkout)")
    spec = importlib.util.spec_from_file_location("official_kv_model", model_dir / "__init__.py",
                                                  submodule_search_locations=[str(model_dir)])
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules["official_kv_model"] = package
    spec.loader.exec_module(package)
    return package


def _official_unets(root: Path, reference: Path) -> dict[str, torch.nn.Module]:
    if "official_kv_model" not in sys.modules:
        official_package(root)
    unet = importlib.import_module("official_kv_model.unet")
    interpolation = importlib.import_module("official_kv_model.unet_interpolation")
    configs = json.loads((reference / "checkpoints" / "configs.json").read_text())
    out = {}
    for name, cls, file in (("t2v", unet.UNet, "t2v.pt"), ("interpolation", interpolation.UNet, "interpolation.pt")):
        module = cls(**configs[name]["configs"])
        module.load_state_dict(torch.load(reference / "checkpoints" / file, weights_only=True)["unet"])
        out[name] = module.eval()
    return out


def _official_call(module: torch.nn.Module, t: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
    rest = {k: v for k, v in t.items() if k not in ("x", "time", "out")}
    extra = {k: int(v) for k, v in meta.items() if k in ("num_frames", "num_predicted_groups")}
    return module(t["x"], t["time"], **rest, **extra)


def _our_call(models: Any, kind: str, t: dict[str, torch.Tensor], meta: dict[str, Any],
              dtype: torch.dtype) -> torch.Tensor:
    """Our network as the stage module calls it: sample and context in the weights' dtype."""
    x, context = t["x"].to(dtype), t["context"].to(dtype)
    if kind == "interpolation":
        return models.unet_interpolation(
            x, t["time"], context, t["context_mask"], t["skip_frames"], t["perturbation_time"],
            t["temporal_mask"].to(dtype), num_groups=int(meta["num_predicted_groups"]))
    if "temporal_embed" in t:
        return models.unet_t2v.forward_video(x, t["time"], context, t["context_mask"], t["temporal_embed"],
                                             t["noise_aug_time"], t["motion_score"],
                                             num_frames=int(meta["num_frames"]))
    return models.unet_t2v.forward_image(x, t["time"], context, t["context_mask"])


def measure_unets(root: Path, reference: Path) -> list[dict[str, Any]]:
    from kvt.models.checkpoints import load_checkpoint_dir

    manifest = json.loads((reference / "MANIFEST.json").read_text())
    official = _official_unets(root, reference)
    official_fp16 = {k: copy.deepcopy(v).half() for k, v in official.items()}
    official_fp64 = {k: copy.deepcopy(v).double() for k, v in official.items()}
    ours32 = load_checkpoint_dir(reference / "checkpoints")
    ours16 = load_checkpoint_dir(reference / "checkpoints")
    ours16.unet_t2v.half()
    ours16.unet_interpolation.half()
    rows = []
    for path, entry in manifest["files"].items():
        producer = entry.get("producer", "")
        kind = ("interpolation" if "unet_interpolation.UNet" in producer
                else "t2v" if "model.unet.UNet" in producer else None)
        if kind is None:
            continue
        t = load_file(str(reference / path))
        meta = entry.get("meta", {})
        mode = "interpolation" if kind == "interpolation" else ("video" if "temporal_embed" in t else "image")
        with torch.no_grad():
            with Float64():
                truth = _official_call(official_fp64[kind], t, meta)
            with AutocastFP16():
                official16 = _official_call(official_fp16[kind], t, meta)
            ours = _our_call(ours16, kind, t, meta, torch.float16)
            ours_fp32 = _our_call(ours32, kind, t, meta, torch.float32)
        rows.append({"case": Path(path).name.split(".")[0], "unet": mode,
                     "official_fp16_autocast": rel(official16, truth), "ours_fp16": rel(ours, truth),
                     "ours_vs_official_fp16": rel(ours, official16), "ours_fp32": rel(ours_fp32, truth)})
    return rows


def _stage_case(stage: str, spec: Any) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """Stage sample inputs (opt dims) as the official module's call: context trimmed to L, the official
    argument names and integer dtypes (reference README, "How to use the module cases")."""
    inputs = spec.sample_inputs(seed=1)
    length = int(inputs["context_len"][0])
    t = {"x": inputs["sample"], "context": inputs["context"][:, :length],
         "context_mask": inputs["context_mask"][:, :length]}
    if stage == "unet_interp":
        rows = inputs["sample"].shape[0]
        t.update(time=inputs["timestep"].long(), perturbation_time=inputs["perturbation_time"].int(),
                 skip_frames=inputs["skip_frames"].int(), temporal_mask=inputs["temporal_mask"])
        return "interpolation", t, {"num_predicted_groups": rows // 2}
    t["time"] = inputs["timestep"]
    if stage == "unet_t2v_video":
        t.update(temporal_embed=inputs["frame_index"], noise_aug_time=inputs["noise_aug"].int(),
                 motion_score=inputs["motion_score"].int())
        return "t2v", t, {"num_frames": 12}
    return "t2v", t, {}


def measure_preset(root: Path, name: str) -> list[dict[str, Any]]:
    """The same comparison on a preset's networks with seeded random weights (the official modules load
    the same state dicts) and the stage table's sample inputs at the opt size."""
    from kvt.models.presets import get_preset
    from kvt.models.random_weights import random_models
    from kvt.models.stage_modules import stage_table_for

    if "official_kv_model" not in sys.modules:
        official_package(root)
    unet = importlib.import_module("official_kv_model.unet")
    interpolation = importlib.import_module("official_kv_model.unet_interpolation")
    preset = get_preset(name)
    ours32 = random_models(preset, seed=0)
    ours16 = copy.deepcopy(ours32)
    ours16.unet_t2v.half()
    ours16.unet_interpolation.half()
    official = {"t2v": unet.UNet(**preset.config.t2v.to_dict()),
                "interpolation": interpolation.UNet(**preset.config.interpolation.to_dict())}
    official["t2v"].load_state_dict(ours32.unet_t2v.state_dict())
    official["interpolation"].load_state_dict(ours32.unet_interpolation.state_dict())
    official_fp16 = {k: copy.deepcopy(v).eval().half() for k, v in official.items()}
    official_fp64 = {k: copy.deepcopy(v).eval().double() for k, v in official.items()}
    table = stage_table_for(preset.config)
    rows = []
    for stage, mode in (("unet_t2v_image", "image"), ("unet_t2v_video", "video"), ("unet_interp", "interpolation")):
        kind, t, meta = _stage_case(stage, table[stage])
        with torch.no_grad():
            with Float64():
                truth = _official_call(official_fp64[kind], t, meta)
            with AutocastFP16():
                official16 = _official_call(official_fp16[kind], t, meta)
            ours = _our_call(ours16, kind, t, meta, torch.float16)
            ours_fp32 = _our_call(ours32, kind, t, meta, torch.float32)
        rows.append({"case": f"{name} {stage} {list(t['x'].shape)}", "unet": mode,
                     "official_fp16_autocast": rel(official16, truth), "ours_fp16": rel(ours, truth),
                     "ours_vs_official_fp16": rel(ours, official16), "ours_fp32": rel(ours_fp32, truth)})
    return rows


def measure_text_encoder(reference: Path) -> dict[str, Any]:
    from kvt.models.checkpoints import load_checkpoint_dir

    golden = load_file(str(reference / "text" / "text_encoder.safetensors"))
    ids, mask = golden["input_ids"], golden["attention_mask"]
    out: dict[str, Any] = {}
    encoder = load_checkpoint_dir(reference / "checkpoints").text_encoder
    wide = copy.deepcopy(encoder).double()
    with torch.no_grad(), Float64():
        truth = wide(ids, mask)
        truth_hidden = wide.hidden_states(ids, mask)
    with torch.no_grad():
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            low = copy.deepcopy(encoder).to(dtype)
            out[name] = {"context": rel(low(ids, mask).float(), truth),
                         "t5_hidden_state": rel(low.hidden_states(ids, mask).float(), truth_hidden)}
        # BF16 T5 stack, FP32 projection (an engine that keeps the projection in FP32).
        low = copy.deepcopy(encoder)
        low.t5.to(torch.bfloat16)
        out["bf16_t5_fp32_projection"] = {"context": rel(low(ids, mask).float(), truth)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, required=True, help="official KandinskyVideo checkout")
    parser.add_argument("--reference", type=Path, required=True, help="reference folder (MANIFEST.json)")
    parser.add_argument("--presets", default="small",
                        help="comma-separated presets also measured with random weights (default small; '' none)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    presets = [p for p in args.presets.split(",") if p]
    result = {"unets": measure_unets(args.official, args.reference)
              + [row for name in presets for row in measure_preset(args.official, name)],
              "text_encoder": measure_text_encoder(args.reference),
              "reference": str(args.reference), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - start, 1)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
