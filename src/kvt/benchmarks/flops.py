"""FLOPs of stage calls (torch's flop counter at the benchmarked shapes) and device peak throughput.

FLOPs count one fused multiply-add as 2 (torch.utils.flop_counter's convention, matching the tables in
docs/spec/deployment.md); element-wise work (norms, activations, softmax) is not counted. Counting on the meta
device needs no memory and no time for the arithmetic, so the full preset can be counted on any machine.
MFU = achieved FLOP/s / the device's dense peak for the stage's precision (FP16, BF16, TF32 or FP32, from the
data sheet, and against a GEMM ceiling measured on the device where one was measured); a CPU has no
such entry (MFU n/a).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kvt.contract.stages import StageTable
from kvt.models.presets import get_preset
from kvt.models.registry import build_network
from kvt.models.stage_modules import UNetStage, stage_module, stage_table_for
from kvt.models.unet_layers import HoistedText
from kvt.runtime.fast_path import math_attention

# Dense (no sparsity) peaks, TFLOP/s, from the vendors' data sheets: FP16 and BF16 tensor cores, TF32
# tensor cores, plain FP32. Matched against torch.cuda.get_device_name in order, first match wins (PCIe
# and NVL before the generic H100 = SXM).
DATASHEET_PEAKS_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"fp16": 756.5, "bf16": 756.5, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"fp16": 835.5, "bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"fp16": 989.4, "bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", {"fp16": 989.4, "bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"fp16": 312.0, "bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)
# The FP16 column alone (kept for readers of the older name).
DENSE_FP16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = tuple((k, v["fp16"]) for k, v in DATASHEET_PEAKS_TFLOPS)


def precision_key(dtype: torch.dtype, convolutions: bool = True, cuda: bool = True) -> str:
    """Which peak a computation in ``dtype`` runs at: FP16 / BF16 on tensor cores; FP32 on CUDA at the
    TF32 rate where torch lets cuDNN (convolutions, on by default) or cuBLAS (matmuls, off by default) use
    TF32, else (and on a CPU) at the plain FP32 rate."""
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.bfloat16:
        return "bf16"
    tf32 = torch.backends.cudnn.allow_tf32 if convolutions else torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 and cuda else "fp32"


@dataclass(frozen=True)
class DevicePeak:
    name: str
    dense_fp16_tflops: float | None  # None: no tensor-core peak known (CPU, unlisted GPU) -> MFU n/a
    # Per precision ("fp16", "bf16", "tf32", "fp32"): the data sheet's, and what a GEMM measured here.
    datasheet: dict[str, float] = field(default_factory=dict)
    measured: dict[str, float] = field(default_factory=dict)

    def peak(self, precision: str = "fp16", measured: bool = False) -> float | None:
        table = self.measured if measured else self.datasheet
        if not table and not measured and precision == "fp16":
            return self.dense_fp16_tflops
        return table.get(precision)


def device_peak(device: torch.device | str) -> DevicePeak:
    """The benchmark device's name and data-sheet peaks (none where unknown)."""
    device = torch.device(device)
    if device.type != "cuda":
        import platform

        return DevicePeak(f"CPU ({platform.processor() or platform.machine()}, "
                          f"{torch.get_num_threads()} threads)", None)
    name = torch.cuda.get_device_name(device)
    for key, peaks in DATASHEET_PEAKS_TFLOPS:
        if key.lower() in name.lower():
            return DevicePeak(name, peaks["fp16"], dict(peaks))
    return DevicePeak(name, None)


def count_flops(module: nn.Module, args: tuple) -> int:
    """FLOPs of one ``module(*args)`` call, attention counted as its two matrix products.

    SDPA runs the math kernel while counting: the fused CPU flash kernel is invisible to the flop
    counter, so without this the count would depend on the device and the kernel torch picks.
    """
    with torch.inference_mode(), math_attention(), FlopCounterMode(display=False) as counter:
        module(*args)
    return int(counter.get_total_flops())


def stage_call_flops(modules: Mapping[str, nn.Module], table: StageTable, stage: str,
                     dims: Mapping[str, int], device: torch.device | str = "meta") -> int:
    """FLOPs of one call of ``stage`` at ``dims``; ``modules`` are stage modules on ``device``."""
    spec = table[stage]
    inputs = spec.sample_inputs(dims, device="cpu")
    args = tuple(inputs[name].to(device) for name in spec.input_names)
    return count_flops(modules[stage], args)


def text_work_flops(modules: Mapping[str, nn.Module], table: StageTable, stage: str,
                    dims: Mapping[str, int], device: torch.device | str = "meta") -> int:
    """FLOPs of the text-only work inside one call of a U-Net ``stage`` (cross-attention keys/values and
    constants, attention pooling): what hoisting computes once per loop instead of every step; 0 for
    stages without text."""
    module = modules[stage]
    if not isinstance(module, UNetStage):
        return 0
    spec = table[stage]
    inputs = {name: value.to(device) for name, value in spec.sample_inputs(dims, device="cpu").items()}
    hoisted = HoistedText(module.network)
    with torch.inference_mode(), math_attention(), FlopCounterMode(display=False) as counter:
        hoisted.refresh(module.text_context(inputs["context"], inputs["context_mask"], inputs["context_len"],
                                            dims["N"]))
    return int(counter.get_total_flops())


# The T5 encoder calls .item() in its forward, which the meta device cannot answer.
META_UNSUPPORTED = ("text_encoder",)


def meta_stage_modules_for(config, t5_config=None, cuts: bool = True) -> dict[str, nn.Module]:
    """Stage modules of ``config`` on the meta device (structure only), the text encoder excepted.
    ``cuts=False``: the U-Net stages in the official per-row form (see kvt.models.stage_modules)."""
    networks: dict[str, nn.Module] = {}
    modules = {}
    for spec in stage_table_for(config):
        if spec.name in META_UNSUPPORTED:
            continue
        if spec.network not in networks:
            networks[spec.network] = build_network(spec.network, config, t5_config, device="meta").eval()
        modules[spec.name] = stage_module(spec.name, networks[spec.network], cuts)
    return modules


def meta_stage_modules(preset_name: str, cuts: bool = True) -> tuple[dict[str, nn.Module], StageTable]:
    """Stage modules of a preset on the meta device (the text encoder too, for completeness)."""
    from transformers import T5Config

    preset = get_preset(preset_name)
    modules = meta_stage_modules_for(preset.config, cuts=cuts)
    text = build_network("text_encoder", preset.config, T5Config(**preset.t5), device="meta")
    modules["text_encoder"] = stage_module("text_encoder", text)
    return modules, stage_table_for(preset.config)


def stage_precision(modules: Mapping[str, nn.Module] | None, stage: str) -> str:
    """The precision key of a stage from its module's weights (FP16 where the backend has no torch
    modules: the engines' compute precision of the U-Nets)."""
    module = (modules or {}).get(stage)
    if module is None:
        return "fp16"
    weight = next(module.parameters())
    return precision_key(weight.dtype, convolutions=stage != "text_encoder", cuda=weight.device.type == "cuda")


def achieved(flops: float, seconds: float, peak: DevicePeak, precision: str = "fp16",
             measured: bool = False) -> tuple[float, float | None]:
    """(TFLOP/s, MFU or None) of ``flops`` done in ``seconds``, MFU against the ``precision`` peak
    (the data sheet's, or with ``measured`` the GEMM ceiling measured on this device)."""
    tflops = flops / seconds / 1e12 if seconds > 0 else float("nan")
    reference = peak.peak(precision, measured)
    mfu = tflops / reference if reference else None
    return tflops, mfu
