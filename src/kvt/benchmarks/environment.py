"""What a GPU benchmark ran on, and the device's measured ceilings.

* :func:`environment`: GPU, SMs, memory, clocks and power (``nvidia-smi``), driver, CUDA, cuDNN, torch's
  TF32 and SDPA switches, library versions; the CPU side on a machine without a GPU.
* :func:`calibrate`: dense GEMM TFLOP/s per precision (FP16, BF16, TF32, FP32) and device copy bandwidth,
  the measured ceilings MFU is also reported against.
* :func:`attention_census`: every distinct ``scaled_dot_product_attention`` call of the stage calls of a
  request (recorded on the meta device), with the backend torch picks for it on this device and its
  latency; for the MoVQs' wide single-head shapes also the plain two-GEMM form.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from kvt.benchmarks.timing import measure
from kvt.contract.plan import StageCall
from kvt.contract.stages import StageTable
from kvt.models.attention_kernels import math_attention

PACKAGES = ("numpy", "transformers", "diffusers", "sentencepiece", "safetensors", "pillow", "tqdm",
            "onnxruntime", "onnxruntime-gpu", "tensorrt")
_SMI_FIELDS = ("driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem", "power.draw",
               "power.limit", "temperature.gpu", "pstate", "persistence_mode")


def _nvidia_smi(index: int) -> dict[str, str]:
    if shutil.which("nvidia-smi") is None:
        return {"error": "nvidia-smi not found"}
    try:
        out = subprocess.run(["nvidia-smi", f"--id={index}", f"--query-gpu={','.join(_SMI_FIELDS)}",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    values = [v.strip() for v in out.stdout.strip().split(",")]
    return dict(zip(_SMI_FIELDS, values))


def _packages() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def environment(device: torch.device) -> dict[str, Any]:
    """The record of the machine and the switches that decide kernels."""
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "packages": _packages(),
        "switches": {
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "sdpa_flash": torch.backends.cuda.flash_sdp_enabled(),
            "sdpa_mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "sdpa_cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
            "sdpa_math": torch.backends.cuda.math_sdp_enabled(),
        },
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                       "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
                       **_nvidia_smi(index)}
    return info


# ------------------------------------------------------------------------------------------ ceilings

def _gemm_tflops(n: int, dtype: torch.dtype, device: torch.device, tf32: bool, iterations: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        stats = measure(lambda: torch.matmul(a, b), device, warmup=2, iterations=iterations)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n ** 3 / stats.median / 1e12


def calibrate(device: torch.device, size: int | None = None, copy_bytes: int | None = None,
              iterations: int = 10) -> dict[str, Any]:
    """Measured GEMM TFLOP/s per precision key and device-to-device copy GB/s (read + write)."""
    cuda = device.type == "cuda"
    n = size or (8192 if cuda else 512)
    gemm = {}
    for key, dtype, tf32 in (("fp16", torch.float16, False), ("bf16", torch.bfloat16, False),
                             ("tf32", torch.float32, True), ("fp32", torch.float32, False)):
        if key == "tf32" and not cuda:
            continue  # no TF32 on a CPU: the same as fp32
        gemm[key] = _gemm_tflops(n, dtype, device, tf32, iterations)
    nbytes = copy_bytes or ((2 << 30) if cuda else (64 << 20))
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    stats = measure(lambda: target.copy_(source), device, warmup=2, iterations=iterations)
    return {"gemm_size": n, "gemm_tflops": gemm, "copy_bytes": nbytes,
            "copy_gb_per_s": 2 * nbytes / stats.median / 1e9}


# ------------------------------------------------------------------------------------------ attention

class _RecordSDPA(TorchFunctionMode):
    """Records the shapes of every scaled_dot_product_attention call (runs them unchanged)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            self.calls.append({"q": tuple(q.shape), "k": tuple(k.shape), "v": tuple(v.shape),
                               "mask": None if mask is None else tuple(mask.shape),
                               "scale": kwargs.get("scale")})
        return func(*args, **kwargs)


def record_attention_shapes(modules: Mapping[str, nn.Module], table: StageTable,
                            calls: Iterable[StageCall]) -> list[dict[str, Any]]:
    """Distinct attention shapes of each stage call (modules on the meta device)."""
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    for call in calls:
        if call.stage not in modules:
            continue
        spec = table[call.stage]
        inputs = spec.sample_inputs(call.dims)
        recorder = _RecordSDPA()
        with torch.inference_mode(), recorder:
            modules[call.stage](*(inputs[name].to("meta") for name in spec.input_names))
        for entry in recorder.calls:
            key = (call.stage, entry["q"], entry["k"], entry["mask"])
            if key not in seen:
                seen[key] = {"stage": call.stage, **entry, "calls_per_stage_call": 0}
            seen[key]["calls_per_stage_call"] += 1
    return list(seen.values())


def _backend_name(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float | None) -> str:
    """What torch's SDPA dispatcher picks for these inputs (``torch._fused_sdp_choice``)."""
    try:
        from torch.nn.attention import SDPBackend

        choice = torch._fused_sdp_choice(q, k, v, mask, 0.0, False, scale=scale)  # type: ignore[attr-defined]
        return SDPBackend(choice).name
    except (AttributeError, RuntimeError, ValueError, TypeError) as exc:
        return f"unknown ({type(exc).__name__})"


def attention_census(shapes: Iterable[Mapping[str, Any]], device: torch.device, dtype_of: Mapping[str, torch.dtype],
                     iterations: int = 5, wide_head: int = 256) -> list[dict[str, Any]]:
    """Backend and latency of each recorded shape on ``device`` (dtype per stage as the fast path runs
    it); heads wider than ``wide_head`` (MoVQ) also timed in the plain two-GEMM form."""
    out = []
    for shape in shapes:
        dtype = dtype_of.get(str(shape["stage"]), torch.float32)
        q = torch.randn(shape["q"], device=device, dtype=dtype)
        k = torch.randn(shape["k"], device=device, dtype=dtype)
        v = torch.randn(shape["v"], device=device, dtype=dtype)
        mask = None
        if shape["mask"] is not None:
            mask = torch.ones(shape["mask"], device=device, dtype=torch.bool)
            mask[..., mask.shape[-1] // 2:] = False  # a prompt of half the static length
        scale = shape.get("scale")
        sdpa = functools.partial(F.scaled_dot_product_attention, q, k, v, attn_mask=mask, scale=scale)
        stats = measure(sdpa, device, warmup=1, iterations=iterations)
        row = {**{k_: (list(v_) if isinstance(v_, tuple) else v_) for k_, v_ in shape.items()},
               "dtype": str(dtype).replace("torch.", ""), "backend": _backend_name(q, k, v, mask, scale),
               "sdpa_ms": 1e3 * stats.median}
        if q.shape[-1] > wide_head and mask is None:
            row["math_ms"] = 1e3 * measure(functools.partial(math_attention, q, k, v), device, warmup=1,
                                           iterations=iterations).median
        out.append(row)
    return out
