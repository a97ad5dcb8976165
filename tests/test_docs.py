"""Docs that run: every fenced block in README.md and docs/*.md that is marked runnable (an HTML comment
``<!-- runnable ... -->`` on the line before it) is executed as written, in an empty folder, on the tiny
preset: bash blocks with ``kvt`` of this environment first on PATH, python blocks with this interpreter.

The folder holds ``photo.jpg`` (a 96x80 picture) for the image-to-video example. The graph cache is the
one the session's tiny FP32 export filled (conftest.py), so the export blocks trace nothing it traced
already.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_MARK = re.compile(r"^<!--\s*runnable\b.*-->\s*$")
_FENCE = re.compile(r"^```(\w+)\s*$")


def runnable_blocks(path: Path) -> list[tuple[str, int, str, str]]:
    """(document, line, language, code) of each block marked runnable in ``path``."""
    lines = path.read_text().splitlines()
    blocks = []
    for index, line in enumerate(lines):
        if not _MARK.match(line.strip()):
            continue
        fence = _FENCE.match(lines[index + 1].strip()) if index + 1 < len(lines) else None
        if fence is None:
            raise AssertionError(f"{path.name}:{index + 1}: a runnable mark must precede a fenced block")
        end = next(i for i in range(index + 2, len(lines)) if lines[i].strip() == "```")
        blocks.append((path.name, index + 2, fence.group(1), "\n".join(lines[index + 2:end]) + "\n"))
    return blocks


BLOCKS = [block for path in DOCS for block in runnable_blocks(path)]


def test_the_readme_has_runnable_blocks():
    languages = [language for name, _, language, _ in BLOCKS if name == "README.md"]
    assert languages.count("bash") >= 2 and "python" in languages
    assert {language for _, _, language, _ in BLOCKS} <= {"bash", "python"}


def _param(block: tuple[str, int, str, str]) -> object:
    # An export block waits for the session's tiny FP32 export, which fills the graph cache with the same
    # graphs (conftest.py runs it in the background and this test late).
    marks = [pytest.mark.uses_exports("tiny_export_fp32")] if "kvt export" in block[3] else []
    return pytest.param(*block, marks=marks, id=f"{block[0]}:{block[1]}")


@pytest.mark.parametrize("document,line,language,code", [_param(block) for block in BLOCKS])
def test_runnable_block(document, line, language, code, tmp_path, graph_cache_dir, request):
    if "kvt export" in code:
        request.getfixturevalue("tiny_export_fp32")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(
        tmp_path / "photo.jpg")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "KVT_CACHE_DIR": str(graph_cache_dir.parent)}
    command = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"{document}:{line} failed:\n{code}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
