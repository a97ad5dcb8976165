"""``kvt export``: ONNX graphs per stage (FP32 and FP16), parity reports, manifest, and error paths.

The two full exports (the tiny checkpoints in FP32 and FP16) are session fixtures (conftest.py) shared
with the backend, engine and Triton tests; error paths use single small stages to stay fast.
"""

from __future__ import annotations

import dataclasses
import errno
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from kvt.cli.main import EXIT_INVALID, EXIT_OK, main
from kvt.contract.stages import ResolutionRange
from kvt.export import attach as attach_module
from kvt.export import parity as parity_module
from kvt.export.cleanup import FORBIDDEN_OPS
from kvt.export.exporter import ExportInputError, ExportOptions, ParityError, export_onnx
from kvt.export.graph_cache import CACHE_ENV, graph_key
from kvt.export.graph_export import OPSET, ExportError, trace_dims
from kvt.export.source import ExportSource
from kvt.formats.export_dir import ExportManifest, ExportManifestError
from kvt.models import TINY
from kvt.models.random_weights import random_models
from kvt.models.stage_modules import build_stage_modules, stage_table_for
from kvt.models.weight_files import CheckpointError

STAGES = ("text_encoder", "unet_t2v_image", "unet_t2v_video", "unet_interp", "movq_encoder",
          "movq_decoder", "video_movq_decoder")
ONNX_DTYPES = {"float32": onnx.TensorProto.FLOAT, "int32": onnx.TensorProto.INT32,
               "bool": onnx.TensorProto.BOOL}


@pytest.fixture(scope="module")
def source(tiny_checkpoint_dir) -> ExportSource:
    """The tiny checkpoints (conftest.py) as an export source."""
    return ExportSource("tiny", weights=str(tiny_checkpoint_dir))


def _graph(directory: Path, stage: str, load_data: bool = False) -> onnx.ModelProto:
    return onnx.load(str(directory / f"{stage}.onnx"), load_external_data=load_data)


# ------------------------------------------------------------------------------ the full exports

PRECISIONS = [pytest.param(p, marks=pytest.mark.uses_exports(f"tiny_export_{p}"), id=p) for p in ("fp32", "fp16")]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_full_export_manifest_and_parity(request, precision):
    directory = request.getfixturevalue(f"tiny_export_{precision}")
    manifest = ExportManifest.read(directory)
    manifest.verify_files(directory, check_hashes=True)
    assert manifest.precision == precision and manifest.opset == OPSET
    assert tuple(manifest.stages) == STAGES
    assert manifest.source["kind"] == "checkpoint" and len(manifest.source["digest"]) == 64
    hashed = {Path(f).name for f in manifest.source["files"]}
    assert hashed >= {"configs.json", "t2v.pt", "interpolation.pt", "movq.pt", "video_movq.pt",
                      "t5_projections.pt", "model.safetensors", "config.json"}
    assert {"torch", "onnx", "onnxruntime", "polygraphy"} <= set(manifest.tools)
    report = json.loads((directory / "parity.json").read_text())
    assert [r["stage"] for r in report] == list(STAGES)
    for stage in report:
        assert stage["passed"], f"{stage['stage']}: parity failed: {stage['cases']}"
        assert len(stage["cases"]) >= 3, "parity covers at least three shapes per stage"
        labels = " ".join(c["shape"] for c in stage["cases"])
        for label in ("min", "opt", "max", "odd"):
            assert label in labels
        for case in stage["cases"]:
            assert case["finite"] and case["max_rel"] <= stage["threshold"]["max_rel"]
    assert "| unet_t2v_video |" in (directory / "parity.md").read_text()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_graphs_follow_the_stage_table(request, precision):
    directory = request.getfixturevalue(f"tiny_export_{precision}")
    table = ExportManifest.read(directory).stage_table()
    for stage in STAGES:
        spec, graph = table[stage], _graph(directory, stage)
        assert {o.domain or "ai.onnx": o.version for o in graph.opset_import}.get("ai.onnx") == OPSET
        assert not ({n.op_type for n in graph.graph.node} & FORBIDDEN_OPS), stage
        assert [i.name for i in graph.graph.input] == list(spec.input_names)
        assert [o.name for o in graph.graph.output] == list(spec.output_names)
        for tensors, values, named in ((spec.inputs, graph.graph.input, True), (spec.outputs, graph.graph.output, False)):
            for tensor, value in zip(tensors, values):
                assert value.type.tensor_type.elem_type == ONNX_DTYPES[tensor.dtype.value], (stage, tensor.name)
                dims = value.type.tensor_type.shape.dim
                for axis, name in tensor.dynamic_axes.items():
                    # inputs carry the table's axis names; outputs are expressions of them (8*h, ...)
                    assert dims[axis].dim_param == name if named else dims[axis].dim_param, \
                        f"{stage}.{tensor.name} axis {axis} must stay dynamic ({name})"


def test_fp16_policy(tiny_export_fp16):
    """U-Nets compute in FP16, attention in TensorRT's fusable form (FP16 Softmax straight from the scores:
    kvt.engines.static_checks lints the whole pattern); T5 and the MoVQs stay FP32; I/O stays FP32."""
    manifest = ExportManifest.read(tiny_export_fp16)
    for stage in STAGES:
        graph = _graph(tiny_export_fp16, stage)
        # The network's weights (folded constants such as the FP32 sinusoid frequencies are islands).
        weights = {i.data_type for i in graph.graph.initializer if i.name.startswith("network.") and len(i.dims) >= 2}
        unet = stage.startswith("unet")
        assert manifest.stages[stage].compute_precision == ("fp16" if unet else "fp32")
        assert weights == ({onnx.TensorProto.FLOAT16} if unet else {onnx.TensorProto.FLOAT}), stage
        if unet:
            producers = {out: node for node in graph.graph.node for out in node.output}
            softmaxes = [n for n in graph.graph.node if n.op_type == "Softmax"]
            assert softmaxes
            for node in softmaxes:
                assert producers[node.input[0]].op_type in ("MatMul", "Add"), node.name  # no Cast in between


# ------------------------------------------------------------------------------ weights and sizes

def test_random_weights_stream_exactly_the_random_models(tmp_path):
    """The streamed random weights are the ones ``random_models`` builds (same seed)."""
    import onnxruntime as ort

    out = tmp_path / "random"
    export_onnx(ExportSource("tiny", seed=4), out, ExportOptions(stages=("movq_encoder",), parity_shapes=()))
    spec = stage_table_for(TINY.config)["movq_encoder"]
    module = build_stage_modules(random_models(TINY, seed=4), stage_table_for(TINY.config))["movq_encoder"]
    inputs = spec.sample_inputs()
    with torch.inference_mode():
        expected = module(inputs["image"]).numpy()
    got = ort.InferenceSession(str(out / "movq_encoder.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": inputs["image"].numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_large_models_use_external_data(source, tmp_path, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(attach_module, "EXTERNAL_DATA_BYTES", 1000)
    out = tmp_path / "external"
    manifest = export_onnx(source, out, ExportOptions(stages=("text_encoder",)))
    entry = manifest.stages["text_encoder"]
    assert entry.external_data == "text_encoder.onnx.data" and (out / entry.external_data).is_file()
    assert set(entry.files) == {"text_encoder.onnx", "text_encoder.onnx.data"}
    weights = [i for i in _graph(out, "text_encoder").graph.initializer if i.name.startswith("network.")]
    assert weights and all(i.data_location == onnx.TensorProto.EXTERNAL for i in weights
                           if np.prod(i.dims) * 4 >= 1024), "weights of 1 KiB and more live in the .data file"
    ort.InferenceSession(str(out / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    assert manifest.parity["text_encoder"]["passed"]


# ------------------------------------------------------------------------------ identity and errors

def test_same_export_is_reused_and_a_different_one_refused(source, tmp_path):
    out = tmp_path / "te"
    options = ExportOptions(stages=("text_encoder",), parity_shapes=("min",))
    first = export_onnx(source, out, options)
    messages: list[str] = []
    again = export_onnx(source, out, options, report=messages.append)
    assert any("reusing" in m for m in messages) and again.created == first.created
    with pytest.raises(ExportInputError, match="already holds a different export.*precision"):
        export_onnx(source, out, ExportOptions(precision="fp16", stages=("text_encoder",)))
    with pytest.raises(ExportInputError, match="different export.*stages"):
        export_onnx(source, out, ExportOptions(stages=("text_encoder", "movq_encoder")))
    replaced = export_onnx(source, out, ExportOptions(stages=("movq_encoder",), parity_shapes=(),
                                                                   overwrite=True))
    assert list(replaced.stages) == ["movq_encoder"] and not (out / "text_encoder.onnx").exists()


def test_graph_cache_skips_tracing_for_other_weights(source, tmp_path):
    """The graph of a stage does not depend on the weights: a second export of the same architecture takes
    it from the cache, streams its own weights in and passes its own parity check."""
    cache = tmp_path / "cache"
    options = ExportOptions(stages=("movq_encoder",), parity_shapes=("min",), graph_cache=str(cache))
    first = export_onnx(source, tmp_path / "a", options)
    messages: list[str] = []
    second = export_onnx(ExportSource("tiny", seed=4), tmp_path / "b", options, report=messages.append)
    assert first.stats["movq_encoder"]["graph"] == "traced" and second.stats["movq_encoder"]["graph"] == "cache"
    assert [p.name for p in cache.iterdir()] == [f"{first.stats['movq_encoder']['graph_key']}.onnx"]
    assert any(m.startswith("movq_encoder (fp32) ") and "graph from cache" in m for m in messages)
    assert second.parity["movq_encoder"]["passed"]
    graphs = [_graph(tmp_path / d, "movq_encoder") for d in ("a", "b")]
    assert [n.op_type for n in graphs[0].graph.node] == [n.op_type for n in graphs[1].graph.node]
    assert first.source["digest"] != second.source["digest"]  # other weights, same graph
    opened = source.open()
    spec = stage_table_for(opened.config)["movq_encoder"]
    assert graph_key(spec, opened.config, None, "fp32", OPSET) != graph_key(spec, opened.config, None, "fp16", OPSET)


def test_graph_key_ignores_ranges_and_folder_names_but_not_what_the_trace_sees():
    """A graph is shared by exports of one architecture for other frame-size ranges (the profiles are not
    in the graph: the trace sees only its sample sizes) and by configs that differ only in the folder of
    the T5 weights or in other networks; another sample size, network config or precision is another
    graph."""
    config = TINY.config
    table = stage_table_for(config, ResolutionRange(64, 64, 256))
    narrower = stage_table_for(config, ResolutionRange(64, 128, 128))
    from_larger_min = stage_table_for(config, ResolutionRange(256, 512, 1024))
    renamed = dataclasses.replace(config, text_encoder=dataclasses.replace(config.text_encoder,
                                                                           weights_path="t5_encoder"))
    for stage in ("unet_t2v_video", "movq_decoder"):
        key = graph_key(table[stage], config, None, "fp32", OPSET)
        assert table[stage].profiles != narrower[stage].profiles
        assert graph_key(narrower[stage], config, None, "fp32", OPSET) == key
        assert graph_key(table[stage], renamed, None, "fp32", OPSET) == key
        assert trace_dims(from_larger_min[stage]) != trace_dims(table[stage])
        assert graph_key(from_larger_min[stage], config, None, "fp32", OPSET) != key
        assert graph_key(table[stage], config, None, "fp16", OPSET) != key
    wider = dataclasses.replace(config, image_movq=dataclasses.replace(config.image_movq, ch=64))
    assert (graph_key(table["movq_decoder"], wider, None, "fp32", OPSET)
            != graph_key(table["movq_decoder"], config, None, "fp32", OPSET))
    # another network's config is another graph of that network only
    assert (graph_key(table["unet_t2v_video"], wider, None, "fp32", OPSET)
            == graph_key(table["unet_t2v_video"], config, None, "fp32", OPSET))


def test_fp16_export_reuses_the_identical_fp32_stages(source, tmp_path):
    """--reuse-stages: the stages an FP16 export computes in FP32 (T5, MoVQs) are taken from an FP32 export
    of the same weights in the same parent directory, files hard-linked, parity results carried over."""
    stages = ("text_encoder", "movq_encoder")
    fp32 = export_onnx(source, tmp_path / "fp32", ExportOptions(stages=stages, parity_shapes=("min",)))
    messages: list[str] = []
    fp16 = export_onnx(source, tmp_path / "fp16", ExportOptions(precision="fp16", stages=stages,
                                                                 parity_shapes=("min",), reuse_stages=True),
                       report=messages.append)
    assert {stage: fp16.stats[stage]["graph"] for stage in stages} == {s: "reused" for s in stages}
    assert any("2 reused from ['fp32']" in m for m in messages)
    for stage in stages:
        assert (tmp_path / "fp16" / f"{stage}.onnx").samefile(tmp_path / "fp32" / f"{stage}.onnx")
        assert fp16.parity[stage] == fp32.parity[stage] and fp16.parity[stage]["passed"]
    assert fp16.precision == "fp16"
    ExportManifest.read(tmp_path / "fp16").verify_files(tmp_path / "fp16", check_hashes=True)
    # Wider parity than the FP32 export recorded: the stage is reused and checked again here.
    wider = export_onnx(source, tmp_path / "fp16b", ExportOptions(precision="fp16", stages=("movq_encoder",),
                                                                   parity_shapes=("min", "max"), reuse_stages=True))
    assert wider.stats["movq_encoder"]["graph"] == "reused"
    assert wider.parity["movq_encoder"]["passed"]
    cases = json.loads((tmp_path / "fp16b" / "parity.json").read_text())[0]["cases"]
    assert any("max" in case["shape"] for case in cases)


def test_damaged_export_is_detected(source, tmp_path):
    out = tmp_path / "te"
    options = ExportOptions(stages=("text_encoder",), parity_shapes=())
    export_onnx(source, out, options)
    data = (out / "text_encoder.onnx").read_bytes()
    (out / "text_encoder.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportManifestError, match="truncated or replaced"):
        ExportManifest.read(out).verify_files(out)
    with pytest.raises(ExportInputError, match="damaged"):
        export_onnx(source, out, options)


@pytest.mark.parametrize("options,message", [
    (ExportOptions(stages=("unet_t2v_vid",)), r"unknown stage\(s\) \['unet_t2v_vid'\]"),
    (ExportOptions(precision="int8"), "precision 'int8'"),
    (ExportOptions(jobs=0), "jobs=0"),
    (ExportOptions(parity_shapes=("huge",)), r"parity shapes \['huge'\]"),
])
def test_bad_options(source, tmp_path, options, message):
    with pytest.raises(ExportInputError, match=message):
        export_onnx(source, tmp_path / "out", options)
    assert not (tmp_path / "out").exists()


def test_checkpoint_preset_mismatch(tiny_checkpoint_dir):
    with pytest.raises(CheckpointError, match=r"not the 'full' preset's architecture: t2v.model_channels: 8"):
        export_onnx(ExportSource("full", weights=str(tiny_checkpoint_dir)), "/tmp/unused")


def test_occupied_directory_is_refused(source, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(ExportInputError, match="not empty and holds no kvt export"):
        export_onnx(source, tmp_path / "out", ExportOptions(stages=("text_encoder",)))
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_not_enough_disk_space(source, tmp_path, monkeypatch):
    import kvt.export.exporter as exporter

    class Usage:
        total, used, free = 10**12, 10**12 - 1000, 1000

    monkeypatch.setattr(exporter.shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(ExportInputError, match=r"not enough disk space .* needs about .* GiB"):
        export_onnx(source, tmp_path / "out", ExportOptions(stages=("text_encoder",)))
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_writing_leaves_nothing(source, tmp_path, monkeypatch):
    import kvt.export.exporter as exporter

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(exporter, "_write_assets", full)
    with pytest.raises(ExportError, match="disk full while exporting"):
        export_onnx(source, tmp_path / "out", ExportOptions(stages=("text_encoder",), parity_shapes=()))
    assert list(tmp_path.iterdir()) == [], "neither the output nor a temporary directory is left"


def test_parity_failure_rejects_the_export(source, tmp_path, monkeypatch):
    monkeypatch.setitem(parity_module.THRESHOLDS, "fp32", parity_module.Threshold(max_rel=1e-12, min_cosine=1.0))
    with pytest.raises(ParityError, match=r"parity thresholds exceeded for \['text_encoder'\]"):
        export_onnx(source, tmp_path / "out", ExportOptions(stages=("text_encoder",)))
    assert not (tmp_path / "out").exists()
    rejected = tmp_path / "out.rejected"
    assert "**NO**" in (rejected / "parity.md").read_text()


def test_cli_export_and_errors(tmp_path, capsys, tiny_checkpoint_dir, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # not the user's graph cache
    weights = tiny_checkpoint_dir
    out = tmp_path / "te"
    assert main(["export", "--preset", "tiny", "--weights", str(weights), "--out", str(out), "--stages", "text_encoder",
                 "--parity-shapes", "min,odd"]) == EXIT_OK
    err = capsys.readouterr().err
    # One line per stage with its times and parity; the exporter stack's warnings only with -v.
    line = next(line for line in err.splitlines() if line.startswith("kvt export: text_encoder (fp32) "))
    assert "trace " in line and "weights " in line and "parity " in line and "at 2 shapes: max rel" in line
    assert "wrote 1 stage(s)" in err and (out / "manifest.json").is_file()
    assert "Warning" not in err and "torchvision" not in err
    assert main(["export", "--weights", str(weights), "--out", str(tmp_path / "x"), "--stages", "nope"]) == EXIT_INVALID
    assert "unknown stage(s) ['nope']" in capsys.readouterr().err
    assert main(["export", "--preset", "full", "--weights", str(weights), "--out", str(tmp_path / "y")]) == EXIT_INVALID
    assert "not the 'full' preset's architecture" in capsys.readouterr().err
    assert main(["export", "--preset", "huge", "--out", str(tmp_path / "z")]) == EXIT_INVALID
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
