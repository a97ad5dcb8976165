"""``kvt rehearse``: build stand-in plans, generate the production repository, serve it on the bundled
tritonserver, send the requests a deployment must serve and refuse, and say whether it behaved.

What a rehearsal shows: that the build flags, the generated configs and Triton agree (the server loads
every model and runs its warm-up samples; every fps mode built serves text-to-video, image-to-video is
served; a size and an fps mode that were not built are refused before any stage runs, naming what is
served). What it cannot show: kernels, GPU memory, the GPU data path, plan deserialisation, speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kvt.contract.errors import UserError
from kvt.contract.files import write_json_atomic
from kvt.contract.profiles import Resolution, coverage, parse_fps_modes
from kvt.contract.request import GenerationRequest
from kvt.contract.stages import FPS_FRAMES, PIXEL_MULTIPLE, StageTable
from kvt.engines.builder import BuildOptions, build_engines
from kvt.formats.engine_dir import EngineManifest
from kvt.formats.export_dir import ExportManifest
from kvt.formats.triton_repo import TENSORRT
from kvt.rehearsal.standin import STANDIN_VERSION, StandinPlanMaker, swap_to_standins
from kvt.serving.client import TritonInvalidRequest, TritonRequestError, TritonVideoClient
from kvt.serving.generator.configs import RepositoryOptions, stage_serving
from kvt.serving.generator.repository import build_repository
from kvt.serving.local_server import TritonServer

LIMITS = ("kernels, GPU memory, the GPU data path (DLPack/CUDA IPC, the CUDA memory pool), plan "
          "deserialisation and speed: stand-ins run the ONNX graphs with ONNX Runtime on the CPU")
Report = Callable[[str], None]


@dataclass
class RequestResult:
    """One request of the rehearsal and what happened to it."""

    kind: str  # "t2v" or "i2v"
    fps: str
    width: int
    height: int
    expected: str  # "served" or "rejected"
    status: str = ""  # "served", "rejected" (refused with INVALID_ARG before any stage ran) or "failed"
    error: str = ""
    seconds: float = 0.0
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == self.expected


@dataclass
class Rehearsal:
    """The outcome: every request, and the deployment that served them."""

    repository: Path
    engines: Path
    requests: list[RequestResult] = field(default_factory=list)
    swapped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.requests) and all(r.ok for r in self.requests)

    def table(self) -> str:
        rows = ["| request | fps | size | expected | status | seconds | error |", "|---|---|---|---|---|---|---|"]
        for r in self.requests:
            error = (r.error or r.note).replace("|", "/")
            rows.append(f"| {r.kind} | {r.fps} | {r.width}x{r.height} | {r.expected} | {r.status} | "
                        f"{r.seconds:.1f} | {error[:160]} |")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "repository": str(self.repository), "engines": str(self.engines),
                "standin_stages": self.swapped, "cannot_show": LIMITS,
                "requests": [{k: v for k, v in asdict(r).items() if k != "note"} for r in self.requests]}


def _stage_counts(server: TritonServer, stages: Sequence[str]) -> dict[str, int]:
    """Executions per stage model so far (Triton's statistics)."""
    import tritonclient.http as http

    client = http.InferenceServerClient(server.http_url)
    try:
        stats = client.get_inference_statistics()
    finally:
        client.close()
    counts = {s["name"]: int(s.get("inference_count", 0)) for s in stats.get("model_stats", [])}
    return {name: counts.get(name, 0) for name in stages}


def _test_image(width: int, height: int) -> Image.Image:
    """A deterministic RGB image at the output size (image-to-video without --image)."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _unbuilt_size(table: StageTable, served: set[tuple[int, int]]) -> tuple[int, int]:
    """A size inside the export's range that no plan serves; else one just outside the range."""
    rng = table.resolution
    sides = range(rng.min, rng.max + 1, PIXEL_MULTIPLE)
    for h in sides:
        for w in sides:
            if (w, h) not in served:
                return w, h
    return rng.max + PIXEL_MULTIPLE, rng.max + PIXEL_MULTIPLE


def rehearse(onnx_dir: str | Path, out: str | Path, resolutions: Sequence[Resolution] = (),
             fps_modes: Sequence[str] = (), batch_range: str = "requests", image: Image.Image | None = None,
             steps: tuple[int, int, int] = (2, 2, 1), report: Report = print,
             options: RepositoryOptions | None = None) -> Rehearsal:
    """Rehearse the deployment ``kvt build`` + ``kvt triton-repo --backend tensorrt`` would make from
    ``onnx_dir`` with these flags; everything is written under ``out``."""
    onnx_dir, out = Path(onnx_dir), Path(out)
    if batch_range not in ("requests", "table"):
        raise UserError(f"--batch-range {batch_range!r}: allowed: requests, table")
    modes = parse_fps_modes(fps_modes)
    engines, repo = out / "engines", out / "repository"
    report(f"stand-in plans (the profiles `kvt build` records for these flags) -> {engines}")
    build_engines(onnx_dir, engines, resolutions, modes, None, BuildOptions(overwrite=True), report,
                  table_batch=batch_range == "table", maker=StandinPlanMaker())
    options = options or RepositoryOptions(backend=TENSORRT)
    report(f"the production repository (`kvt triton-repo --backend tensorrt`) -> {repo}")
    build_repository(repo, None, engines, options, tensorrt_version=STANDIN_VERSION, overwrite=True)
    result = Rehearsal(repo, engines)
    result.swapped = swap_to_standins(repo, onnx_dir)
    report(f"stand-ins for Triton's TensorRT backend: {', '.join(result.swapped)}; it cannot show {LIMITS}")

    table = ExportManifest.read(onnx_dir).stage_table()
    manifest = EngineManifest.read(engines)
    served_profiles = {name: stage_serving(table[name], {p.key.compute_capability: p for p in entries}).profiles
                       for name, entries in manifest.stages.items()}
    cover = coverage(table, served_profiles)
    first = resolutions[0] if resolutions else Resolution(table.resolution.opt, table.resolution.opt)
    size = (first.width, first.height)
    built = modes or tuple(FPS_FRAMES)
    key, base, interp = steps
    plan: list[tuple[RequestResult, GenerationRequest]] = []

    def add(kind: str, fps: str, w: int, h: int, expected: str, picture: Image.Image | None) -> None:
        request = GenerationRequest(prompt="a red fox running through snow", image=picture, width=w, height=h,
                                    fps=fps, seed=0, key_frame_steps=key, base_frame_steps=base,
                                    interpolation_steps=interp)
        plan.append((RequestResult(kind, fps, w, h, expected), request))

    for fps in built:
        add("t2v", fps, *size, "served", None)
    add("i2v", built[0], *size, "served", image or _test_image(*size))
    served_sizes = {s for fps in built for s in cover.sizes[(fps, False)]}
    add("t2v", built[0], *_unbuilt_size(table, served_sizes), "rejected", None)
    unbuilt = [fps for fps in FPS_FRAMES if fps not in cover.fps_modes(False)]
    if unbuilt:
        add("t2v", unbuilt[0], *size, "rejected", None)
    else:
        report("every fps mode is built: no unbuilt fps mode to send")

    result.requests = [entry for entry, _ in plan]
    report("starting the bundled tritonserver on loopback (model loads and warm-ups run now)")
    with TritonServer(repo) as server, TritonVideoClient(server.grpc_url, "grpc", timeout=1800.0) as client:
        client.require_ready()
        for entry, request in plan:
            before = _stage_counts(server, table.names)
            start = time.perf_counter()
            try:
                client.generate(request)
                entry.status = "served"
            except TritonInvalidRequest as exc:
                after = _stage_counts(server, table.names)
                ran = [s for s in table.names if after[s] != before[s]]
                entry.status = "rejected" if not ran else "failed"
                entry.error = str(exc) + (f" (after stages {ran} ran)" if ran else "")
            except TritonRequestError as exc:
                entry.status, entry.error = "failed", str(exc)
            entry.seconds = time.perf_counter() - start
            report(f"{entry.kind} fps {entry.fps} {entry.width}x{entry.height}: {entry.status}"
                   f"{'' if entry.ok else f' (expected {entry.expected})'}"
                   f"{': ' + entry.error if entry.error else ''}")
    return result


def write_report(result: Rehearsal, path: str | Path) -> Path:
    return write_json_atomic(path, result.to_dict(), indent=2)


__all__ = ["LIMITS", "Rehearsal", "RequestResult", "rehearse", "write_report"]
