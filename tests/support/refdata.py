"""Access to the golden reference folder (``KVT_REFERENCE_DIR``, default ``../shared/reference``).

Tests iterate over ``MANIFEST.json`` rather than hard-coding file names, take every architecture fact
from the folder's ``checkpoints/configs.json`` and checkpoints (loaded by the project's own loader, as a
user's folder would be) and every expected figure from ``MANIFEST.json`` (cases, tolerances, notes), the
README's stated tolerances or the stored outputs, so any other reference folder made by the official
code in the same format (other seeds, dimensions, sizes, knobs) runs the same tests unchanged.
"""

from __future__ import annotations

import json
import math
import os
import re
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


# ------------------------------------------------------------------------------ architecture

def checkpoints_dir() -> Path:
    return reference_dir() / "checkpoints"


@cache
def configs_json() -> dict[str, Any]:
    """The folder's ``checkpoints/configs.json`` as the official loader reads it."""
    return json.loads((checkpoints_dir() / "configs.json").read_text())


@cache
def config() -> Any:
    """The folder's architecture, parsed by the project's loader from ``checkpoints/configs.json``."""
    from kvt.models.configs import KandinskyVideoConfig

    return KandinskyVideoConfig.from_json(checkpoints_dir() / "configs.json")


@cache
def _models(folder: Path) -> Any:
    from kvt.models.checkpoints import load_checkpoint_dir

    return load_checkpoint_dir(folder)


def models() -> Any:
    """Every network of the folder, loaded strictly (configs.json + checkpoints) by the project's
    checkpoint loader, float32 on the CPU; shared by the tests of a session (do not modify)."""
    require_reference()
    return _models(checkpoints_dir())


def tokens_length() -> int:
    return int(configs_json()["text_encoder"]["tokens_length"])


# ------------------------------------------------------------------------------ cases and figures

def module_cases(producer: str) -> list[str]:
    """``modules/`` files whose producer contains ``producer``, in manifest order."""
    return [p for p in files_with_prefix("modules/") if producer in file_entry(p).get("producer", "")]


def note(name: str) -> dict[str, Any] | None:
    """A measurement the manifest records under ``notes`` (None when this folder has none)."""
    value = manifest().get("notes", {}).get(name)
    return value if isinstance(value, dict) else None


def note_case(name: str) -> str:
    """The case a note was measured on: its ``case`` text starts with the case name."""
    entry = note(name)
    if entry is None:
        pytest.skip(f"MANIFEST.json of {reference_dir()} records no note {name!r}")
    match = re.match(r"[A-Za-z0-9_]+", str(entry.get("case", "")))
    if match is None:
        pytest.fail(f"note {name!r}: no case name at the start of {entry.get('case')!r}")
    return match.group(0)


def case_path(case: str) -> str:
    """The manifest path of a module case named ``case``."""
    for path in files_with_prefix("modules/"):
        if case_name(path) == case:
            return path
    pytest.fail(f"case {case!r} is not a modules/ file of MANIFEST.json")


def _readme() -> str:
    readme = reference_dir() / "README.md"
    return readme.read_text() if readme.is_file() else ""


def _stated(pattern: str, what: str) -> re.Match[str]:
    match = re.search(pattern, _readme())
    if match is None:
        pytest.fail(f"the README of {reference_dir()} states no {what} (pattern {pattern!r})")
    return match


def stated_e2e_latent_atol() -> float:
    """"a correct float32 implementation should match latents to **atol X**" (README, Tolerances)."""
    return float(_stated(r"match latents to \*\*atol ([0-9.eE+-]+)\*\*", "end-to-end latent tolerance").group(1))


def stated_e2e_frame_tolerance() -> tuple[int, float]:
    """"frames to **|Δ| ≤ N on at most P % of the uint8 values**": (N, P / 100)."""
    match = _stated(r"\|Δ\| ≤ (\d+) on at most ([0-9.]+) ?% of the uint8 values", "end-to-end frame tolerance")
    return int(match.group(1)), float(match.group(2)) / 100


def stated_scheduler_atol() -> float:
    """The scheduler-step tolerance: "Scheduler `step`: ... Use atol X" (README, Tolerances)."""
    return float(_stated(r"Scheduler `step`[^\n]*?Use atol ([0-9.eE+-]+)", "scheduler step tolerance").group(1))


def max_abs_output(case: str) -> float:
    """The case's largest |output| (MANIFEST tolerances), the scale of relative bounds."""
    return float(manifest()["tolerances"][case]["max_abs_output"])
