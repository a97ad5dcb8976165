"""Checkpoint directories: strict loading of the official layout, precise errors, safe unpickling,
key-set variants and the writer's round trip."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import pytest
import torch

from kvt.models import TINY
from kvt.models.checkpoint_write import write_checkpoint_dir
from kvt.models.checkpoints import load_checkpoint_dir
from kvt.models.presets import TEXT_ENCODER_FOLDER
from kvt.models.random_weights import random_models
from kvt.models.registry import REQUIRED_FILES
from kvt.models.weight_files import WEIGHTS_MANIFEST, CheckpointError
from support import refdata


@pytest.fixture(scope="module")
def reference_models():
    ref = refdata.require_reference()
    return load_checkpoint_dir(ref / "checkpoints")


@pytest.fixture()
def ckpt_copy(tmp_path, tiny_checkpoint_dir) -> Path:
    """A checkpoint directory in the official layout to damage: the tiny checkpoints without the
    kvt-weights.json kvt's writer adds (official downloads have none, so the loader's own checks run)."""
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint_dir, dst)
    (dst / WEIGHTS_MANIFEST).unlink()
    return dst


def _tensor_counts():
    meta = refdata.manifest()["files"]
    return {name: meta[f"checkpoints/{name}"]["meta"]["num_tensors"]
            for name in ("t2v.pt", "interpolation.pt", "movq.pt", "video_movq.pt")}


def test_reference_directory_loads_strictly(reference_models):
    models = reference_models
    counts = _tensor_counts()
    assert len(models.unet_t2v.state_dict()) == counts["t2v.pt"]
    assert len(models.unet_interpolation.state_dict()) == counts["interpolation.pt"]
    assert len(models.image_movq.state_dict()) == counts["movq.pt"]
    assert len(models.video_movq.state_dict()) == counts["video_movq.pt"]
    for name, net in models.networks().items():
        assert not any(p.is_meta for p in net.parameters()), name
        assert not net.training, name
    assert models.t2v_null_embedding.shape == (models.context_dim,)
    ref_null = torch.load(refdata.reference_dir() / "checkpoints" / "t2v.pt", weights_only=True)["null_embedding"]
    assert torch.equal(models.t2v_null_embedding, ref_null.reshape(-1).float())
    # The architecture is the folder's own: configs.json as the project's parser reads it.
    assert models.config == refdata.config()
    assert models.context_dim == refdata.configs_json()["text_encoder"]["context_dim"]
    assert models.tokenizer.tokens_length == refdata.tokens_length()


def test_missing_files_are_listed(ckpt_copy):
    (ckpt_copy / "movq.pt").unlink()
    (ckpt_copy / "t5_projections.pt").unlink()
    with pytest.raises(CheckpointError, match=r"missing checkpoint file\(s\) \['movq.pt', 't5_projections.pt'\]"):
        load_checkpoint_dir(ckpt_copy)


def test_missing_text_encoder_folder_points_at_the_flag(ckpt_copy):
    shutil.rmtree(ckpt_copy / TEXT_ENCODER_FOLDER)
    with pytest.raises(CheckpointError, match="--text-encoder"):
        load_checkpoint_dir(ckpt_copy)


def _edit_unet(path: Path, edit) -> None:
    data = torch.load(path, weights_only=True)
    edit(data["unet"])
    torch.save(data, path)


def test_unexpected_key_is_named(ckpt_copy):
    _edit_unet(ckpt_copy / "t2v.pt", lambda sd: sd.__setitem__("bogus.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"t2v.pt: .*unexpected keys: bogus.weight \(1\)"):
        load_checkpoint_dir(ckpt_copy)


def test_missing_keys_are_named_with_shapes_and_count(ckpt_copy):
    def drop(sd):
        for key in [k for k in sd if k.startswith("out_layer.")]:
            del sd[key]
    _edit_unet(ckpt_copy / "t2v.pt", drop)
    with pytest.raises(CheckpointError, match=r"missing keys: out_layer\.0\.bias \[4\].*\(4\)") as err:
        load_checkpoint_dir(ckpt_copy)
    assert "out_layer.2.weight [4, 4, 3, 3]" in str(err.value)


def test_many_missing_keys_show_the_first_few_and_the_count(ckpt_copy):
    sd = torch.load(ckpt_copy / "movq.pt", weights_only=True)
    torch.save({k: v for k, v in sd.items() if not k.startswith("decoder.")}, ckpt_copy / "movq.pt")
    with pytest.raises(CheckpointError, match=r"movq.pt: .*missing keys: decoder\..*, \.\.\. \(\d+ in all\)"):
        load_checkpoint_dir(ckpt_copy)


def test_mis_shaped_key_is_named(ckpt_copy):
    _edit_unet(ckpt_copy / "interpolation.pt", lambda sd: sd.__setitem__("in_layer.bias", torch.zeros(5)))
    with pytest.raises(CheckpointError, match=r"interpolation.pt: .*mis-shaped keys: in_layer.bias expected \[4\] got \[5\]"):
        load_checkpoint_dir(ckpt_copy)


def test_wrong_file_structure(ckpt_copy):
    torch.save({"model": {}}, ckpt_copy / "t2v.pt")
    with pytest.raises(CheckpointError, match=r"t2v.pt: expected a dict with 'unet'"):
        load_checkpoint_dir(ckpt_copy)


class _RunsCode:
    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(ckpt_copy, tmp_path):
    marker = tmp_path / "pwned"
    payload = _RunsCode()
    payload.marker = marker
    torch.save({"unet": payload, "null_embedding": torch.zeros(32)}, ckpt_copy / "t2v.pt")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        load_checkpoint_dir(ckpt_copy)
    assert not marker.exists(), "the crafted pickle must not run"


def test_truncated_file_is_reported(ckpt_copy):
    data = (ckpt_copy / "video_movq.pt").read_bytes()
    (ckpt_copy / "video_movq.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="video_movq.pt: unreadable or corrupted"):
        load_checkpoint_dir(ckpt_copy)


def test_written_directory_round_trips(tmp_path):
    models = random_models(TINY, seed=7)
    out = write_checkpoint_dir(models, tmp_path / "tiny")
    assert sorted(p.name for p in out.iterdir()) == sorted(REQUIRED_FILES + ("text_encoder", "kvt-weights.json"))
    loaded = load_checkpoint_dir(out)
    for name, net in models.networks().items():
        theirs = loaded.networks()[name].state_dict()
        for key, value in net.state_dict().items():
            assert torch.equal(value, theirs[key]), f"{name}: {key}"
    assert torch.equal(loaded.interpolation_null_embedding, models.interpolation_null_embedding)
    assert loaded.tokenizer("a cat").input_ids.tolist() == models.tokenizer("a cat").input_ids.tolist()
    assert not list(tmp_path.glob(".*tmp*")), "no temporary directory left behind"


def test_writer_refuses_to_overwrite_and_cleans_up_on_failure(tmp_path, monkeypatch):
    models = random_models(TINY, seed=1)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        write_checkpoint_dir(models, tmp_path / "exists")

    import kvt.models.checkpoints as ckpt
    calls = {"n": 0}
    real_save = torch.save

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint_dir(models, tmp_path / "half")
    assert not (tmp_path / "half").exists()
    assert not list(tmp_path.glob(".half*")), "the temporary directory is removed"


def test_key_set_decides_the_interpolation_variant(tmp_path, caplog):
    """configs.json cannot pin add_new_temporal_params (docs/spec/quirks.md, quirk 34): the keys decide."""
    variant = dataclasses.replace(
        TINY, config=TINY.config.replace(
            interpolation=dataclasses.replace(TINY.config.interpolation, add_new_temporal_params=True)))
    out = write_checkpoint_dir(random_models(variant, seed=2), tmp_path / "variant")
    # Make configs.json claim the released default.
    import json
    configs = json.loads((out / "configs.json").read_text())
    configs["interpolation"]["configs"]["add_new_temporal_params"] = False
    (out / "configs.json").write_text(json.dumps(configs))
    with caplog.at_level(logging.WARNING):
        loaded = load_checkpoint_dir(out)
    assert loaded.config.interpolation.add_new_temporal_params is True
    assert any("add_new_temporal_params" in r.message for r in caplog.records)
    assert any(k.startswith("temporal_conv_in.") for k in loaded.unet_interpolation.state_dict())
