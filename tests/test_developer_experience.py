"""Issue 17's smaller things: --threads, --version, -v anywhere, help on every option, a closed pipe,
outputs never replaced silently, readable safetensors, the key-frame fit said, the truncation said once."""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kvt import __version__
from kvt.cli.main import EXIT_INVALID, EXIT_OK, build_parser, main
from kvt.models.weight_files import write_safetensors
from kvt.runtime.images import describe_key_frame_fit, key_frame_pixels
from kvt.runtime.threads import DEFAULT_THREADS, ThreadsError, apply_threads, available_cores, resolve_threads

FAST = ["--key-frame-steps", "2", "--base-frame-steps", "2", "--interpolation-steps", "2", "--no-progress"]


def _kvt() -> str:
    exe = shutil.which("kvt", path=str(Path(sys.executable).parent)) or shutil.which("kvt")
    assert exe, "the `kvt` console script is not installed"
    return exe


def _umask_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


# ------------------------------------------------------------------------------ threads

def test_thread_policy():
    assert resolve_threads(None) == DEFAULT_THREADS == 1
    assert resolve_threads(3) == 3
    assert resolve_threads(0) == available_cores() >= 1
    assert available_cores() <= (os.cpu_count() or 1)
    for bad in (-1, True, 1.5):
        with pytest.raises(ThreadsError, match="whole number >= 1, or 0"):
            resolve_threads(bad)  # type: ignore[arg-type]
    before = torch.get_num_threads()
    try:
        assert apply_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_threads_on_every_computing_command():
    parser = build_parser()
    for argv in (["generate", "x", "--out", "v.mp4"], ["export", "--out", "o"], ["make-weights", "--out", "w"],
                 ["bench", "stage"], ["bench", "e2e"]):
        assert parser.parse_args([*argv, "--threads", "3"]).threads == 3, argv
        assert parser.parse_args(argv).threads is None, argv  # None: the policy's default


def test_generate_says_its_thread_count_and_refuses_bad_counts(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    assert main(["generate", "a cat", "--out", str(out), "--threads", "-2", *FAST]) == EXIT_INVALID
    assert "--threads -2" in capsys.readouterr().err and not out.exists()
    before = torch.get_num_threads()
    try:
        assert main(["generate", "a cat", "--out", str(out), "--threads", "2", *FAST]) == EXIT_OK
    finally:
        torch.set_num_threads(before)
    err = capsys.readouterr().err
    assert "2 CPU threads" in err and "encoding 12 frames into v.mp4" in err  # no silent seconds after the bar


# ------------------------------------------------------------------------------ the command line

def test_version_and_verbose_after_the_command(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"kvt {__version__}"
    parser = build_parser()
    assert parser.parse_args(["stages", "-v"]).verbose is True
    assert parser.parse_args(["-v", "stages"]).verbose is True
    assert parser.parse_args(["stages"]).verbose is False


def _parsers(parser: argparse.ArgumentParser, path: str = "kvt"):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_every_option_has_help():
    missing = [f"{path} {'/'.join(action.option_strings) or action.dest}"
               for path, parser in _parsers(build_parser()) for action in parser._actions
               if not isinstance(action, argparse._SubParsersAction) and not action.help]
    assert missing == []


def test_closed_pipe_is_not_a_traceback():
    """`kvt stages | head -1`: the reader leaves early; kvt exits quietly as killed by SIGPIPE would."""
    result = subprocess.run(f"'{_kvt()}' stages --preset full | head -1", shell=True, capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.count("\n") == 1
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr


# ------------------------------------------------------------------------------ outputs

def test_existing_output_is_not_replaced_without_overwrite(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    out.write_bytes(b"precious")
    assert main(["generate", "a cat", "--out", str(out), *FAST]) == EXIT_INVALID
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main(["generate", "a cat", "--out", str(out), "--overwrite", *FAST]) == EXIT_OK
    assert out.read_bytes() != b"precious"


def test_safetensors_are_readable_under_the_umask(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors({"a": torch.zeros(2)}, path)
    assert stat.S_IMODE(path.stat().st_mode) == _umask_mode()


def test_checkpoint_files_are_readable_under_the_umask(tiny_checkpoint_dir):
    modes = {p.relative_to(tiny_checkpoint_dir).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in tiny_checkpoint_dir.rglob("*") if p.is_file()}
    assert any(name.endswith(".safetensors") for name in modes)
    assert {name: mode for name, mode in modes.items() if mode & 0o044 != _umask_mode() & 0o044} == {}


# ------------------------------------------------------------------------------ said, once

@pytest.mark.parametrize("size,said", [
    ((64, 64), None),
    ((128, 128), "input image 128x128 resized to 64x64"),
    ((96, 80), "input image 96x80 resized to 77x64 and centre-cropped to 64x64"),
    ((200, 64), "input image 200x64 centre-cropped to 64x64"),
    ((64, 48), "input image 64x48 padded with black to 64x64"),
])
def test_key_frame_fit_is_described(size, said):
    assert describe_key_frame_fit(size, 64, 64) == said
    pixels = key_frame_pixels(Image.new("RGB", size), 64, 64)
    assert tuple(pixels.shape) == (1, 3, 64, 64)


def test_generate_says_how_the_image_was_fitted(tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(image)
    assert main(["generate", "a boat", "--image", str(image), "--out", str(tmp_path / "v.gif"), *FAST]) == EXIT_OK
    assert "input image 96x80 resized to 77x64 and centre-cropped to 64x64" in capsys.readouterr().err


def test_prompt_truncation_is_said_once(tmp_path, capsys):
    prompt = " ".join(f"word{i}" for i in range(400))
    assert main(["generate", prompt, "--out", str(tmp_path / "v.mp4"), *FAST]) == EXIT_OK
    err = capsys.readouterr().err
    assert err.count("truncated") == 1, err
