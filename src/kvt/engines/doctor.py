"""``kvt doctor``: what is installed and usable here, and therefore which backends will run.

Only looks: imports modules, asks torch about GPUs, runs ``nvidia-smi`` for the driver version and
finds ``tritonserver`` on disk. No TensorRT object is created (the lean runtime crashes without a GPU).
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kvt.runtime.backends.tensorrt.trt_env import TensorRTUnavailable, import_tensorrt, require_gpu


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)
    backends: dict[str, str] = field(default_factory=dict)  # backend -> "ready (...)" / "unavailable: ..."

    def add(self, name: str, ok: bool, detail: str) -> Check:
        check = Check(name, ok, detail)
        self.checks.append(check)
        return check

    def to_dict(self) -> dict[str, Any]:
        return {"checks": [asdict(c) for c in self.checks], "backends": self.backends}

    def render(self) -> str:
        width = max(len(c.name) for c in self.checks) if self.checks else 0
        lines = [f"{'ok ' if c.ok else '-- '} {c.name:<{width}}  {c.detail}" for c in self.checks]
        lines.append("")
        lines.append("backends:")
        lines += [f"  {name:<12} {state}" for name, state in self.backends.items()]
        return "\n".join(lines)


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def driver_version() -> str | None:
    """The NVIDIA driver version from nvidia-smi, or None where there is none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def find_tritonserver() -> str | None:
    """tritonserver on PATH, in the NGC container's location, or bundled with nvidia-pytriton."""
    found = shutil.which("tritonserver")
    if found:
        return found
    candidates = [Path("/opt/tritonserver/bin/tritonserver")]
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(Path(location) / "tritonserver" / "bin" / "tritonserver")
    for path in candidates:
        if path.is_file():
            return str(path)
    return None


def diagnose() -> DoctorReport:
    report = DoctorReport()
    report.add("python", True, sys.version.split()[0])
    import torch

    cuda_built = torch.backends.cuda.is_built()
    report.add("torch", True, f"{torch.__version__} ({'CUDA ' + str(torch.version.cuda) if cuda_built else 'CPU build'})")
    gpu = None
    try:
        gpu = require_gpu(0)
        names = [str(require_gpu(i)) for i in range(torch.cuda.device_count())]
        report.add("gpu", True, "; ".join(names))
    except TensorRTUnavailable as exc:
        report.add("gpu", False, str(exc).split(";")[0])
    driver = driver_version()
    report.add("nvidia driver", driver is not None, driver or "nvidia-smi not found")

    trt_detail, trt_ok = "", False
    try:
        trt = import_tensorrt()
        trt_ok = True
        trt_detail = f"{trt.__version__}"
    except TensorRTUnavailable as exc:
        trt_detail = str(exc)
    stubs = _version("tensorrt-stubs")
    if stubs and not trt_ok:
        trt_detail += f" [tensorrt-stubs {stubs} installed: API names only]"
    report.add("tensorrt", trt_ok, trt_detail)

    providers: list[str] = []
    try:
        import onnxruntime

        providers = list(onnxruntime.get_available_providers())
        report.add("onnxruntime", True, f"{onnxruntime.__version__}; providers {', '.join(providers)}")
    except ImportError:
        report.add("onnxruntime", False, "not installed (`pip install onnxruntime` or onnxruntime-gpu)")

    server = find_tritonserver()
    report.add("tritonserver", server is not None, server or "not found (NGC container nvcr.io/nvidia/tritonserver)")
    client = _version("tritonclient")
    report.add("tritonclient", client is not None, client or "not installed (`pip install tritonclient[http]`)")

    report.backends["torch"] = f"ready ({'CPU and CUDA' if gpu else 'CPU'})"
    if providers:
        where = "CUDA" if "CUDAExecutionProvider" in providers else "CPU"
        report.backends["onnxruntime"] = f"ready ({where})"
    else:
        report.backends["onnxruntime"] = "unavailable: onnxruntime is not installed"
    if trt_ok and gpu:
        report.backends["tensorrt"] = f"ready (TensorRT {trt_detail} on compute capability {gpu.compute_capability})"
    else:
        missing = [w for w, ok in (("TensorRT", trt_ok), ("a CUDA GPU", gpu is not None)) if not ok]
        report.backends["tensorrt"] = f"unavailable: needs {' and '.join(missing)}"
    if client and server:
        report.backends["triton"] = "ready (client and server)"
    elif client:
        report.backends["triton"] = "client only: can reach a remote server, cannot start one here"
    else:
        report.backends["triton"] = "unavailable: tritonclient is not installed"
    return report
