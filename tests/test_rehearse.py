"""``kvt rehearse``: the production deployment (stand-in TensorRT plans in the generated tensorrt_plan
repository) served by the real bundled tritonserver, for the default build and for every build command
the documentation gives (at tiny sizes)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from kvt.cli.main import EXIT_OK, main
from kvt.contract.stages import FPS_FRAMES
from kvt.serving.server_models import tensorrt_standin as standin

pytestmark = pytest.mark.triton
pytest.importorskip("tritonclient.grpc")
pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", ROOT / "docs" / "TRITON.md", ROOT / "docs" / "TENSORRT.md")
# Documented full-size frame sides -> tiny-preset sides (multiples of 64 in [64, 256]).
TINY_SIDE = {256: 64, 384: 64, 512: 64, 576: 128, 640: 128, 704: 128, 768: 128, 896: 192, 1024: 256}


def _rehearse(tmp_path: Path, export: Path, *flags: str) -> dict:
    report = tmp_path / "rehearsal.json"
    code = main(["rehearse", "--onnx", str(export), "--out", str(tmp_path / "out"), "--json", str(report),
                 "--steps", "1,1,1", *flags])
    data = json.loads(report.read_text())
    assert code == EXIT_OK, data
    return data


def test_rehearse_the_default_build(tmp_path, tiny_export_fp16):
    """`--resolution 64x64` with the default fps modes and batch range: every fps mode and
    image-to-video served; a size not built refused before any stage ran, naming what is served."""
    data = _rehearse(tmp_path, tiny_export_fp16, "--resolution", "64x64")
    assert data["ok"] and len(data["standin_stages"]) == 7
    by = {(r["kind"], r["fps"], r["width"], r["height"]): r for r in data["requests"]}
    for fps in ("low", "medium", "high"):
        assert by[("t2v", fps, 64, 64)]["status"] == "served"
    assert by[("i2v", "low", 64, 64)]["status"] == "served"
    rejected = [r for r in data["requests"] if r["status"] == "rejected"]
    assert rejected and all("64x64" in r["error"] and "invalid request" in r["error"] for r in rejected)
    assert all(r["seconds"] > 0 for r in data["requests"])


def test_rehearse_refuses_an_fps_mode_not_built(tmp_path, tiny_export_fp16):
    data = _rehearse(tmp_path, tiny_export_fp16, "--resolution", "64x64", "--fps", "low")
    statuses = {(r["fps"], r["width"]): r["status"] for r in data["requests"] if r["kind"] == "t2v"}
    assert statuses[("low", 64)] == "served"
    refused = [r for r in data["requests"] if r["fps"] != "low"]
    assert refused and refused[0]["status"] == "rejected" and "fps" in refused[0]["error"]


def _shell_blocks(text: str) -> list[str]:
    """The contents of fenced bash/sh code blocks, continuation lines joined."""
    blocks, current, language = [], None, ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            if current is None:
                current, language = [], stripped[3:].strip()
            else:
                if language in ("bash", "sh", "console", ""):
                    blocks.append("\n".join(current).replace("\\\n", " "))
                current = None
            continue
        if current is not None:
            current.append(line)
    return blocks


def _documented_builds() -> list[tuple[str, list[str]]]:
    """Every `kvt build` command in the docs' shell blocks, as rehearse flags at tiny sizes."""
    builds = []
    for doc in DOCS:
        for block in _shell_blocks(doc.read_text()):
            for line in block.splitlines():
                # a command may end a `bash -c '...'` or a `&&` chain
                command = line.strip().lstrip("$ ").split("#")[0].split("&&")[0].strip().rstrip("'\"")
                if not command.startswith("kvt build "):
                    continue
                args, flags = shlex.split(command)[2:], []
                for i, arg in enumerate(args):
                    if arg in ("--fps", "--batch-range"):
                        flags += [arg, args[i + 1]]
                    elif arg == "--resolution":
                        w, h = (int(v) for v in args[i + 1].lower().split("x"))
                        flags += [arg, f"{TINY_SIDE[w]}x{TINY_SIDE[h]}"]
                fps = [flags[i + 1] for i in range(0, len(flags), 2) if flags[i] == "--fps"]
                if sorted(fps) == sorted(FPS_FRAMES):  # every mode named = the default
                    flags = [f for i, f in enumerate(flags) if not (f == "--fps" or (i and flags[i - 1] == "--fps"))]
                builds.append((f"{doc.name}: {command.strip()}", flags))
    return builds


def test_docs_have_build_commands():
    builds = _documented_builds()
    assert {doc.split(":")[0] for doc, _ in builds} >= {"README.md", "TRITON.md", "TENSORRT.md"}, builds


def _distinct_builds() -> list[tuple[str, list[str]]]:
    """One rehearsal per distinct set of flags (docs repeat some builds)."""
    seen: dict[tuple[str, ...], str] = {}
    for command, flags in _documented_builds():
        seen.setdefault(tuple(flags), command)
    return [(command, list(flags)) for flags, command in seen.items()]


@pytest.mark.parametrize("command,flags", _distinct_builds(), ids=lambda value: str(value)[:60])
def test_every_documented_build_serves_what_it_built(tmp_path, tiny_export_fp16, command, flags):
    data = _rehearse(tmp_path, tiny_export_fp16, *flags)
    assert data["ok"], (command, data["requests"])


# ---------------------------------------------------------------------------------------- the stand-in

def _context(name: str, index: int, low: list[int], opt: list[int], high: list[int]) -> standin._Context:
    return standin._Context(name, index, {"sample": [low, opt, high]})


def test_standin_chooses_the_profile_as_tensorrt_backend_does():
    model = standin.TritonPythonModel.__new__(standin.TritonPythonModel)
    model.contexts = [_context("0", 0, [4, 20], [22, 20], [88, 20]), _context("1", 1, [4, 20], [88, 20], [88, 20])]
    # Both contain 88 rows; EvaluateTensorRTContext's distance (opt[0] vs the batch, opt[i] vs shape[i-1])
    chosen, warning = model._choose({"sample": [88, 20]}, 1)
    expected = min(model.contexts, key=lambda c: abs(c.opt["sample"][0] - 1) + abs(c.opt["sample"][1] - 88))
    assert chosen is expected and warning is None
    chosen, warning = model._choose({"sample": [90, 20]}, 1)
    assert chosen is model.contexts[0] and "failed to find any Optimization Profile" in warning
    assert standin._dimension_error([90, 20], [4, 20], [88, 20]) == (
        "model expected the shape of dimension 0 to be between 4 and 88 but received 90")
    assert standin._dimension_error([4], [4, 20], [88, 20]).startswith("model expected 2 dimensions")


def test_standin_profile_index_checks():
    assert standin.TritonPythonModel._profile_index("1", 2) == 1
    with pytest.raises(ValueError, match="can not find optimization profile 2"):
        standin.TritonPythonModel._profile_index("2", 2)
    config = {"instance_group": [{"profile": []}], "parameters": {"standin_profiles": {"string_value": "0,1"}}}
    assert standin.TritonPythonModel._profile_names(config) == ["0", "1"]
