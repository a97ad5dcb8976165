"""Access to the golden reference folder (``KVT_REFERENCE_DIR``, default ``../shared/reference``).

Tests iterate over ``MANIFEST.json`` rather than hard-coding file names, so any other reference folder in
the same format runs the same tests unchanged.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import pytest

_DEFAULT = Path(__file__).resolve().parents[2].parent / "shared" / "reference"


def reference_dir() -> Path:
    return Path(os.environ.get("KVT_REFERENCE_DIR", _DEFAULT)).resolve()


def require_reference() -> Path:
    """The reference folder, or a skip that says where it was looked for and how to point at it."""
    path = reference_dir()
    if not (path / "MANIFEST.json").is_file():
        pytest.skip(f"reference data not found at {path} (set KVT_REFERENCE_DIR to a folder with MANIFEST.json)")
    return path


@cache
def manifest() -> dict[str, Any]:
    path = reference_dir() / "MANIFEST.json"
    if not path.is_file():
        return {"files": {}, "tolerances": {}}
    return json.loads(path.read_text())


def files_with_prefix(prefix: str) -> list[str]:
    """Manifest file paths under ``prefix`` (e.g. ``"modules/"``), in manifest order."""
    return [f for f in manifest()["files"] if f.startswith(prefix)]


def file_entry(path: str) -> dict[str, Any]:
    return manifest()["files"][path]


def case_name(path: str) -> str:
    """``modules/t2v_unet_image_A.safetensors`` -> ``t2v_unet_image_A`` (the key in ``tolerances``)."""
    return Path(path).name.split(".")[0]


def load_tensors(path: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(reference_dir() / path))


@cache
def stated_tolerances() -> dict[str, float]:
    """The "recommended atol" column of the Tolerances table in the reference README, per case."""
    readme = reference_dir() / "README.md"
    if not readme.is_file():
        return {}
    out: dict[str, float] = {}
    for line in readme.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].startswith("`") and cells[0].endswith("`"):
            try:
                out[cells[0].strip("`")] = float(cells[5])
            except ValueError:
                continue
    return out


def recommended_atol(case: str) -> float:
    """The tolerance the reference README states for ``case``.

    Falls back to the README's rule (10x the worst of the 1-thread and fp64 differences, rounded up on
    the 1-2-5 series) for a reference folder whose README has no table row for the case.
    """
    import math

    stated = stated_tolerances()
    if case in stated:
        return stated[case]
    tol = manifest()["tolerances"][case]
    worst = 10 * max(tol["rerun_1_thread"], tol["fp32_vs_fp64"])
    exponent = math.floor(math.log10(worst))
    for step in (1, 2, 5, 10):
        if worst <= step * 10**exponent:
            return step * 10**exponent
    raise AssertionError("unreachable")
