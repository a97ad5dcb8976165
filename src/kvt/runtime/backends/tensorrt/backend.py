"""The TensorRT backend: runs the plans of an engine directory (``kvt build``) on one GPU.

The engine directory's manifest (see :mod:`kvt.formats.engine_dir`) is the contract: the stage table is
rebuilt from the export summary it records, and for every stage the plan built for *this* TensorRT
version and *this* GPU (model name, SM count, compute capability) is loaded; a directory with plans only
for another version or GPU fails at load time with the command that rebuilds them, never with a crash
mid-request. Plans are mapped from disk (no copy in host memory) and checked by size and a fingerprint
recorded at build time; the full SHA-256 is `kvt doctor --verify-plans`'s job.

All engines share one activation buffer (they run one after another), sized for the shapes in use and
grown on demand, and run on one CUDA stream of the backend, ordered after torch's current stream on
entry and before it on exit: the pipeline's tensors stay on the GPU and no call waits for the host. The
outputs of the denoising-loop stages (the U-Nets) are buffers reused per shape, valid until the next
call of that stage with the same shapes (the pipeline consumes them at once); other stages return fresh
tensors, with or without CUDA graphs. Optional CUDA graphs per shape (see the runner).

``tensorrt`` is imported lazily, after the GPU check (the lean runtime crashes without a GPU).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import torch

from kvt.contract.profiles import ServedProfiles, profiles_from_key
from kvt.formats.engine_cache import EngineCache
from kvt.formats.engine_dir import EngineManifestError, PlanTarget, stage_table_of
from kvt.runtime.backends.base import StageBackend
from kvt.runtime.backends.tensorrt.runner import ActivationArena, Engine
from kvt.runtime.backends.tensorrt.trt_env import GpuInfo, import_tensorrt, require_gpu, tensorrt_version

log = logging.getLogger(__name__)



class TensorRTBackend(StageBackend):
    """Runs the stages of an engine directory with TensorRT on one CUDA device."""

    name = "tensorrt"

    def __init__(
        self,
        engine_dir: str | Path,
        device: str | torch.device = "cuda",
        stages: list[str] | None = None,
        validate: bool = True,
        *,
        cuda_graphs: bool = False,
        reuse_outputs: tuple[str, ...] | None = None,
        trt: ModuleType | None = None,
        gpu: GpuInfo | None = None,
    ) -> None:
        """``stages``: the stages to load (default: every stage the manifest has plans for).
        ``trt`` / ``gpu`` are for tests with a fake TensorRT library."""
        self.engine_dir = Path(engine_dir)
        cache = EngineCache(self.engine_dir)
        manifest = cache.manifest()
        table = stage_table_of(manifest, self.engine_dir)
        names = list(stages) if stages is not None else list(manifest.stages)
        for name in names:
            if name not in table:
                raise EngineManifestError(f"{self.engine_dir}: stage {name!r} is not a stage of the table "
                                          f"(stages: {list(table.names)})")
        if not names:
            raise EngineManifestError(f"{self.engine_dir}: the manifest lists no plan")
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"device {device}: the tensorrt backend runs on CUDA devices only (cuda, cuda:N)")
        index = device.index if device.index is not None else 0
        gpu = gpu or require_gpu(index)  # before any TensorRT object exists
        trt = trt or import_tensorrt()
        version = tensorrt_version(trt)
        # Every plan is chosen (and stale ones refused) before the first is deserialized.
        target = PlanTarget(version, gpu.compute_capability, gpu.name, gpu.sm_count)
        entries = {name: cache.select(name, target, manifest) for name in names}
        super().__init__(table, torch.device("cuda", index), validate)
        self.manifest = manifest
        self.entries = entries
        self.gpu = gpu
        self.tensorrt_version = version
        self.cuda_graphs = cuda_graphs
        self.arena = ActivationArena(self.device)
        self._stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]  # unannotated in torch
        self._engines: dict[str, Engine] = {}
        self._closed = False
        try:
            with torch.cuda.device(self.device):
                for name, entry in entries.items():
                    with cache.open_plan(entry) as plan:
                        self._engines[name] = Engine(
                            plan, table[name], self.device, arena=self.arena,
                            reuse_outputs=name in (table.loop_stages if reuse_outputs is None else reuse_outputs),
                            cuda_graphs=cuda_graphs, trt=trt, name=f"{self.engine_dir / entry.plan}")
                    log.info("tensorrt stage %s: %s (%d bytes, activation memory up to %.1f MiB)", name,
                             entry.plan, entry.bytes, self._engines[name].max_activation_bytes / 2**20)
        except BaseException:
            self.close()
            raise
        log.info("tensorrt backend: %d engines on %s; one activation buffer, sized by the shapes in use",
                 len(self._engines), gpu)

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(self._engines)

    def served_profiles(self) -> ServedProfiles:
        """The profiles of the loaded plans: a request outside them is refused before any stage runs."""
        return {name: (profiles_from_key(entry.key.profiles),) for name, entry in self.entries.items()}

    def _engine(self, stage: str) -> Engine:
        try:
            return self._engines[stage]
        except KeyError:
            if self._closed:
                raise RuntimeError(f"the tensorrt backend of {self.engine_dir} is closed") from None
            raise KeyError(f"stage {stage!r} is not loaded from {self.engine_dir} "
                           f"(loaded: {list(self._engines)})") from None

    def _run(self, stage: str, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        engine = self._engine(stage)
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)  # torch's writes to the inputs come first
        with torch.cuda.stream(self._stream):
            outputs = engine(inputs, self._stream)
        current.wait_stream(self._stream)  # and the caller's reads of the outputs after
        for tensor in outputs.values():
            tensor.record_stream(current)
        return outputs

    def close(self) -> None:
        """Wait for the backend's stream, then drop engines and the activation buffer."""
        if self._engines and hasattr(self, "_stream"):
            self._stream.synchronize()
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
        if hasattr(self, "arena"):
            self.arena.release()
        self._closed = True

    def __repr__(self) -> str:
        return f"TensorRTBackend({str(self.engine_dir)!r}, TensorRT {self.tensorrt_version}, {self.gpu})"
