"""FLOPs of stage calls (torch's flop counter at the benchmarked shapes) and device peak throughput.

FLOPs count one fused multiply-add as 2 (torch.utils.flop_counter's convention, matching the tables in
docs/spec/deployment.md); element-wise work (norms, activations, softmax) is not counted. Counting on the meta
device needs no memory and no time for the arithmetic, so the full preset can be counted on any machine.
MFU = achieved FLOP/s / the device's dense FP16 tensor-core peak; a CPU has no such entry (MFU n/a).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kvt.contract.stages import StageTable
from kvt.models.presets import get_preset
from kvt.models.registry import build_network
from kvt.models.stage_modules import stage_module, stage_table_for
from kvt.runtime.fast_path import math_attention

# Dense (no sparsity) FP16/BF16 tensor-core peak, TFLOP/s, from the vendors' data sheets. Matched against
# torch.cuda.get_device_name in order, first match wins (PCIe before the generic H100 = SXM).
DENSE_FP16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.5),
    ("H100 NVL", 835.5),
    ("H100", 989.4),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.4),
    ("A100", 312.0),
)


@dataclass(frozen=True)
class DevicePeak:
    name: str
    dense_fp16_tflops: float | None  # None: no tensor-core peak known (CPU, unlisted GPU) -> MFU n/a


def device_peak(device: torch.device | str) -> DevicePeak:
    """The benchmark device's name and dense FP16 peak (None where unknown)."""
    device = torch.device(device)
    if device.type != "cuda":
        import platform

        return DevicePeak(f"CPU ({platform.processor() or platform.machine()}, "
                          f"{torch.get_num_threads()} threads)", None)
    name = torch.cuda.get_device_name(device)
    for key, tflops in DENSE_FP16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return DevicePeak(name, tflops)
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


# The T5 encoder calls .item() in its forward, which the meta device cannot answer.
META_UNSUPPORTED = ("text_encoder",)


def meta_stage_modules_for(config, t5_config=None) -> dict[str, nn.Module]:
    """Stage modules of ``config`` on the meta device (structure only), the text encoder excepted."""
    networks: dict[str, nn.Module] = {}
    modules = {}
    for spec in stage_table_for(config):
        if spec.name in META_UNSUPPORTED:
            continue
        if spec.network not in networks:
            networks[spec.network] = build_network(spec.network, config, t5_config, device="meta").eval()
        modules[spec.name] = stage_module(spec.name, networks[spec.network])
    return modules


def meta_stage_modules(preset_name: str) -> tuple[dict[str, nn.Module], StageTable]:
    """Stage modules of a preset on the meta device (the text encoder too, for completeness)."""
    from transformers import T5Config

    preset = get_preset(preset_name)
    modules = meta_stage_modules_for(preset.config)
    text = build_network("text_encoder", preset.config, T5Config(**preset.t5), device="meta")
    modules["text_encoder"] = stage_module("text_encoder", text)
    return modules, stage_table_for(preset.config)


def achieved(flops: float, seconds: float, peak: DevicePeak) -> tuple[float, float | None]:
    """(TFLOP/s, MFU or None) of ``flops`` done in ``seconds``."""
    tflops = flops / seconds / 1e12 if seconds > 0 else float("nan")
    mfu = tflops / peak.dense_fp16_tflops if peak.dense_fp16_tflops else None
    return tflops, mfu
