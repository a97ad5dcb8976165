"""A cache of traced and cleaned stage graphs (weights still graph inputs), shared by every export.

Tracing is most of an export's time: torch.export with dynamic shapes, its decompositions and the
translation to ONNX cost about 1.5 CPU-minutes per tiny U-Net on this project's machine, whatever the
weights (benchmarks/RESULTS.md, "ONNX export"). The graph of a stage does not depend on the weights:
they are graph inputs until attach.py streams them in. So a graph is cached under a key of everything
it does depend on, and a later export of the same architecture (other weights or seed, the FP32
stages of an FP16 export, the test suite's several tiny exports) only streams weights and checks
parity.

The key covers the stage contract (its profile ranges only through the sample sizes traced at), the
config of the stage's network (and the T5 config), the compute precision, the opset, the versions of
every tool that shapes the graph, and the source code of kvt itself: any change to any of them is a
different key, so a stale graph is never used. Entries are written atomically;
nothing else is ever read from the cache. Location: ``$KVT_CACHE_DIR/onnx-graphs`` (default
``$XDG_CACHE_HOME/kvt``, else ``~/.cache/kvt``); ``kvt export --no-graph-cache`` bypasses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

import kvt
from kvt.contract.files import atomic_path
from kvt.contract.stages import StageSpec
from kvt.export.graph_export import trace_dims
from kvt.models.registry import network_spec

CACHE_ENV = "KVT_CACHE_DIR"
_TOOLS = ("torch", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "polygraphy", "onnx-graphsurgeon",
          "transformers")
_KEY_VERSION = 3
_T5_NOT_ARCHITECTURE = ("_name_or_path", "transformers_version", "architectures")


def default_cache_dir() -> Path:
    """``$KVT_CACHE_DIR/onnx-graphs``, else ``$XDG_CACHE_HOME/kvt/onnx-graphs``, else ``~/.cache/...``."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root) / "onnx-graphs"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "kvt" / "onnx-graphs"


@lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 over kvt's own Python sources (path and bytes): a code change is a new cache key."""
    root = Path(kvt.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@lru_cache(maxsize=1)
def _tool_versions() -> tuple[tuple[str, str], ...]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in _TOOLS:
        try:
            out.append((package, version(package)))
        except PackageNotFoundError:
            out.append((package, "-"))
    return tuple(out)


def t5_architecture(t5_config: Any) -> dict[str, Any]:
    """The T5 config's keywords without what a saved folder adds (its path, the writer's version), as JSON
    reads them back (integer label keys become strings), so a manifest compares equal to its re-read."""
    kept = {k: v for k, v in t5_config.to_dict().items() if k not in _T5_NOT_ARCHITECTURE}
    return dict(json.loads(json.dumps(kept, default=str)))


def graph_key(spec: StageSpec, config: Any, t5_config: Any, compute: str, opset: int) -> str:
    """The cache key of a stage's cleaned graph (hex SHA-256)."""
    # The T5 config shapes only the text encoder's graph; of it, what a saved folder adds (its path, the
    # writer's version, the class name) is left out: random weights and a checkpoint directory of one
    # architecture share the graphs of every other stage.
    t5 = {} if t5_config is None or spec.network != "text_encoder" else t5_architecture(t5_config)
    # Of the model config, the stage's own network's part: the other networks and the folder name of the
    # T5 weights do not shape this graph (the dims it shares with them are in the stage contract).
    network_config = getattr(config, network_spec(spec.network).config_field)
    if spec.network == "text_encoder":
        network_config = dataclasses.replace(network_config, weights_path="")
    # The profiles' ranges are not in the graph (every axis stays symbolic; graph_export checks that):
    # what the trace sees of them is the sample values it traces at. An export of the same architecture
    # for other frame sizes (the full preset at 512x512 only, the reference cases' range) shares the graphs.
    stage = {k: v for k, v in spec.to_dict().items() if k != "profiles"}
    stage["trace_dims"] = trace_dims(spec)
    described = {
        "version": _KEY_VERSION, "stage": stage, "config": repr(network_config),
        "t5": json.dumps(t5, sort_keys=True, default=str), "compute": compute, "opset": opset,
        "tools": _tool_versions(), "code": code_digest(),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


class GraphCache:
    """Graph files by key in one folder (``<key>.onnx``)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.onnx"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def fetch(self, key: str, destination: Path) -> bool:
        """Copy the graph of ``key`` to ``destination``; False when it is not cached."""
        try:
            shutil.copyfile(self.path(key), destination)
        except FileNotFoundError:
            return False
        return True

    def store(self, key: str, graph: Path) -> None:
        """Add ``graph`` under ``key`` (atomically; a failure to write the cache is not an export error)."""
        try:
            with atomic_path(self.path(key)) as tmp:
                shutil.copyfile(graph, tmp)
        except OSError:
            return
