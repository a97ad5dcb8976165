"""Finding TensorRT and a GPU, with errors that say what is missing and where to get it.

``tensorrt`` is imported lazily (``import kvt`` works without it). Two traps are checked here:

* the ``tensorrt-stubs`` package ships ``tensorrt/__init__.pyi`` only, which Python imports as an empty
  namespace package: ``import tensorrt`` then succeeds but has no ``Builder``;
* the lean runtime without a GPU hands out a null runtime that segfaults when used, so the GPU is
  checked (through torch) before any TensorRT object is created.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from kvt.contract.errors import UnavailableError

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
    return module


def tensorrt_version(trt: ModuleType) -> str:
    return str(trt.__version__)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    compute_capability: str  # "9.0"
    total_memory: int  # bytes

    def __str__(self) -> str:
        return (f"cuda:{self.index} {self.name} (compute capability {self.compute_capability}, "
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
    return GpuInfo(index, props.name, f"{props.major}.{props.minor}", int(props.total_memory))


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
