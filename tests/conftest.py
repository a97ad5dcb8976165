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

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
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

def _write_checkpoints(kind: str, out: Path) -> Path:
    from kvt.models.checkpoint_write import write_checkpoint_dir
    from kvt.models.presets import TINY
    from kvt.models.random_weights import random_models

    return write_checkpoint_dir(random_models(TINY if kind == "tiny" else _micro_preset(), seed=0), out,
                                overwrite=True)


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


_CHECKPOINTS: dict[str, Path] = {}


def _checkpoint_dir(tmp_path_factory, kind: str) -> Path:
    """The session's ``kind`` ("tiny" or "micro") checkpoint directory, written once."""
    if kind in _CHECKPOINTS:
        return _CHECKPOINTS[kind]
    cache = _cache_dir()
    if cache is None:
        out = _write_checkpoints(kind, tmp_path_factory.mktemp("weights") / kind)
    else:
        # Export digests name the weight files by path: a cached export is reused only from the same path.
        out = cache / f"{kind}_checkpoints"
        fresh = _write_checkpoints(kind, cache / f"{kind}_checkpoints.new")
        if out.is_dir() and _same_checkpoints(out, fresh):
            shutil.rmtree(fresh)
        else:
            shutil.rmtree(out, ignore_errors=True)
            fresh.rename(out)
    _CHECKPOINTS[kind] = out
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory) -> Path:
    """A checkpoint directory in the official layout: ``random_models(TINY, seed=0)`` written by
    ``write_checkpoint_dir`` (with its ``kvt-weights.json``). Read-only: copy it to modify it."""
    return _checkpoint_dir(tmp_path_factory, "tiny")


# ------------------------------------------------------------------------------ exports
#
# The session's exports are made by `kvt export` itself, in background processes started when the first
# test runs, while the tests that need no export run first (pytest_collection_modifyitems moves the
# modules that need one to the end). Tracing is most of an export and a CPU-bound job of minutes: on a
# 2-core machine it overlaps the other tests' waiting (servers starting, subprocesses, video encoding).
# Two chains run side by side: the tiny FP32 export, then the reference folder's (same architecture: its
# graphs come from the cache the first one filled); and, at nice 10, the FP16 export of a "micro"
# architecture, whose tests run after those that need only the FP32 exports.
#
# The FP16 export is of ``MICRO``: the tiny preset with two blocks per U-Net level and attention on the
# deepest level only, its T5 and MoVQs unchanged (their FP32 graphs are shared with the tiny export). Its
# tests are about the FP16 policy, the TensorRT static checks, engines and the production Triton path,
# which every U-Net layout exercises alike; the U-Net trace costs half the tiny one's.

EXPORT_FIXTURES = ("tiny_export_fp32", "tiny_export_fp16", "reference_export_fp32")


def _micro_preset():
    import dataclasses

    from kvt.models.presets import TINY

    deep_only = (False, False, False, True)
    unet = dict(num_blocks=(2, 2, 2, 2), add_cross_attention=deep_only, add_self_attention=deep_only)
    config = dataclasses.replace(TINY.config, t2v=dataclasses.replace(TINY.config.t2v, **unet),
                                 interpolation=dataclasses.replace(TINY.config.interpolation, **unet))
    return dataclasses.replace(TINY, name="micro", config=config, description="tests: tiny, fewer U-Net blocks")


def _graph_cache(tmp_path_factory) -> str:
    return str((_cache_dir() or tmp_path_factory.getbasetemp()) / "onnx-graphs")


@pytest.fixture(scope="session")
def graph_cache_dir(tmp_path_factory) -> Path:
    """The graph cache of the session's exports (``$KVT_CACHE_DIR/onnx-graphs`` for a ``kvt`` command)."""
    return Path(_graph_cache(tmp_path_factory))


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


class SessionExports:
    """The session's ``kvt export`` runs: started in the background, waited for by the export fixtures."""

    def __init__(self, tmp_path_factory) -> None:
        self.factory = tmp_path_factory
        self.base = _cache_dir() or tmp_path_factory.mktemp("exports")
        self.env = {**os.environ, "KVT_CACHE_DIR": str(Path(_graph_cache(tmp_path_factory)).parent)}
        self.kvt = shutil.which("kvt", path=str(Path(sys.executable).parent)) or shutil.which("kvt") or "kvt"
        self.commands: dict[str, tuple[list[str], Path]] = {}
        self.done: dict[str, threading.Event] = {}
        self.results: dict[str, tuple[int, str]] = {}
        self.processes: list[subprocess.Popen] = []
        self.stopped = False

    def _command(self, name: str, checkpoints: Path) -> tuple[list[str], Path]:
        from kvt.models.presets import TINY

        tiny_range = ",".join(str(v) for v in TINY.resolution)
        if name == "tiny_export_fp32":
            out = self.base / "tiny_fp32"
            return [self.kvt, "export", "--preset", "tiny", "--weights", str(checkpoints), "--out", str(out),
                    "--jobs", "2"], out
        if name == "tiny_export_fp16":
            out = self.base / "micro_fp16"
            return [self.kvt, "export", "--weights", str(checkpoints), "--precision", "fp16", "--resolution",
                    tiny_range, "--out", str(out), "--jobs", "2"], out
        from support import refdata

        ref, sizes = refdata.reference_dir(), reference_frame_sizes()
        key = hashlib.sha256(f"{ref}|{sizes}".encode()).hexdigest()[:12]  # one export per folder and range
        out = self.base / f"reference_fp32_{key}"
        return [self.kvt, "export", "--weights", str(ref / "checkpoints"), "--resolution",
                ",".join(map(str, sizes)), "--out", str(out), "--jobs", "2"], out

    def start(self, chains: list[list[tuple[str, Path]]]) -> None:
        """Run each chain's exports one after another, the chains side by side."""
        for chain in chains:
            for name, checkpoints in chain:
                self.commands[name] = self._command(name, checkpoints)
                self.done[name] = threading.Event()
            threading.Thread(target=self._run_chain, args=([name for name, _ in chain],), daemon=True).start()

    def _run_chain(self, names: list[str]) -> None:
        for name in names:
            command, _ = self.commands[name]
            if self.stopped:
                self.results[name] = (-1, "the session ended before this export ran")
            else:
                process = subprocess.Popen(command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True, preexec_fn=self._nice(name))
                self.processes.append(process)
                output, _ = process.communicate()
                self.results[name] = (process.returncode, output)
            self.done[name].set()

    @staticmethod
    def _nice(name: str):
        """The FP16 export yields the CPU (nice 10): its tests run last, so it can use what the FP32 chain
        and the first tests leave idle; the FP32 export, which the next tests wait for, gets the cores."""
        if name != "tiny_export_fp16" or not hasattr(os, "nice"):
            return None
        return lambda: os.nice(10)

    def result(self, name: str) -> Path:
        """The export's directory once its run is done; the test fails with the run's output if it failed."""
        if name not in self.done:  # asked for without a prediction (a dynamic request): run it now
            self.start([[(name, _checkpoints_for(self.factory, name))]])
        self.done[name].wait()
        code, output = self.results[name]
        command, out = self.commands[name]
        if code != 0:
            pytest.fail(f"{' '.join(command)} failed (exit code {code}):\n{output[-4000:]}", pytrace=False)
        return out

    def stop(self) -> None:
        self.stopped = True
        for process in self.processes:
            if process.poll() is None:
                process.terminate()


_CHECKPOINT_FIXTURE = {"tiny_export_fp32": "tiny", "tiny_export_fp16": "micro"}


def _checkpoints_for(tmp_path_factory, name: str) -> Path:
    if name == "reference_export_fp32":
        from support import refdata

        return refdata.require_reference() / "checkpoints"
    kind = _CHECKPOINT_FIXTURE[name]
    return _checkpoint_dir(tmp_path_factory, kind)


def _needed_exports(items) -> set[str]:
    needed = set()
    for item in items:
        needed |= {name for name in EXPORT_FIXTURES if name in getattr(item, "fixturenames", ())}
        for mark in item.iter_markers("uses_exports"):
            needed |= set(mark.args)
    return needed


def pytest_collection_modifyitems(config, items) -> None:
    """Modules that need no export first, then those needing only FP32 exports, then those needing the FP16
    one (each module's tests stay together and in order)."""
    group: dict[str, int] = {}
    for item in items:
        module = getattr(getattr(item, "module", None), "__name__", "")
        needed = _needed_exports([item])
        rank = 2 if "tiny_export_fp16" in needed else 1 if needed else 0
        group[module] = max(group.get(module, 0), rank)
    items.sort(key=lambda item: group[getattr(getattr(item, "module", None), "__name__", "")])


@pytest.fixture(scope="session", autouse=True)
def session_exports(request, tmp_path_factory) -> Iterator[SessionExports]:
    """Starts the exports the session's tests need (see above) before the first test runs."""
    from support import refdata

    exports = SessionExports(tmp_path_factory)
    needed = _needed_exports(request.session.items)
    first: list[tuple[str, Path]] = []
    if "tiny_export_fp32" in needed or "reference_export_fp32" in needed:
        first.append(("tiny_export_fp32", _checkpoint_dir(tmp_path_factory, "tiny")))
    if "reference_export_fp32" in needed and (refdata.reference_dir() / "MANIFEST.json").is_file():
        first.append(("reference_export_fp32", refdata.reference_dir() / "checkpoints"))
    chains = [first] if first else []
    if "tiny_export_fp16" in needed:
        chains.append([("tiny_export_fp16", _checkpoint_dir(tmp_path_factory, "micro"))])
    exports.start(chains)
    yield exports
    exports.stop()


@pytest.fixture(scope="session")
def tiny_export_fp32(session_exports) -> Path:
    """The tiny checkpoints (``tiny_checkpoint_dir``) exported in FP32 by ``kvt export`` (every stage,
    with its parity check)."""
    return session_exports.result("tiny_export_fp32")


@pytest.fixture(scope="session")
def tiny_export_fp16(session_exports) -> Path:
    """The ``MICRO`` checkpoints (tiny with fewer U-Net blocks, see above) exported in FP16 by ``kvt export``
    (every stage, with its parity check)."""
    return session_exports.result("tiny_export_fp16")


@pytest.fixture(scope="session")
def reference_export_fp32(session_exports) -> Path:
    """The reference checkpoints exported in FP32 for the ONNX Runtime cases of the end-to-end parity
    test (skips without the reference folder). The architecture is the folder's own (no preset); the
    export's ranges and parity shapes cover the frame sizes of its end-to-end cases."""
    from support import refdata

    refdata.require_reference()
    return session_exports.result("reference_export_fp32")


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
