"""Shared pytest configuration and fixtures.

Machinery tests (export, backends, engines, Triton, CLI, benchmarks) run on the project's own tiny
checkpoints: seeded random weights written once per session by ``kvt.models.checkpoint_write`` and
exported once per precision by ``kvt.export``. They need no reference data. Parity tests compare with
the golden reference folder (``support.refdata``) and skip, saying where they looked, without it.

``KVT_TEST_EXPORT_CACHE=DIR`` keeps the tiny checkpoints and their exports between runs: the checkpoint
directory is rewritten only when the writer's output changed, and the exporter recognises an identical
export (same weights digest, precision, opset, stages) and reuses it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# One intra-op thread: the networks under test are tiny, so a second thread buys little, and on a shared
# 2-core machine two-thread OpenMP barriers were measured to stall a 0.05 s forward for seconds. The
# reference tolerances cover the 1-thread reduction order (reference README, "1 thread" column).
torch.set_num_threads(1)


def _cache_dir() -> Path | None:
    cache = os.environ.get("KVT_TEST_EXPORT_CACHE")
    if not cache:
        return None
    Path(cache).mkdir(parents=True, exist_ok=True)
    return Path(cache)


# ------------------------------------------------------------------------------ tiny checkpoints

def _write_tiny_checkpoints(out: Path) -> Path:
    from kvt.models.checkpoint_write import write_checkpoint_dir
    from kvt.models.presets import TINY
    from kvt.models.random_weights import random_models

    return write_checkpoint_dir(random_models(TINY, seed=0), out, overwrite=True)


def _same_checkpoints(a: Path, b: Path) -> bool:
    """Same configs.json and the same size and SHA-256 of every binary file (kvt-weights.json)."""
    from kvt.models.registry import CONFIGS_FILE
    from kvt.models.weight_files import WEIGHTS_MANIFEST

    try:
        records = [json.loads((d / WEIGHTS_MANIFEST).read_text())["files"] for d in (a, b)]
        configs = [(d / CONFIGS_FILE).read_text() for d in (a, b)]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return records[0] == records[1] and configs[0] == configs[1]


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory) -> Path:
    """A checkpoint directory in the official layout: ``random_models(TINY, seed=0)`` written by
    ``write_checkpoint_dir`` (with its ``kvt-weights.json``). Read-only: copy it to modify it."""
    cache = _cache_dir()
    if cache is None:
        return _write_tiny_checkpoints(tmp_path_factory.mktemp("weights") / "tiny")
    # Export digests name the weight files by path: a cached export is reused only from the same path.
    out = cache / "tiny_checkpoints"
    fresh = _write_tiny_checkpoints(cache / "tiny_checkpoints.new")
    if out.is_dir() and _same_checkpoints(out, fresh):
        shutil.rmtree(fresh)
        return out
    shutil.rmtree(out, ignore_errors=True)
    fresh.rename(out)
    return out


# ------------------------------------------------------------------------------ exports

def _graph_cache(tmp_path_factory) -> str:
    return str((_cache_dir() or tmp_path_factory.getbasetemp()) / "onnx-graphs")


@pytest.fixture(scope="session")
def graph_cache_dir(tmp_path_factory) -> Path:
    """The graph cache of the session's exports (``$KVT_CACHE_DIR/onnx-graphs`` for a ``kvt`` command)."""
    return Path(_graph_cache(tmp_path_factory))


def _export(source, out: Path, precision: str, graphs: str) -> Path:
    """Export with a graph cache shared by the session's exports: the FP16 export takes the FP32 graphs of the T5 and the
    MoVQs that the FP32 export traced (the cache key covers kvt's code, so a stale graph is never used)."""
    from kvt.export.exporter import ExportOptions, export_onnx

    export_onnx(source, out, ExportOptions(precision=precision, jobs=2, graph_cache=graphs))
    return out


def _export_tiny(tmp_path_factory, checkpoints: Path, precision: str) -> Path:
    """The tiny checkpoints exported by ``kvt export`` (every stage, with its parity check)."""
    from kvt.export.source import ExportSource

    base = _cache_dir() or tmp_path_factory.mktemp("exports")
    return _export(ExportSource("tiny", weights=str(checkpoints)), base / f"tiny_{precision}", precision,
                   _graph_cache(tmp_path_factory))


@pytest.fixture(scope="session")
def tiny_export_fp32(tmp_path_factory, tiny_checkpoint_dir) -> Path:
    return _export_tiny(tmp_path_factory, tiny_checkpoint_dir, "fp32")


@pytest.fixture(scope="session")
def tiny_export_fp16(tmp_path_factory, tiny_checkpoint_dir) -> Path:
    return _export_tiny(tmp_path_factory, tiny_checkpoint_dir, "fp16")


def reference_frame_sizes() -> tuple[int, int, int]:
    """(min, opt, max) frame side of the reference folder's end-to-end cases (their meta.json)."""
    from support import refdata

    sides = []
    for path in refdata.files_with_prefix("e2e/"):
        meta = refdata.reference_dir() / Path(path).parent / "meta.json"
        if meta.is_file():
            kwargs = json.loads(meta.read_text())["kwargs"]
            sides += [int(kwargs.get("width", 512)), int(kwargs.get("height", 512))]
    if not sides:
        sides = [64]
    return min(sides), min(sides), max(sides)


@pytest.fixture(scope="session")
def reference_export_fp32(tmp_path_factory) -> Path:
    """The reference checkpoints exported in FP32 for the ONNX Runtime cases of the end-to-end parity
    test (skips without the reference folder). The architecture is the folder's own (no preset); the
    export's ranges and parity shapes cover the frame sizes of its end-to-end cases."""
    import hashlib

    from kvt.export.exporter import ExportOptions, export_onnx
    from kvt.export.source import ExportSource
    from support import refdata

    ref = refdata.require_reference()
    sizes = reference_frame_sizes()
    base = _cache_dir() or tmp_path_factory.mktemp("exports")
    # One cached export per reference folder and size range (another folder is another export).
    key = hashlib.sha256(f"{ref}|{sizes}".encode()).hexdigest()[:12]
    out = base / f"reference_fp32_{key}"
    export_onnx(ExportSource(None, weights=str(ref / "checkpoints")), out,
                ExportOptions(precision="fp32", jobs=2, resolution=sizes, graph_cache=_graph_cache(tmp_path_factory)))
    return out


# ------------------------------------------------------------------------------ pipelines

@pytest.fixture(scope="module")
def tiny_pipeline():
    """The embedded tiny preset with seeded random weights on the torch backend (one per module)."""
    from kvt.runtime.pipeline import KandinskyVideoPipeline

    return KandinskyVideoPipeline.from_preset("tiny", seed=0)


# ------------------------------------------------------------------------------ Triton

@pytest.fixture(scope="module")
def triton_server_args() -> tuple[str, ...]:
    """Extra tritonserver arguments of a module's server (override in the module)."""
    return ()


@pytest.fixture(scope="module")
def triton_server(triton_repository: Path, triton_server_args: tuple[str, ...]) -> Iterator:
    """The bundled tritonserver (nvidia-pytriton) on loopback serving the module's ``triton_repository``
    fixture; skips without the binary. Stopping it must be clean: exit code 0, nothing left in /dev/shm."""
    from kvt.serving.local_server import ServerError, TritonServer, find_bundled_triton

    try:
        find_bundled_triton()
    except ServerError as exc:
        pytest.skip(f"no tritonserver binary: {exc}")
    server = TritonServer(triton_repository, extra_args=triton_server_args)
    server.start()
    yield server
    code = server.stop()
    assert code == 0, f"server exit code {code}"
    assert not server.shm_leftovers()
