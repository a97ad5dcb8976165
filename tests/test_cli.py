"""The ``kvt`` command line: generation on the embedded tiny preset, real checkpoint directories,
and bad input (exit code 2, a message naming the value, no output file)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from kvt.cli.main import EXIT_INVALID, EXIT_OK, main

FAST = ["--key-frame-steps", "2", "--base-frame-steps", "2", "--interpolation-steps", "2", "--no-progress"]


def _frames(path: Path) -> np.ndarray:
    return iio.imread(path, index=None)


@pytest.mark.parametrize("fps,frames", [("low", 12), ("medium", 45), ("high", 177)])
def test_generate_tiny_mp4(tmp_path, capsys, fps, frames):
    out = tmp_path / "video.mp4"
    assert main(["generate", "a cat on the beach", "--out", str(out), "--fps", fps, "--seed", "1", *FAST]) == EXIT_OK
    video = _frames(out)
    assert video.shape == (frames, 64, 64, 3)
    captured = capsys.readouterr()
    assert "random weights" in captured.err and str(out) in captured.out


def test_generate_image_to_video_gif(tmp_path):
    image = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "video.gif"
    assert main(["generate", "a boat", "--image", str(image), "--out", str(out), *FAST]) == EXIT_OK
    assert _frames(out).shape[0] == 12


def test_console_script_end_to_end(tmp_path):
    """The installed entry point, as a user runs it."""
    exe = shutil.which("kvt", path=str(Path(sys.executable).parent)) or shutil.which("kvt")
    assert exe, "the `kvt` console script is not installed"
    out = tmp_path / "v.mp4"
    result = subprocess.run([exe, "generate", "a cat", "--out", str(out), *FAST], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert _frames(out).shape == (12, 64, 64, 3)


@pytest.mark.parametrize("args,message", [
    (["--fps", "ultra"], "fps='ultra' is not allowed: one of ['low', 'medium', 'high']"),
    (["--motion", "fast"], "motion='fast'"),
    (["--width", "100"], "width=100 is not allowed: a multiple of 64"),
    (["--width", "1024", "--height", "2048"], "1024x2048 = 2097152 pixels"),
    (["--height", "16448"], "height=16448"),
    (["--guidance-weight-prompt", "-2"], "guidance_weight_prompt=-2.0"),
    (["--key-frame-guidance-scale", "nan"], "key_frame_guidance_scale=nan"),
    (["--noise-augmentation", "5000"], "noise_augmentation=5000"),
    (["--base-frame-steps", "0"], "base_frame_steps=0"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--image", "/nonexistent.png"], "does not exist"),
    (["--weights", "/nonexistent"], "checkpoint directory /nonexistent does not exist"),
    (["--backend", "tensorrt"], "--backend tensorrt needs --engines DIR"),
    (["--backend", "tensorrt", "--engines", "/nonexistent"], "/nonexistent: no manifest.json"),
    (["--engines", "/somewhere"], "--engines needs --backend tensorrt (this request runs on torch)"),
    (["--cuda-graphs"], "--cuda-graphs needs --backend tensorrt"),
    (["--backend", "onnxruntime", "--onnx", "/x", "--weights", "/y"], "--weights needs --backend torch"),
    (["--protocol", "grpc"], "--protocol needs --triton HOST:PORT"),
    (["--triton", "127.0.0.1:1", "--weights", "/y"], "--weights needs --backend torch (this request runs on triton)"),
    (["--triton", "127.0.0.1:1", "--backend", "onnxruntime"], "drop --backend onnxruntime"),
    (["--triton", "127.0.0.1:1", "--device", "cpu"], "--device applies to in-process backends"),
    (["--triton", "127.0.0.1:1", "--fps", "ultra"], "fps='ultra' is not allowed"),
])
def test_bad_input_exits_2_without_output(tmp_path, capsys, args, message):
    out = tmp_path / "video.mp4"
    assert main(["generate", "a cat", "--out", str(out), *args]) == EXIT_INVALID
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bad_output_paths(tmp_path, capsys):
    assert main(["generate", "a cat", "--out", str(tmp_path / "video.avi")]) == EXIT_INVALID
    assert "unsupported suffix '.avi'" in capsys.readouterr().err
    assert main(["generate", "a cat", "--out", str(tmp_path / "no" / "dir" / "v.mp4")]) == EXIT_INVALID
    assert "does not exist" in capsys.readouterr().err
    if os.geteuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(["generate", "a cat", "--out", str(locked / "v.mp4")]) == EXIT_INVALID
        assert "not writable" in capsys.readouterr().err


def test_official_inputs_are_served_with_warnings(tmp_path, capsys):
    """An empty prompt, a small image, motion 'normal' and a negative prompt: served as the official
    pipeline serves them, each notice printed once."""
    small = tmp_path / "small.png"
    Image.new("RGB", (32, 48), (200, 30, 30)).save(small)
    out = tmp_path / "v.mp4"
    assert main(["generate", "  ", "--image", str(small), "--motion", "normal", "--negative-prompt", "blurry",
                 "--out", str(out), *FAST]) == EXIT_OK
    err = capsys.readouterr().err
    assert err.count("warning: prompt='  ' is empty") == 1
    assert err.count("warning: image 32x48 is smaller than the output frame 64x64") == 1
    assert err.count("warning: negative_prompt='blurry' has no effect") == 1
    # motion 'normal' is the official default's name for medium: served as medium, no notice.
    assert not [line for line in err.splitlines() if "warning" in line and "motion" in line]
    assert "motion medium" in err
    assert _frames(out).shape == (12, 64, 64, 3)


def test_make_weights_then_generate_from_them(tmp_path):
    weights = tmp_path / "weights"
    assert main(["make-weights", "--preset", "tiny", "--out", str(weights), "--seed", "3"]) == EXIT_OK
    out = tmp_path / "v.mp4"
    assert main(["generate", "a cat", "--weights", str(weights), "--out", str(out), *FAST]) == EXIT_OK
    assert _frames(out).shape == (12, 64, 64, 3)
    assert main(["make-weights", "--out", str(weights)]) == EXIT_INVALID  # exists


def test_generate_from_a_checkpoint_directory(tmp_path, tiny_checkpoint_dir):
    out = tmp_path / "v.mp4"
    assert main(["generate", "a cat on the beach", "--weights", str(tiny_checkpoint_dir), "--width", "64",
                 "--height", "64", "--out", str(out), *FAST]) == EXIT_OK
    assert _frames(out).shape == (12, 64, 64, 3)


def test_missing_checkpoint_file_exits_2(tmp_path, capsys, tiny_checkpoint_dir):
    weights = tmp_path / "w"
    shutil.copytree(tiny_checkpoint_dir, weights)
    (weights / "video_movq.pt").unlink()
    assert main(["generate", "a cat", "--weights", str(weights), "--out", str(tmp_path / "v.mp4")]) == EXIT_INVALID
    assert "missing checkpoint file(s) ['video_movq.pt']" in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()


def test_stages_command(capsys):
    assert main(["stages", "--preset", "full"]) == EXIT_OK
    text = capsys.readouterr().out
    assert "unet_t2v_video" in text and "N 36/36/72 step 12" in text


def test_triton_without_a_server_fails_with_a_clear_message(tmp_path, capsys):
    out = tmp_path / "video.mp4"
    assert main(["generate", "a cat", "--out", str(out), "--triton", "127.0.0.1:9", "--no-progress"]) == 1
    assert "127.0.0.1:9" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_build_without_tensorrt_fails_fast(tmp_path, capsys):
    assert main(["build", "--onnx", str(tmp_path), "--out", str(tmp_path / "engines")]) in (1, 2)
    err = capsys.readouterr().err
    assert "tensorrt" in err.lower() or "manifest" in err.lower()
    assert not (tmp_path / "engines").exists()
