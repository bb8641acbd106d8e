"""SmoothQuant migration in the int8 pass: exact in float, folded or inserted, and it pays."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from modelpress.compressors.model import check_model, load_model, normalize, to_bytes
from modelpress.compressors.pipeline import PassContext
from modelpress.compressors.quantize import smoothing
from modelpress.compressors.quantize.graph_edits import Names
from modelpress.compressors.quantize.int8 import Int8Config, Int8Quantize

D, HIDDEN, TOKENS = 64, 256, 16


def ffn_block(post_ln: bool, decomposed: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x -> LayerNorm (a few gamma channels 40x: the outliers of trained transformers) -> MatMul ->
    Relu -> MatMul, plus a residual: post-LN adds the normalized y (so y has a second reader),
    pre-LN adds x (the MatMul is y's only reader)."""
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 1.5, D).astype(np.float32)
    gamma[[3, 17, 40]] *= 40.0
    beta = rng.normal(0, 0.1, D).astype(np.float32)
    w1 = rng.normal(0, 0.1, (D, HIDDEN)).astype(np.float32)
    w2 = rng.normal(0, 0.05, (HIDDEN, D)).astype(np.float32)
    tensors = [numpy_helper.from_array(a, n) for a, n in ((gamma, "gamma"), (beta, "beta"), (w1, "w1"), (w2, "w2"))]
    if decomposed:  # LayerNorm as exported below opset 17
        tensors += [numpy_helper.from_array(np.array(v, np.float32), n) for v, n in ((2.0, "two"), (1e-5, "eps"))]
        norm = [
            helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1]),
            helper.make_node("Sub", ["x", "mean"], ["centred"]),
            helper.make_node("Pow", ["centred", "two"], ["sq"]),
            helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
            helper.make_node("Add", ["var", "eps"], ["var_eps"]),
            helper.make_node("Sqrt", ["var_eps"], ["std"]),
            helper.make_node("Div", ["centred", "std"], ["normed"]),
            helper.make_node("Mul", ["normed", "gamma"], ["scaled"]),
            helper.make_node("Add", ["scaled", "beta"], ["y"]),
        ]
        opset = 13
    else:
        norm = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], axis=-1)]
        opset = 17
    nodes = norm + [
        helper.make_node("MatMul", ["y", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["o"]),
        helper.make_node("Add", ["y" if post_ln else "x", "o"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "ffn", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", TOKENS, D])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["N", TOKENS, D])], tensors,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _inputs(n: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, TOKENS, D)).astype(np.float32)


def _run(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.mark.parametrize("post_ln, decomposed, how", [
    (True, False, "Mul inserted"), (False, False, "folded into the normalization"),
    (False, True, "folded into the normalization"),
])
def test_migration_is_exact_in_float(tmp_path, post_ln, decomposed, how):
    proto = ffn_block(post_ln, decomposed)
    x = _inputs()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    model = load_model(path)
    normalize(model)
    graph = model.graph
    matmul = next(n for n in graph if n.op_type == "MatMul")
    y = matmul.inputs[0]
    assert smoothing.normalization_output(y)
    reduce = smoothing.ChannelAbsMax()
    y_values = _run(_with_output(proto, "y"), x)
    reduce.update(y_values)
    record = smoothing.migrate(graph, y, [(matmul, matmul.inputs[1])], reduce.value, 0.5, Names(model))
    assert record["how"] == how
    assert record["outlier_ratio"] > 10
    check_model(model)
    before, after = _run(proto.SerializeToString(), x), _run(to_bytes(model), x)
    assert _relative_error(before, after) < 1e-5
    # The migrated activation is even: its largest channel is now within a few times the median.
    smoothed_input = matmul.inputs[0].name
    values = _run(_with_output(onnx.load_from_string(to_bytes(model)), smoothed_input), x)
    channel_max = np.abs(values.reshape(-1, D)).max(0)
    assert channel_max.max() / np.median(channel_max) < record["outlier_ratio"] / 3


def _with_output(proto: onnx.ModelProto, name: str) -> bytes:
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    del copy.graph.output[:]
    copy.graph.output.append(helper.make_empty_tensor_value_info(name))
    return copy.SerializeToString()


@pytest.mark.parametrize("post_ln", [True, False])
def test_smoothing_cuts_dynamic_int8_error(tmp_path, post_ln):
    path = tmp_path / "m.onnx"
    onnx.save(ffn_block(post_ln), path)
    x_cal, x_eval = _inputs(64, seed=1), _inputs(64, seed=2)
    reference = _run(onnx.load(path).SerializeToString(), x_eval)
    errors = {}
    for alpha in (None, 0.5):
        model = load_model(path)
        normalize(model)
        context = PassContext(calibration=[{"x": x_cal}], seed=0, threads=1)
        result = Int8Quantize(Int8Config(mode="dynamic", smoothing=alpha), context).call(model)
        check_model(result.model)
        assert result.stats["quantized"] == {"MatMul": {"dynamic": 2}}
        assert len(result.stats["smoothed"]) == (0 if alpha is None else 1)
        errors[alpha] = _relative_error(reference, _run(to_bytes(result.model), x_eval))
    assert errors[0.5] < 0.5 * errors[None], errors


def test_reduce_range_keeps_kernel_weights_in_seven_bits(tmp_path):
    """On AVX2 CPUs without VNNI, u8 x s8 pair sums saturate int16: kernel weights stay in [-64, 63]."""
    path = tmp_path / "m.onnx"
    onnx.save(ffn_block(post_ln=False), path)
    x = _inputs(32, seed=3)
    reference = _run(onnx.load(path).SerializeToString(), x)
    spans = {}
    for reduce in (False, True):
        model = load_model(path)
        normalize(model)
        context = PassContext(calibration=[{"x": x}], seed=0, threads=1)
        result = Int8Quantize(Int8Config(mode="dynamic", reduce_range=reduce), context).call(model)
        assert result.stats["reduce_range"]["used"] is reduce
        ints = [v.const_value.numpy() for v in result.model.graph.initializers.values()
                if v.const_value is not None and v.const_value.dtype == ir.DataType.INT8]
        spans[reduce] = (min(int(a.min()) for a in ints), max(int(a.max()) for a in ints))
        error = _relative_error(reference, _run(to_bytes(result.model), x))
        assert error < 0.05
    assert spans[False][1] == 127 and spans[True][0] >= -64 and spans[True][1] <= 63


def outlier_chain(seed: int = 0) -> onnx.ModelProto:
    """Three MatMuls; the middle one reads an activation with one channel 1000x the others, which
    no per-tensor dynamic scale can serve: its int8 kernel alone wrecks the output."""
    rng = np.random.default_rng(seed)
    wa = rng.normal(0, 0.1, (D, HIDDEN)).astype(np.float32)
    wb = rng.normal(0, 0.1, (HIDDEN, HIDDEN)).astype(np.float32)
    wc = rng.normal(0, 0.1, (HIDDEN, D)).astype(np.float32)
    gain = np.ones(HIDDEN, np.float32)
    gain[7] = 1000.0
    wb[7] /= 1000.0  # the outlier channel matters as much as any other for the product
    tensors = [numpy_helper.from_array(a, n) for a, n in ((wa, "wa"), (wb, "wb"), (wc, "wc"), (gain, "gain"))]
    nodes = [
        helper.make_node("MatMul", ["x", "wa"], ["a"]),
        helper.make_node("Mul", ["a", "gain"], ["a_gain"]),
        helper.make_node("MatMul", ["a_gain", "wb"], ["b"]),
        helper.make_node("MatMul", ["b", "wc"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", TOKENS, D])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["N", TOKENS, D])], tensors,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_output_check_gives_back_only_the_layer_that_adds_the_error(tmp_path):
    path = tmp_path / "chain.onnx"
    onnx.save(outlier_chain(), path)
    x_cal, x_eval = _inputs(32, seed=4), _inputs(32, seed=5)
    model = load_model(path)
    normalize(model)
    context = PassContext(calibration=[{"x": x_cal}], original=None, seed=0, threads=1)
    result = Int8Quantize(Int8Config(mode="dynamic"), context).call(model)
    check_model(result.model)
    verification = result.stats["verification"]
    assert verification["reverted"][0].startswith("int8 kernels:")  # the whole plan missed first
    methods = {d["tensor"]: d["method"] for d in result.stats["decisions"]}
    assert methods == {"wa": "dynamic", "wb": "weight_only", "wc": "dynamic"}
    wb = next(d for d in result.stats["decisions"] if d["tensor"] == "wb")
    assert "adding the most output error" in wb["reason"]
    assert verification["cosine"] >= 0.99
    reference = _run(onnx.load(path).SerializeToString(), x_eval)
    assert _relative_error(reference, _run(to_bytes(result.model), x_eval)) < 0.1  # two int8 kernels left
