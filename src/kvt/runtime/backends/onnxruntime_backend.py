"""The ONNX Runtime backend: runs the ``<stage>.onnx`` files of an export directory (``kvt export``).

The export directory's ``manifest.json`` is the contract (see :mod:`kvt.formats.export_dir`): it lists the
exported stages, their files and sizes, and the I/O each was exported with. This backend checks every
session's inputs and outputs against that entry and against the stage table the manifest rebuilds, so a
stale or foreign ``.onnx`` file fails at load time with its file name, not with a shape error mid-loop.

Execution providers are chosen explicitly and then verified: ORT silently falls back to the CPU when a
provider cannot be created (missing CUDA libraries, a CPU-only wheel), so the providers each session
really uses are read back with ``session.get_providers()``, logged, and compared with the request.

On ``CUDAExecutionProvider`` the stage tensors live on the GPU and are bound with IOBinding (torch
``data_ptr``s in, torch-allocated outputs out), so the denoising loop never copies through the host.
On the CPU, numpy views of the torch tensors are fed directly.

``onnxruntime`` is imported lazily: the rest of ``kvt`` works without it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvt.contract.dtypes import DType
from kvt.contract.errors import UserError
from kvt.contract.stages import StageSpec
from kvt.formats.export_dir import ExportManifest, ExportManifestError, StageEntry
from kvt.runtime.backends.base import StageBackend

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

class ProviderError(UserError):
    """A requested ONNX Runtime execution provider is not available or was not honoured."""


def import_onnxruntime() -> Any:
    """``onnxruntime``, or an error that says which package to install (never both side by side)."""
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the onnxruntime backend needs ONNX Runtime: `pip install onnxruntime` (CPU) or "
            "`pip install onnxruntime-gpu` (CUDA; install one of the two, never both side by side)"
        ) from exc
    return onnxruntime


def _provider_name(provider: str | tuple[str, dict[str, Any]]) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


def _install_hint(name: str) -> str:
    if name in (CUDA, "TensorrtExecutionProvider"):
        return ("install the GPU build instead of the CPU one: `pip uninstall onnxruntime && pip install "
                "onnxruntime-gpu` (the two packages must never be installed side by side)")
    return "install an onnxruntime build that ships it"


def resolve_providers(providers: Sequence[str | tuple[str, dict[str, Any]]] | str | None = None,
                      device: str | torch.device | None = None) -> tuple[list[Any], bool]:
    """The provider list to request and whether it was explicit (fallback = error, not a warning).

    Default: CUDA then CPU where ``CUDAExecutionProvider`` is available, else CPU only; ``device='cpu'``
    means CPU only and ``device='cuda[:N]'`` means CUDA on GPU N (explicit). Checked against
    ``onnxruntime.get_available_providers()`` before any session is built.
    """
    ort = import_onnxruntime()
    available = list(ort.get_available_providers())
    device = torch.device(device) if device is not None else None
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    explicit = bool(providers) or (device is not None and device.type == "cuda")
    if not providers:
        if device is not None and device.type == "cpu":
            providers = [CPU]
        elif device is not None and device.type == "cuda":
            providers = [CUDA, CPU]
        else:
            providers = [CUDA, CPU] if CUDA in available else [CPU]
    providers = list(providers)
    names = [_provider_name(p) for p in providers]
    if len(set(names)) != len(names):
        raise ProviderError(f"providers {names}: a provider is listed twice")
    for name in names:
        if name not in available:
            raise ProviderError(
                f"ONNX Runtime provider {name!r} is not available in this onnxruntime "
                f"({ort.__version__}, available: {available}); {_install_hint(name)}")
    if device is not None and device.type == "cuda":
        if names[0] != CUDA:
            raise ProviderError(f"device {device} needs {CUDA} first in the providers, got {names}")
        if device.index is not None and isinstance(providers[0], str):
            providers[0] = (CUDA, {"device_id": device.index})
    return providers, explicit


def _provider_options(provider: str | tuple[str, dict[str, Any]]) -> dict[str, Any]:
    return dict(provider[1]) if isinstance(provider, tuple) else {}


def _cuda_device_id(requested: Sequence[Any]) -> int:
    return int(_provider_options(requested[0]).get("device_id", 0))


def _share_torch_stream(requested: list[Any], device: torch.device) -> list[Any]:
    """Run ORT's CUDA work on torch's current stream (unless the user chose a stream): inputs torch
    wrote are then ordered before the session reads them, with no host synchronisation.

    torch's legacy default stream has handle 0, which ORT treats as "no stream" (it then makes its own);
    in that case nothing is shared and :meth:`OnnxRuntimeBackend._run_bound` synchronises instead.
    """
    options = _provider_options(requested[0])
    if "user_compute_stream" in options:
        return requested
    index = device.index if device.index is not None else int(options.get("device_id", 0))
    stream = torch.cuda.current_stream(index).cuda_stream
    if not stream:
        return requested
    options = {**options, "device_id": index, "has_user_compute_stream": "1",
               "user_compute_stream": str(stream)}
    return [(CUDA, options), *requested[1:]]


def _default_session_options() -> Any:
    """Intra-op threads follow torch's setting, so one process has one thread policy (ORT's own
    default is every physical core, which stalls on a shared machine)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    return options


class OnnxRuntimeBackend(StageBackend):
    """Runs the stages of an export directory with ONNX Runtime sessions (one per stage)."""

    name = "onnxruntime"
    any_frame_size = True

    def __init__(
        self,
        export_dir: str | Path,
        providers: Sequence[str | tuple[str, dict[str, Any]]] | str | None = None,
        device: str | torch.device | None = None,
        stages: list[str] | None = None,
        validate: bool = True,
        session_options: Any = None,
        *,
        io_binding: bool | None = None,
    ) -> None:
        """``stages``: the stages to load (default: every exported one). ``io_binding`` defaults to
        on for CUDA sessions; on the CPU it is off (numpy feeds are zero-copy) but can be forced to
        exercise the binding path."""
        ort = import_onnxruntime()
        self.export_dir = Path(export_dir)
        manifest = ExportManifest.read(self.export_dir)
        table = manifest.stage_table()
        names = list(stages) if stages is not None else list(manifest.stages)
        for name in names:
            if name not in table:
                raise ExportManifestError(f"{self.export_dir}: stage {name!r} is not a stage of the table "
                                          f"(stages: {list(table.names)})")
        if not names:
            raise ExportManifestError(f"{self.export_dir}: the manifest lists no exported stage")
        manifest.verify_files(self.export_dir, names)  # sizes only: cheap
        requested, explicit = resolve_providers(providers, device)
        first = _provider_name(requested[0])
        super().__init__(table, "cpu", validate)
        self.manifest = manifest
        self._sessions: dict[str, Any] = {}
        self._closed = False
        self._cuda_stream: str | None = None
        self.io_binding = False

        # Where the stage tensors live: the GPU when the sessions run on CUDA (bound, no host copies),
        # else the CPU (ORT copies CPU feeds itself if a CUDA session gets them).
        if device is not None:
            tensor_device = torch.device(device)
            if tensor_device.type == "cuda" and tensor_device.index is None:
                tensor_device = torch.device("cuda", _cuda_device_id(requested))
        elif first == CUDA and torch.cuda.is_available():
            tensor_device = torch.device("cuda", _cuda_device_id(requested))
        else:
            tensor_device = torch.device("cpu")
            if first == CUDA:
                log.warning("torch %s has no usable GPU: stage tensors stay on the CPU and ONNX Runtime "
                            "copies them to the GPU on every call", torch.__version__)
        if tensor_device.type == "cuda":
            if not torch.cuda.is_available():
                raise ProviderError(f"device {tensor_device}: torch {torch.__version__} has no usable GPU")
            requested = _share_torch_stream(requested, tensor_device)
            self._cuda_stream = _provider_options(requested[0]).get("user_compute_stream")
        self.requested_providers = requested

        options = session_options if session_options is not None else _default_session_options()
        try:
            for name in names:
                entry = manifest.stages[name]
                path = self.export_dir / entry.file
                try:
                    session = ort.InferenceSession(str(path), sess_options=options, providers=requested)
                except Exception as exc:  # ORT raises several types (Fail, InvalidProtobuf, ...)
                    raise ExportManifestError(f"{path}: ONNX Runtime could not load stage {name!r}: "
                                              f"{type(exc).__name__}: {exc}") from None
                used = list(session.get_providers())
                log.info("onnxruntime stage %s (%s): providers %s", name, entry.file, used)
                if used[0] != first:
                    message = (f"{path}: ONNX Runtime runs stage {name!r} on {used}, not on the requested "
                               f"{first}: it fell back (for CUDA: check the CUDA / cuDNN libraries that "
                               "onnxruntime-gpu needs)")
                    if explicit:
                        raise ProviderError(message)
                    log.warning(message)
                _check_io(session, table[name], entry, path)
                self._sessions[name] = session
        except BaseException:
            self._sessions.clear()  # never a half-built backend
            raise

        on_cuda = all(s.get_providers()[0] == CUDA for s in self._sessions.values())
        if tensor_device.type == "cuda" and not on_cuda:
            tensor_device = torch.device("cpu")  # default request fell back (warned above)
        self.device = tensor_device
        self.io_binding = (self.device.type == "cuda") if io_binding is None else bool(io_binding)

    # -------------------------------------------------------------- the interface

    @property
    def providers(self) -> dict[str, list[str]]:
        """Stage -> the providers its session really uses (``session.get_providers()``)."""
        return {name: list(session.get_providers()) for name, session in self._sessions.items()}

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(self._sessions)

    def _session(self, stage: str) -> Any:
        try:
            return self._sessions[stage]
        except KeyError:
            if self._closed:
                raise RuntimeError(f"the onnxruntime backend of {self.export_dir} is closed") from None
            raise KeyError(f"stage {stage!r} is not loaded from {self.export_dir} "
                           f"(loaded: {list(self._sessions)})") from None

    def _run(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        session = self._session(stage)
        spec = self.table[stage]
        if self.io_binding:
            return self._run_bound(session, spec, inputs)
        feeds = {name: np.ascontiguousarray(inputs[name].detach().cpu().numpy()) for name in spec.input_names}
        results = session.run(list(spec.output_names), feeds)
        outputs = {name: torch.from_numpy(value) for name, value in zip(spec.output_names, results)}
        if self.device.type != "cpu":
            outputs = {name: value.to(self.device) for name, value in outputs.items()}
        return outputs

    def _run_bound(self, session: Any, spec: StageSpec, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """IOBinding on torch memory: inputs by ``data_ptr``, outputs allocated by torch with the
        contract's shapes (so a wrong graph shape is a clear error, not a reallocation)."""
        device = self.device
        kind = "cuda" if device.type == "cuda" else "cpu"
        index = (device.index or 0) if kind == "cuda" else 0
        dims = spec.bind_dims(inputs)
        binding = session.io_binding()
        keep: list[torch.Tensor] = []  # contiguous copies must outlive the run
        for tensor_spec in spec.inputs:
            tensor = inputs[tensor_spec.name].to(device).contiguous()
            keep.append(tensor)
            binding.bind_input(tensor_spec.name, kind, index, DType.of_torch(tensor.dtype).numpy.type,
                               tuple(tensor.shape), tensor.data_ptr())
        outputs: dict[str, torch.Tensor] = {}
        for tensor_spec in spec.outputs:
            out = torch.empty(tensor_spec.concrete_shape(dims), dtype=tensor_spec.dtype.torch, device=device)
            binding.bind_output(tensor_spec.name, kind, index, DType.of_torch(out.dtype).numpy.type,
                                tuple(out.shape), out.data_ptr())
            outputs[tensor_spec.name] = out
        if kind == "cuda":
            current = torch.cuda.current_stream(device)
            if self._cuda_stream is None or str(current.cuda_stream) != str(self._cuda_stream):
                current.synchronize()  # ORT runs on its own stream: torch's writes must be done
        session.run_with_iobinding(binding)  # returns once ORT's stream is done (synchronous run)
        return outputs

    def close(self) -> None:
        """Drop the sessions (ORT frees their memory when the last reference goes)."""
        self._sessions.clear()
        self._closed = True

    def __repr__(self) -> str:
        return f"OnnxRuntimeBackend({str(self.export_dir)!r}, providers={self.providers})"


def _check_io(session: Any, spec: StageSpec, entry: StageEntry, path: Path) -> None:
    """The session's inputs and outputs equal the manifest entry's and the stage table's: names in
    order, dtypes, ranks and static sizes."""
    for kind, graph, recorded, contract in (
        ("inputs", session.get_inputs(), entry.inputs, spec.inputs),
        ("outputs", session.get_outputs(), entry.outputs, spec.outputs),
    ):
        graph_names = [arg.name for arg in graph]
        recorded_names = [t.name for t in recorded]
        contract_names = [t.name for t in contract]
        if recorded_names != contract_names:
            raise ExportManifestError(
                f"{path}: manifest {kind} of stage {spec.name!r} are {recorded_names}, the stage table "
                f"says {contract_names}: exported by another kvt version? re-export")
        if sorted(graph_names) != sorted(contract_names):
            raise ExportManifestError(
                f"{path}: the ONNX graph's {kind} are {graph_names}, stage {spec.name!r} needs "
                f"{contract_names}")
        by_name = {arg.name: arg for arg in graph}
        for record, tensor in zip(recorded, contract):
            arg = by_name[tensor.name]
            if record.dtype != tensor.dtype.value or list(record.shape) != list(tensor.shape):
                raise ExportManifestError(
                    f"{path}: manifest records {kind[:-1]} {tensor.name!r} as {record.dtype} "
                    f"{list(record.shape)}, the stage table says {tensor.dtype.value} {list(tensor.shape)}")
            if arg.type != tensor.dtype.ort:
                raise ExportManifestError(
                    f"{path}: {kind[:-1]} {tensor.name!r} is {arg.type} in the ONNX graph, the contract "
                    f"says {tensor.dtype.value} ({tensor.dtype.ort})")
            shape = arg.shape
            if len(shape) != len(tensor.shape):
                raise ExportManifestError(
                    f"{path}: {kind[:-1]} {tensor.name!r} has rank {len(shape)} in the ONNX graph, the "
                    f"contract says {list(tensor.shape)}")
            for axis, (got, want) in enumerate(zip(shape, tensor.shape)):
                if isinstance(want, int) and isinstance(got, int) and got != want:
                    raise ExportManifestError(
                        f"{path}: {kind[:-1]} {tensor.name!r} axis {axis} is {got} in the ONNX graph, the "
                        f"contract says {want}")
                # Output dims may stay symbolic where the contract is static; a static input where the
                # contract is dynamic means the export lost its dynamic axes.
                if kind == "inputs" and isinstance(want, str) and isinstance(got, int):
                    raise ExportManifestError(
                        f"{path}: input {tensor.name!r} axis {axis} is static ({got}) in the ONNX graph, "
                        f"the contract says dynamic {want!r}: exported without dynamic axes")
