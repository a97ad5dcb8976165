"""The parity suite runs unchanged on another reference folder: proven on a rearranged copy.

``support.rearrange`` copies the reference folder with configs.json and the checkpoints arranged in
other ways the official loader builds into the very same networks (keys reordered, the U-Nets' channel
plan written as model_channels 1 with scaled dim_mult, official defaults left out, the MoVQs' nominal
resolution doubled, extra ignored MoVQ keys, the T5 folder moved, every state dict reversed). The
golden outputs therefore stay valid, and the whole parity suite is run on the copy in a separate
pytest process (KVT_REFERENCE_DIR pointing at it): it must pass with nothing skipped. A suite that took
an architecture fact from the tiny preset (as it did before) fails on the copy; the first test shows
why, on the copy itself.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvt.export.source import ExportSource
from kvt.models import TINY
from kvt.models.checkpoints import load_checkpoint_dir
from kvt.models.configs import KandinskyVideoConfig
from kvt.models.presets import preset_for_config
from kvt.models.weight_files import CheckpointError
from support import refdata
from support.rearrange import rearranged_copy

# The parity suite: every test file that reads KVT_REFERENCE_DIR.
PARITY_FILES = (
    "tests/test_unet_parity.py", "tests/test_movq_parity.py", "tests/test_text_encoder.py",
    "tests/test_schedulers.py", "tests/test_configs.py", "tests/test_checkpoints.py",
    "tests/test_unet_structure.py", "tests/test_movq_structure.py", "tests/test_weight_files.py",
    "tests/test_e2e_reference.py",
)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rearranged(tmp_path_factory) -> Path:
    return rearranged_copy(refdata.require_reference(), tmp_path_factory.mktemp("reference") / "rearranged")


def test_the_copy_is_another_arrangement_of_the_same_networks(rearranged: Path) -> None:
    """Same networks, other facts: the old preset-based route (the tiny preset's configs, an export
    source named 'tiny') no longer fits, while the folder's own configs build the same state dicts."""
    config = KandinskyVideoConfig.from_json(rearranged / "checkpoints" / "configs.json")
    original = refdata.config()
    assert config != original and preset_for_config(config) is None
    assert config.t2v.model_channels == 1 and config.t2v.hidden_dims == original.t2v.hidden_dims
    assert config.image_movq.resolution == 2 * original.image_movq.resolution
    assert config.text_encoder.weights_path != original.text_encoder.weights_path
    assert config.replace(text_encoder=TINY.config.text_encoder) != TINY.config
    with pytest.raises(CheckpointError, match="not the 'tiny' preset's architecture"):
        ExportSource("tiny", weights=str(rearranged / "checkpoints")).open()
    models = load_checkpoint_dir(rearranged / "checkpoints")
    reference = refdata.models()
    for name, network in models.networks().items():
        ours, theirs = network.state_dict(), reference.networks()[name].state_dict()
        assert list(ours) == list(theirs), name
        assert all(ours[k].equal(theirs[k]) for k in ours), name


@pytest.mark.slow  # the whole parity suite again, with a fresh export: ~40 min on 2 cores (`pytest -m slow`)
def test_parity_suite_passes_on_the_rearranged_copy(rearranged: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "KVT_TEST_EXPORT_CACHE"}  # a fresh export
    env["KVT_REFERENCE_DIR"] = str(rearranged)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *PARITY_FILES],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 100, summary
    assert "skipped" not in summary and "failed" not in summary, result.stdout[-4000:]
