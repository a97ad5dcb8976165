"""Safetensors conversion and the size/hash manifest of directories kvt writes (untrusted-file handling)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from kvt.cli.main import main
from kvt.models.checkpoint_write import write_checkpoint_dir
from kvt.models.checkpoints import load_checkpoint_dir
from kvt.models.convert import convert_checkpoint_dir
from kvt.models.presets import TEXT_ENCODER_FOLDER, TINY
from kvt.models.random_weights import random_models
from kvt.models.weight_files import WEIGHTS_MANIFEST, CheckpointError, flatten, unflatten, verify_weights_manifest
from support import refdata


def _state(models) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in models.networks().items():
        out.update({f"{name}/{k}": v for k, v in module.state_dict().items()})
    out["t2v_null"] = models.t2v_null_embedding
    out["interp_null"] = models.interpolation_null_embedding
    return out


def _assert_same_models(a, b) -> None:
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def official(tmp_path_factory, tiny_checkpoint_dir):
    """A checkpoint directory as the official release ships it: the tiny checkpoints without the
    kvt-weights.json that kvt's writer adds."""
    out = tmp_path_factory.mktemp("official") / "checkpoints"
    shutil.copytree(tiny_checkpoint_dir, out)
    (out / WEIGHTS_MANIFEST).unlink()
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory, official):
    out = tmp_path_factory.mktemp("conv") / "safetensors"
    convert_checkpoint_dir(official, out)
    return out


def test_conversion_keeps_every_tensor_and_writes_no_pickle(official, converted):
    assert not list(converted.rglob("*.pt")) and not list(converted.rglob("*.bin"))
    assert sorted(p.name for p in converted.glob("*.safetensors")) == [
        "interpolation.safetensors", "movq.safetensors", "t2v.safetensors", "t5_projections.safetensors",
        "video_movq.safetensors"]
    _assert_same_models(load_checkpoint_dir(official), load_checkpoint_dir(converted))


def test_reference_checkpoints_convert_losslessly(tmp_path):
    """The reference folder's checkpoints (pickled by the official code, no kvt-weights.json) convert
    with every tensor and every official key name kept."""
    from safetensors import safe_open

    ref = refdata.require_reference() / "checkpoints"
    out = convert_checkpoint_dir(ref, tmp_path / "safetensors")
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.bin"))
    _assert_same_models(load_checkpoint_dir(ref), load_checkpoint_dir(out))
    official = torch.load(ref / "t2v.pt", weights_only=True)
    with safe_open(str(out / "t2v.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == set(official["unet"]) | {"null_embedding"}


def test_safetensors_keep_the_official_key_names(official, converted):
    from safetensors import safe_open

    t2v = torch.load(official / "t2v.pt", weights_only=True)
    with safe_open(str(converted / "t2v.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert keys == set(t2v["unet"]) | {"null_embedding"}
    heads = torch.load(official / "t5_projections.pt", weights_only=True)
    with safe_open(str(converted / "t5_projections.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == {f"{h}.{k}" for h, sd in heads.items() for k in sd}


def test_flatten_round_trip():
    unet = {"unet": {"a.weight": torch.ones(2)}, "null_embedding": torch.zeros(3)}
    back = unflatten(flatten(unet, "unet"), "unet")
    assert back.keys() == unet.keys() and torch.equal(back["unet"]["a.weight"], unet["unet"]["a.weight"])
    heads = {"h1": {"0.weight": torch.ones(1)}, "h2": {"0.bias": torch.ones(1)}}
    assert unflatten(flatten(heads, "heads"), "heads", ("h1", "h2")).keys() == heads.keys()
    with pytest.raises(ValueError, match="does not start with one of the heads"):
        unflatten({"other.x": torch.ones(1)}, "heads", ("h1",))


def test_pickled_t5_shards_become_safetensors(tmp_path, official):
    from safetensors.torch import load_file

    src = tmp_path / "src"
    shutil.copytree(official, src)
    t5 = src / TEXT_ENCODER_FOLDER
    torch.save(load_file(str(t5 / "model.safetensors")), t5 / "pytorch_model.bin")
    (t5 / "model.safetensors").unlink()
    out = convert_checkpoint_dir(src, tmp_path / "out")
    assert (out / TEXT_ENCODER_FOLDER / "model.safetensors").is_file()
    assert not (out / TEXT_ENCODER_FOLDER / "pytorch_model.bin").exists()
    _assert_same_models(load_checkpoint_dir(src), load_checkpoint_dir(out))


def test_truncated_file_in_a_written_directory_is_named(tmp_path):
    out = write_checkpoint_dir(random_models(TINY, seed=1), tmp_path / "w")
    assert (out / WEIGHTS_MANIFEST).is_file()
    data = (out / "movq.pt").read_bytes()
    (out / "movq.pt").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"movq.pt: \d+ bytes, kvt-weights.json records \d+: truncated"):
        load_checkpoint_dir(out)


def test_corrupted_byte_is_caught_by_the_hash_check(tmp_path, converted):
    out = tmp_path / "copy"
    shutil.copytree(converted, out)
    path = out / "video_movq.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # same size: only the hash can tell
    path.write_bytes(bytes(data))
    assert verify_weights_manifest(out) is True  # sizes agree
    with pytest.raises(ValueError, match="video_movq.safetensors: SHA-256 differs"):
        verify_weights_manifest(out, check_hashes=True)
    with pytest.raises(ValueError, match="SHA-256 differs"):
        convert_checkpoint_dir(out, tmp_path / "again")  # conversion checks hashes of its source
    assert not (tmp_path / "again").exists()


def test_truncated_safetensors_without_manifest_is_reported(tmp_path, converted):
    out = tmp_path / "copy"
    shutil.copytree(converted, out)
    (out / WEIGHTS_MANIFEST).unlink()
    data = (out / "t2v.safetensors").read_bytes()
    (out / "t2v.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="t2v.safetensors: unreadable or corrupted safetensors"):
        load_checkpoint_dir(out)


def test_malformed_manifest_is_reported(tmp_path, converted):
    out = tmp_path / "copy"
    shutil.copytree(converted, out)
    (out / WEIGHTS_MANIFEST).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(CheckpointError, match="kvt-weights.json: not a kvt-weights manifest"):
        load_checkpoint_dir(out)


def test_cli_convert_weights(tmp_path, capsys, official):
    out = tmp_path / "cli"
    assert main(["convert-weights", str(official), "--out", str(out)]) == 0
    assert (out / "t2v.safetensors").is_file()
    assert main(["convert-weights", str(official), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert-weights", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
