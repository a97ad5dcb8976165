"""Shared pytest configuration and session fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# One intra-op thread: the networks under test are tiny, so a second thread buys little, and on a shared
# 2-core machine two-thread OpenMP barriers were measured to stall a 0.05 s forward for seconds. The
# reference tolerances cover the 1-thread reduction order (reference README, "1 thread" column).
torch.set_num_threads(1)


def _export_reference(tmp_path_factory, precision: str) -> Path:
    """The reference checkpoints (tiny preset) exported by ``kvt.export`` once per test session.

    ``KVT_TEST_EXPORT_CACHE=DIR`` keeps the exports between runs: the exporter recognises an identical
    export (same weights digest, precision, opset, stages) and reuses it.
    """
    import refdata
    from kvt.export.exporter import ExportOptions, export_onnx
    from kvt.export.source import ExportSource

    ref = refdata.require_reference()
    cache = os.environ.get("KVT_TEST_EXPORT_CACHE")
    base = Path(cache) if cache else tmp_path_factory.mktemp("exports")
    out = base / f"reference_{precision}"
    export_onnx(ExportSource("tiny", weights=str(ref / "checkpoints")), out,
                ExportOptions(precision=precision, jobs=2))
    return out


@pytest.fixture(scope="session")
def reference_export_fp32(tmp_path_factory) -> Path:
    return _export_reference(tmp_path_factory, "fp32")


@pytest.fixture(scope="session")
def reference_export_fp16(tmp_path_factory) -> Path:
    return _export_reference(tmp_path_factory, "fp16")
