"""Finding TensorRT and a GPU, with errors that say what is missing and where to get it.

``tensorrt`` is imported lazily (``import kvt`` works without it). Three traps are checked here:

* the ``tensorrt-stubs`` package ships ``tensorrt/__init__.pyi`` only, which Python imports as an empty
  namespace package: ``import tensorrt`` then succeeds but has no ``Builder``;
* a TensorRT older than :data:`MIN_TENSORRT_VERSION` is refused with a clear message: 10.0 lacks
  ``device_memory_size_v2`` / ``set_device_memory`` (added in 10.1), strongly typed ONNX import is
  complete only from 10.12 (NVIDIA's strong-typing migration guide), and the support matrix the static
  checks use is the one that version is known to cover (kvt.engines.static_checks);
* the lean runtime without a GPU hands out a null runtime that segfaults when used, so the GPU is
  checked (through torch) before any TensorRT object is created.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from kvt.contract.errors import UnavailableError

# The oldest TensorRT kvt builds and runs with (see the module docstring; docs/TENSORRT.md lists every
# TensorRT API kvt uses with the version that introduced it).
MIN_TENSORRT_VERSION = "10.12"

INSTALL_HINT = (
    "run inside NVIDIA's TensorRT or Triton container (e.g. `docker run --gpus all -it "
    "nvcr.io/nvidia/tensorrt:25.10-py3`, or nvcr.io/nvidia/tritonserver:25.10-py3), or install it on a "
    "machine with an NVIDIA GPU that can reach NVIDIA's package index: `pip install tensorrt` "
    "(the wheels download from pypi.nvidia.com)")


log = logging.getLogger(__name__)


class TensorRTUnavailable(UnavailableError):
    """TensorRT (or a GPU for it) is missing on this machine."""


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or :class:`TensorRTUnavailable` naming the fix."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: a wheel whose CUDA libraries are missing
        raise TensorRTUnavailable(f"TensorRT is not installed (import tensorrt: {exc}); {INSTALL_HINT}") from None
    if not hasattr(trt, "Builder") or not hasattr(trt, "__version__"):
        where = list(getattr(trt, "__path__", []))
        raise TensorRTUnavailable(
            f"`import tensorrt` found only API stubs or an empty package at {where} (e.g. the "
            f"tensorrt-stubs package), not the TensorRT library; {INSTALL_HINT}")
    module: ModuleType = trt  # Any to mypy where tensorrt is not installed
    check_tensorrt_version(module)
    return module


def tensorrt_version(trt: ModuleType) -> str:
    return str(trt.__version__)


def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.13.0.35"`` -> (10, 13, 0, 35); non-numeric tails ("10.14.0.post1") are cut off."""
    parts = []
    for part in version.split("."):
        digits = "".join(ch for ch in part if ch.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_tensorrt_version(trt: ModuleType) -> None:
    """Refuse a TensorRT older than :data:`MIN_TENSORRT_VERSION` (a clear message, not an
    AttributeError mid-build)."""
    version = tensorrt_version(trt)
    have, need = version_tuple(version), version_tuple(MIN_TENSORRT_VERSION)
    if not have or have[:len(need)] < need:
        raise TensorRTUnavailable(
            f"TensorRT {version} is older than {MIN_TENSORRT_VERSION}, the oldest kvt supports (it needs "
            "device_memory_size_v2/set_device_memory and complete strongly typed ONNX import); use "
            f"TensorRT {MIN_TENSORRT_VERSION} or newer (`pip install tensorrt`, or an NGC container whose "
            "release notes list TensorRT >= " + MIN_TENSORRT_VERSION + "; `kvt doctor` prints the version)")


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str  # the device name CUDA reports, e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: str  # "9.0"
    total_memory: int  # bytes
    sm_count: int = 0  # streaming multiprocessors (0: unknown)

    def __str__(self) -> str:
        sms = f", {self.sm_count} SMs" if self.sm_count else ""
        return (f"cuda:{self.index} {self.name} (compute capability {self.compute_capability}{sms}, "
                f"{self.total_memory / 2**30:.1f} GiB)")


def require_gpu(index: int = 0) -> GpuInfo:
    """The GPU TensorRT will build for or run on, checked before any TensorRT object exists."""
    import torch

    if not torch.cuda.is_available():
        built = torch.backends.cuda.is_built()  # type: ignore[no-untyped-call]  # unannotated in torch
        reason = ("torch was built without CUDA" if not built
                  else "no CUDA GPU is visible (driver missing, or CUDA_VISIBLE_DEVICES hides it)")
        raise TensorRTUnavailable(
            f"TensorRT needs an NVIDIA GPU: {reason} (torch {torch.__version__}); run on a GPU machine, "
            "e.g. `docker run --gpus all ...` with the NVIDIA container toolkit")
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise TensorRTUnavailable(f"GPU index {index}: this machine has {count} GPU(s) (0..{count - 1})")
    props = torch.cuda.get_device_properties(index)
    return GpuInfo(index, props.name, f"{props.major}.{props.minor}", int(props.total_memory),
                   int(props.multi_processor_count))


def make_logger(trt: ModuleType, verbose: bool = False) -> Any:
    """A TensorRT logger that forwards to ``logging`` and remembers errors for exception messages."""

    # A class of a module passed in at run time: mypy cannot take it as a base class by name.
    logger_base: Any = trt.ILogger

    class _Logger(logger_base):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("TensorRT: %s", msg)
            elif verbose or severity != trt.ILogger.Severity.VERBOSE:
                (log.info if verbose else log.debug)("TensorRT: %s", msg)

    return _Logger()
