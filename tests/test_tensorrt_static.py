"""What stands in for a GPU: the static checks of the exported graphs (kvt.engines.static_checks), the BF16
text-encoder rewrite (kvt.engines.precision) and the memory planner (kvt.engines.memory_plan,
``kvt plan-memory``).

The checks run on the tiny FP16 export of the session (conftest.py) and must pass there; each rule is also
shown to fail on a small graph that breaks it: built with onnx.helper, or exported from torch where the
broken form is what torch's exporter produces (the boolean-mask attention of the old export).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from kvt.cli.main import EXIT_INVALID, EXIT_OK, main
from kvt.contract.profiles import Resolution
from kvt.engines import memory_plan
from kvt.engines.memory_plan import KNOWN_GPUS, GpuSpec, Planner, parse_gpu, preset_request, trace_call
from kvt.engines.precision import from_bf16_bits, iter_bf16_initializers, rewrite_bf16_weights, to_bf16_bits
from kvt.engines.static_checks import (
    Graph,
    StaticCheckError,
    attention_sites,
    check_attention,
    check_constants,
    check_export,
    check_model,
    check_refold,
    check_support,
    require_clean,
    support_matrix,
)
from kvt.export.cleanup import fold_weight_shapes
from kvt.export.graph_export import OPSET
from kvt.runtime.backends.tensorrt.trt_env import MIN_TENSORRT_VERSION

UNETS = ("unet_t2v_image", "unet_t2v_video", "unet_interp")
FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16


def _model(nodes, inputs, outputs, initializers=(), opset=OPSET):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model)


def _value(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


# ------------------------------------------------------------------------------------- the export

def test_the_tiny_fp16_export_passes_every_static_check(tiny_export_fp16):
    reports = check_export(tiny_export_fp16)  # support, constants, attention, refold
    require_clean(reports)
    assert set(reports) >= set(UNETS) | {"text_encoder", "movq_decoder", "video_movq_decoder"}
    for stage in UNETS:
        sites = reports[stage].attention
        assert sites and all(s.fused_kernel_expected for s in sites), [s.describe() for s in sites]
        assert any(s.masked for s in sites) and any(not s.masked for s in sites)  # cross and self attention
        graph = onnx.load(str(tiny_export_fp16 / f"{stage}.onnx"), load_external_data=False).graph
        assert "IsNaN" not in {n.op_type for n in graph.node}  # no boolean-mask guard any more
    for stage in ("movq_decoder", "video_movq_decoder"):  # FP32 by policy: fusable form, no fused kernel
        sites = reports[stage].attention
        assert sites and all(s.fusable_form and not s.fused_kernel_expected for s in sites)


def test_every_convolution_and_norm_weight_of_the_export_is_an_initializer(tiny_export_fp16):
    """D14: after the second fold, no Conv takes a computed bias (onnx-tensorrt's dynamic-weights path)."""
    for stage in UNETS:
        graph = Graph(onnx.load(str(tiny_export_fp16 / f"{stage}.onnx"), load_external_data=False))
        convs = [n for n in graph.nodes if n.op_type in ("Conv", "ConvTranspose")]
        norms = [n for n in graph.nodes if n.op_type == "InstanceNormalization"]
        assert convs and norms
        for node in convs + norms:
            assert all(graph.is_constant(name) for name in node.input[1:] if name), node.name


def test_the_support_matrix_is_data_with_its_sources():
    matrix = support_matrix()
    assert matrix.minimum_tensorrt == MIN_TENSORRT_VERSION
    assert matrix.opsets[0] <= OPSET <= matrix.opsets[1] == 20
    assert "96e781103cfc4adf4a6bb557e94bac8e693f6f4c" in matrix.sources["matrix"]
    assert "10.15" in matrix.sources["checked_against"] and "ff761afc" in matrix.sources["not_available"]
    assert "Attention" not in matrix.types  # ONNX Attention parses only from 10.15
    assert matrix.types["Softmax"] == ("FP32", "FP16", "BF16") and "BOOL" in matrix.types["Where"]
    assert any("axes" == name for _, name, _ in matrix.constant_inputs["Unsqueeze"])


# ------------------------------------------------------------------------------------- each rule fails

def test_support_rule_fails_on_ops_types_attributes_and_opsets():
    x = _value("x", FLOAT, [2, 4])
    ints = _value("i", TensorProto.INT32, [2, 4])
    model = _model([helper.make_node("Unique", ["x"], ["u"], name="unique"),
                    helper.make_node("Sqrt", ["i"], ["s"], name="int_sqrt"),
                    helper.make_node("Cast", ["x"], ["d"], to=TensorProto.DOUBLE, name="to_double"),
                    helper.make_node("Relu", ["x"], ["y"], name="fine")],
                   [x, ints], [_value("u", FLOAT, None), _value("s", TensorProto.INT32, [2, 4]),
                               _value("d", TensorProto.DOUBLE, [2, 4]), _value("y", FLOAT, [2, 4])])
    text = "\n".join(map(str, check_support(Graph(model))))
    assert "'unique': op Unique" in text and "'int_sqrt': Sqrt on INT32" in text
    assert "'to_double': Cast on DOUBLE" in text and "'fine'" not in text
    resize = _model([helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="cubic", antialias=1, name="rs")],
                    [_value("x", FLOAT, [1, 1, 4, 4])], [_value("y", FLOAT, None)],
                    [_const("scales", np.array([1, 1, 2, 2], np.float32))])
    text = "\n".join(map(str, check_support(Graph(resize))))
    assert "Resize mode='cubic'" in text and "Resize antialias=1" in text
    new_opset = _model([helper.make_node("Relu", ["x"], ["y"])], [x], [_value("y", FLOAT, [2, 4])], opset=21)
    assert "opset 21 is outside" in str(check_support(Graph(new_opset))[0])


def test_constants_rule_fails_on_computed_weights_and_axes():
    """torchlib's zero bias of a bias-free convolution, Expand(Cast(0), Shape(W)[:1]), as the first fold
    left it (the weight still a graph input), and an Unsqueeze axes computed at run time."""
    nodes = [helper.make_node("Shape", ["w"], ["w_shape"], end=1),
             helper.make_node("Cast", ["zero"], ["zero_f"], to=FLOAT),
             helper.make_node("Expand", ["zero_f", "w_shape"], ["bias"]),
             helper.make_node("Conv", ["x", "w", "bias"], ["y"], name="ff_conv"),
             helper.make_node("Unsqueeze", ["y", "axes"], ["z"], name="unsq")]
    model = _model(nodes, [_value("x", FLOAT, [1, 2, 4, 4]), _value("w", FLOAT, [3, 2, 1, 1]),
                           _value("axes", TensorProto.INT64, [1])],
                   [_value("z", FLOAT, None)], [_const("zero", np.array(0, np.int64))])
    problems = check_constants(Graph(model))
    text = "\n".join(map(str, problems))
    assert "'ff_conv': Conv input 1 (W) 'w' is computed by a graph input" in text
    assert "'ff_conv': Conv input 2 (B) 'bias' is computed by Expand" in text
    assert "'unsq': Unsqueeze input 1 (axes)" in text and "support matrix requires it" in text
    # the clean-up's fix: Shape of the (static) weight becomes a constant, then folding reaches the bias
    assert fold_weight_shapes(model) == 1
    assert "w_shape" in {t.name for t in model.graph.initializer}


def _export(module, args, names):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, input_names=names, dynamo=True, opset_version=OPSET,
                                    optimize=False, verify=False, report=False)
    return onnx.shape_inference.infer_shapes(program.model_proto)


class _BoolMaskAttention(torch.nn.Module):
    def forward(self, q, k, v, mask):  # the old export: SDPA with a boolean key mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], scale=0.125)


class _AdditiveMaskAttention(torch.nn.Module):
    def forward(self, q, k, v, mask):  # kvt's Attention.attend now
        blocked = torch.full((), -torch.finfo(q.dtype).max, dtype=q.dtype)
        bias = torch.where(mask, torch.zeros_like(blocked), blocked)[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.125)


def _attention_args():
    q = torch.randn(2, 3, 5, 8, dtype=torch.float16)
    k, v = torch.randn(2, 3, 7, 8, dtype=torch.float16), torch.randn(2, 3, 7, 8, dtype=torch.float16)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[:, 4:] = False
    return q, k, v, mask


def test_attention_lint_fails_on_the_boolean_mask_export_and_passes_the_additive_one():
    old = _export(_BoolMaskAttention(), _attention_args(), ["q", "k", "v", "mask"])
    problems, sites = check_attention(Graph(old))
    assert len(sites) == 1 and problems
    assert "Softmax output feeds IsNaN" in problems[0].message and not sites[0].fused_kernel_expected
    new = _export(_AdditiveMaskAttention(), _attention_args(), ["q", "k", "v", "mask"])
    problems, sites = check_attention(Graph(new))
    assert not problems and len(sites) == 1
    assert sites[0].masked and sites[0].fused_kernel_expected and sites[0].dtype == HALF


def _attention_graph(between_bmm1_and_softmax, dtype=HALF):
    """MatMul -> [ops] -> Softmax -> MatMul with hand-made nodes in the middle."""
    nodes = [helper.make_node("MatMul", ["q", "kt"], ["s0"], name="bmm1")]
    last = "s0"
    for index, (op, extra) in enumerate(between_bmm1_and_softmax):
        out = f"s{index + 1}"
        nodes.append(helper.make_node(op, [last, *extra[0]], [out], **extra[1]))
        last = out
    nodes += [helper.make_node("Softmax", [last], ["p"], axis=-1, name="softmax"),
              helper.make_node("MatMul", ["p", "v"], ["o"], name="bmm2")]
    return _model(nodes, [_value("q", dtype, [1, 2, 5, 8]), _value("kt", dtype, [1, 2, 8, 7]),
                          _value("v", dtype, [1, 2, 7, 8])], [_value("o", dtype, None)],
                  [_const("scale", np.array(0.125, np.float16)), _const("mask", np.zeros((1, 1, 1, 7), np.float16))])


def test_attention_lint_names_what_sits_between_bmm1_and_softmax():
    assert check_attention(Graph(_attention_graph([])))[1][0].fused_kernel_expected
    assert check_attention(Graph(_attention_graph([("Add", (["mask"], {}))])))[1][0].fused_kernel_expected
    cast = _attention_graph([("Cast", ([], {"to": FLOAT})), ("Cast", ([], {"to": HALF}))])
    assert "between BMM1 and Softmax: Cast -> Cast" in check_attention(Graph(cast))[0][0].message
    scaled_after = _attention_graph([("Mul", (["scale"], {}))])
    assert "between BMM1 and Softmax: Mul" in check_attention(Graph(scaled_after))[0][0].message
    fp32 = attention_sites(Graph(_attention_graph([], dtype=FLOAT)))[0]
    assert fp32.fusable_form and not fp32.fused_kernel_expected


def test_refold_rule_fails_when_a_constant_subgraph_is_left():
    nodes = [helper.make_node("Add", ["a", "b"], ["ab"], name="constant_add"),
             helper.make_node("Transpose", ["network.w"], ["wt"], perm=[1, 0], name="weight_transpose"),
             helper.make_node("MatMul", ["x", "wt"], ["y"]),
             helper.make_node("Add", ["y", "ab"], ["z"])]
    inits = [_const("a", np.ones(3, np.float32)), _const("b", np.ones(3, np.float32)),
             _const("network.w", np.ones((3, 4), np.float32))]
    model = _model(nodes, [_value("x", FLOAT, [2, 4])], [_value("z", FLOAT, [2, 3])], inits)
    problems = check_refold(model)
    assert len(problems) == 1 and "constant_add (Add)" in problems[0].message
    assert "weight_transpose" not in problems[0].message  # weights are inputs while cleaning, as in the exporter
    clean = _model(nodes[1:3], [_value("x", FLOAT, [2, 4])], [_value("y", FLOAT, [2, 3])], inits[2:])
    assert check_refold(clean) == []
    with pytest.raises(StaticCheckError, match="1 static check problem"):
        require_clean({"g": check_model(model, "g", ["refold"])})


def test_static_checks_command(tiny_export_fp16, capsys):
    from kvt.engines.static_checks import main as checks_main

    assert checks_main([str(tiny_export_fp16), "--stages", "unet_t2v_image,movq_decoder", "--no-refold"]) == 0
    err = capsys.readouterr().err
    assert "0 problem(s) in 2 graph(s)" in err and "TensorRT >= 10.12" in err


# ------------------------------------------------------------------------------------- BF16 text encoder

def test_bf16_bits_round_to_nearest_even():
    values = np.array([1.0, -2.5, 3.1415927, 1e-30, 65504.0, 1.00390625, 1.01171875], np.float32)
    back = from_bf16_bits(to_bf16_bits(values))
    assert back.dtype == np.float32 and back[0] == 1.0 and back[1] == -2.5
    assert np.all(np.abs(back - values) <= np.abs(values) * 2**-8)
    assert back[5] == 1.0 and back[6] == 1.015625  # ties to even


def test_text_encoder_rewrite_keeps_io_and_stores_gemm_weights_as_bf16(tiny_export_fp16, tmp_path):
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    from kvt.models.presets import TINY
    from kvt.models.stage_modules import stage_table_for

    source = tiny_export_fp16 / "text_encoder.onnx"
    result = rewrite_bf16_weights(source, tmp_path / "text_encoder.onnx")
    assert result.converted > 0 and result.casts > 0 and result.bytes_after < 0.6 * result.bytes_before
    original = onnx.load(str(source))
    rewritten = onnx.load(str(result.path))
    assert [(i.name, i.type.tensor_type.elem_type) for i in rewritten.graph.input] == \
        [(i.name, i.type.tensor_type.elem_type) for i in original.graph.input]
    assert [(o.name, o.type.tensor_type.elem_type) for o in rewritten.graph.output] == \
        [(o.name, o.type.tensor_type.elem_type) for o in original.graph.output]
    onnx.shape_inference.infer_shapes(rewritten, check_type=True, strict_mode=True)
    weights = dict(iter_bf16_initializers(result.path))
    assert len(weights) == result.converted
    by_name = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    for name, values in weights.items():
        assert values.ndim >= 2 and np.allclose(values, by_name[name], rtol=2**-8, atol=0)
    # Everything but the GEMM/embedding weights stays FP32: norms, softmax, the projection LayerNorm.
    types = {t.name: t.data_type for t in rewritten.graph.initializer}
    assert {types[n] for n in types if n not in weights} <= {TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32,
                                                              TensorProto.BOOL}
    assert all(static.fusable_form for static in check_model(rewritten, "t5", ["support"]).attention)
    assert check_model(rewritten, "t5", ["support", "constants"]).ok
    # Numerics: the BF16-weight graph (ONNX's reference evaluator: ONNX Runtime's CPU provider has no
    # BF16 MatMul) against the FP32 graph on ONNX Runtime.
    spec = stage_table_for(TINY.config)["text_encoder"]
    inputs = {k: v.numpy() for k, v in spec.sample_inputs({"B": 2}, seed=1).items()}
    want = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    got = ReferenceEvaluator(rewritten).run(None, inputs)[0]
    assert got.dtype == np.float32 and np.isfinite(got).all()
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 3e-2 * scale, (np.abs(got - want).max(), scale)


# ------------------------------------------------------------------------------------- the planner

class _Chain(torch.nn.Module):
    def forward(self, x):
        a = x * 2
        b = a + 1
        del a
        c = b * 3
        return c


def test_trace_counts_live_intermediates_and_records_attention():
    from kvt.contract.dtypes import DType
    from kvt.contract.stages import Dim, StageSpec, TensorSpec

    spec = StageSpec("chain", "n", inputs=(TensorSpec("x", DType.FP32, ("N", 256)),),
                     outputs=(TensorSpec("y", DType.FP32, ("N", 256)),), dims={"N": Dim(1, 4, 4)})
    trace = trace_call(_Chain(), spec, {"N": 4})
    one = 4 * 256 * 4
    assert trace.live_peak == 2 * one  # a and b, then b and c: never three
    assert trace.io_bytes == 2 * one and trace.attention == ()

    class Attend(torch.nn.Module):
        def forward(self, x):
            q = x.view(1, 2, 512, 1).expand(1, 2, 512, 8)
            return F.scaled_dot_product_attention(q, q, q).sum(-1).view(4, 256)

    trace = trace_call(Attend(), spec, {"N": 4})
    assert [(c.batch, c.heads, c.queries, c.keys) for c in trace.attention] == [(1, 2, 512, 512)]
    assert trace.live_peak < trace.attention[0].score_bytes()  # the fused kernel keeps no score matrix
    assert trace.attention[0].score_bytes() == 2 * 2 * 512 * 512 * 4


def test_parse_gpu():
    assert parse_gpu("H100").memory == 81559 * 2**20 and parse_gpu("h200").name == "H200 141GB"
    assert parse_gpu("80GiB").memory == 80 * 2**30 and parse_gpu("80GB").memory == 80 * 10**9
    assert parse_gpu("1048576").memory == 2**20
    with pytest.raises(memory_plan.UserError, match="a GPU name"):
        parse_gpu("a big one")


@pytest.fixture(scope="module")
def tiny_plan():
    request = preset_request("tiny", [Resolution(64, 64)], ["low", "medium", "high"])
    return Planner.shared().plan(request, KNOWN_GPUS["H100-80GB"], "tiny 64x64")


def test_tiny_plan_counts_each_plan_and_profile(tiny_plan):
    stages = {s.stage: s for s in tiny_plan.stages}
    assert list(stages) == ["text_encoder", "unet_t2v_image", "unet_t2v_video", "unet_interp", "movq_encoder",
                            "movq_decoder", "video_movq_decoder"]
    # The image-mode plan has no temporal layers; two plans of one network hold two copies of the rest.
    assert 0 < stages["unet_t2v_image"].weight_bytes < stages["unet_t2v_video"].weight_bytes
    assert stages["text_encoder"].precision == "bf16" and stages["movq_decoder"].precision == "fp32"
    interp = stages["unet_interp"]
    assert [p.dims["N"] for p in interp.profiles] == [22, 88]
    assert interp.profiles[1].live_bytes > interp.profiles[0].live_bytes
    assert interp.triton_activation_bytes("STATIC") == 2 * interp.activation_bytes
    assert interp.triton_activation_bytes("ON_PROFILE_CHANGE") == sum(p.activation_bytes for p in interp.profiles)
    # FP32 attention (MoVQ) is counted unfused; the FP16 U-Nets' is not.
    assert stages["movq_decoder"].profiles[0].attention_bytes > 0 and "unfused" in stages["movq_decoder"].attention
    assert stages["unet_interp"].attention.startswith("fused")
    assert all(p.attention_bytes == 0 and p.attention_worst > 0 for p in interp.profiles)
    trt, triton = tiny_plan.tensorrt_totals(), tiny_plan.triton_totals()
    assert trt.activations == max(s.activation_bytes for s in tiny_plan.stages)  # one shared buffer
    assert triton.activations == sum(s.triton_activation_bytes() for s in tiny_plan.stages)
    assert trt.weights == triton.weights == sum(s.weight_bytes for s in tiny_plan.stages)
    assert tiny_plan.fits("tensorrt", 0.10) and tiny_plan.fits("triton", 0.10)
    text = memory_plan.render_breakdown(tiny_plan)
    assert "| unet_interp | fp16 |" in text and "not measured" in text
    with pytest.raises(memory_plan.MemoryPlanError, match="does not fit 1 MiB GPU"):
        memory_plan.require_fit(memory_plan.with_gpu(tiny_plan, GpuSpec("1 MiB GPU", 2**20)), ["tensorrt"], 0.0)


def test_kvt_plan_memory_command(capsys):
    args = ["plan-memory", "--preset", "tiny", "--resolution", "64x64", "--fps", "low"]
    assert main([*args, "--gpu", "H100-80GB"]) == EXIT_OK
    out = capsys.readouterr()
    assert "| tensorrt |" in out.out and "fit with at least 10 %" in out.err
    assert main([*args, "--gpu", "1GiB"]) == EXIT_INVALID
    out = capsys.readouterr()
    assert "| text_encoder | bf16 |" in out.out and "do not fit with 10 %" in out.err
    assert main([*args, "--gpu", "H200", "--json", "--text-encoder-precision", "fp32"]) == EXIT_OK
    data = json.loads(capsys.readouterr().out)
    assert data[0]["stages"][0]["precision"] == "fp32" and data[0]["totals"]["tensorrt"]["spare"] > 0.9
    assert main([*args, "--fps", "medium", "--gpu", "H200", "--table"]) == EXIT_OK
    table = capsys.readouterr().out
    assert "| tiny 64x64 fps low |" in table and "| tiny 64x64 fps low+medium |" in table
    assert main([*args, "--gpu", "nonsense"]) == EXIT_INVALID


@pytest.mark.fullsize
def test_a_tight_512x512_full_build_fits_an_80gb_h100():
    """The issue's bar, computed (not measured): every fps mode of a tight 512x512 build of the full
    preset fits an 80 GB H100 with at least 10 % to spare for the TensorRT backend; on an H200 for both
    backends. (Triton on an H100 is reported in docs/TENSORRT.md: it holds activations per model.)"""
    planner = Planner.shared()
    for fps in (["low"], ["medium"], ["high"], ["low", "medium", "high"]):
        request = preset_request("full", [Resolution(512, 512)], fps)
        h100 = planner.plan(request, KNOWN_GPUS["H100-80GB"], f"512 {fps}")
        assert h100.fits("tensorrt", 0.10), memory_plan.render_breakdown(h100)
        h200 = memory_plan.with_gpu(h100, KNOWN_GPUS["H200"])
        assert h200.fits("tensorrt", 0.10) and h200.fits("triton", 0.10), memory_plan.render_breakdown(h200)
        stages = {s.stage: s for s in h100.stages}
        # BF16 text encoder: about 17 GB instead of 35 GB of FP32 weights.
        assert 16e9 < stages["text_encoder"].weight_bytes < 18e9
        assert 8.0e9 < stages["unet_t2v_video"].weight_bytes < 8.6e9
        assert stages["video_movq_decoder"].profiles[0].dims["F"] <= 5  # capped at the pipeline's chunks
