"""fp16 pass: float32 weights stored as float16 / bfloat16 behind a Cast that ORT folds at load.

Asserted: stored values are exactly numpy's float16 / bfloat16 rounding of the weights; ORT
outputs equal a float32 recomputation with those rounded weights (1e-5); weight bytes ~2x smaller;
tensors that would overflow or underflow stay float32 with the reason; If-subgraph and
Constant-node weights are converted; ORT's optimized graph keeps no Cast (folded); digits MLP and
CNN keep their accuracy; same input, same bytes."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import tiny_mlp, zoo
from modelpress.compressors.model import check_model, load_model, normalize, to_bytes
from modelpress.compressors.quantize.fp16 import Fp16Config, Fp16Quantize
from modelpress.compressors.quantize.graph_edits import initializer_bytes
from modelpress.compressors.registry import PASSES
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

RNG = np.random.default_rng(0)
X = RNG.random((16, 64), dtype=np.float32)


def _run(proto: onnx.ModelProto, **options):
    model = ir.from_proto(proto)
    normalize(model)
    before = initializer_bytes(model)
    result = Fp16Quantize(Fp16Config(**options)).call(model)
    check_model(result.model)
    return result, to_bytes(result.model), before


def _session(model: bytes, optimized: str | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized:
        options.optimized_model_filepath = optimized
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _initializers(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    found, graphs = {}, [proto.graph]
    while graphs:
        graph = graphs.pop()
        found.update({t.name: t for t in graph.initializer})
        for node in graph.node:
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.HasField("g") else list(attr.graphs))
    return found


def _op_count(path: str, op: str) -> int:
    count, graphs = 0, [onnx.load(path).graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            count += node.op_type == op
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.HasField("g") else list(attr.graphs))
    return count


def _mlp_reference(proto: onnx.ModelProto, dtype) -> np.ndarray:
    w = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    w1, w2 = (w[k].astype(dtype).astype(np.float32) for k in ("w1", "w2"))
    return np.maximum(X @ w1 + w["b1"].astype(dtype).astype(np.float32), 0) @ w2


@pytest.mark.parametrize("dtype, numpy_type", [("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)])
def test_weights_stored_16_bit_outputs_match_rounded_fp32(tmp_path, dtype, numpy_type):
    proto = tiny_mlp()
    result, model, before = _run(proto, dtype=dtype)
    stored = _initializers(onnx.load_from_string(model))
    suffix = "fp16" if dtype == "float16" else "bf16"
    for name in ("w1", "b1", "w2"):
        original = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name))
        tensor = stored[f"{name}_{suffix}"]
        assert tensor.data_type == (TensorProto.FLOAT16 if dtype == "float16" else TensorProto.BFLOAT16)
        raw = np.frombuffer(tensor.raw_data, np.uint16)
        assert np.array_equal(raw, original.astype(numpy_type).view(np.uint16).reshape(-1))  # exact rounding
        assert name not in stored
    assert before / initializer_bytes(ir.from_proto(onnx.load_from_string(model))) == pytest.approx(2.0)
    optimized = str(tmp_path / "optimized.onnx")
    out = _session(model, optimized).run(None, {"input": X})[0]
    np.testing.assert_allclose(out, _mlp_reference(proto, numpy_type), rtol=1e-5, atol=1e-5)
    assert _op_count(optimized, "Cast") == 0  # ORT folded every Cast: the fp32 MatMuls run
    stats = result.stats
    assert stats["tensors_converted"] == 3 and stats["skipped"] == []
    limit = 2.0**-11 if dtype == "float16" else 2.0**-8  # half an ulp, relative
    for name, figures in stats["per_tensor"].items():
        original = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == name))
        assert figures["max_abs_error"] <= np.abs(original).max() * limit * 1.0001
        assert 0 < figures["relative_error"] <= limit
        assert (figures["bytes_before"], figures["bytes_after"]) == (original.nbytes, original.nbytes // 2)
        assert figures["stored_as"][0] in {v.name for v in result.model.graph.initializers.values()}


def test_overflow_and_underflow_stay_fp32_with_reason():
    proto = tiny_mlp()
    big = numpy_helper.to_array(proto.graph.initializer[0]) * 1e6  # |x| up to ~1e5 > 65504
    tiny = numpy_helper.to_array(proto.graph.initializer[2]) * 1e-6  # mostly below fp16's normal range
    proto.graph.initializer[0].CopyFrom(numpy_helper.from_array(big, "w1"))
    proto.graph.initializer[2].CopyFrom(numpy_helper.from_array(tiny, "w2"))
    result, model, _ = _run(proto)
    reasons = {s["tensor"]: s["reason"] for s in result.stats["skipped"]}
    assert reasons["w1"].startswith("overflow") and "65504" in reasons["w1"]
    assert reasons["w2"].startswith("underflow")
    stored = _initializers(onnx.load_from_string(model))
    assert stored["w1"].data_type == stored["w2"].data_type == TensorProto.FLOAT
    assert list(result.stats["per_tensor"]) == ["b1"]
    # bfloat16 has float32's range: both convert
    result, _, _ = _run(proto, dtype="bfloat16")
    assert sorted(result.stats["per_tensor"]) == ["b1", "w1", "w2"] and result.stats["skipped"] == []


def test_filters_min_elements_and_graph_inputs():
    proto = tiny_mlp()
    proto.graph.input.append(helper.make_tensor_value_info("w2", TensorProto.FLOAT, [128, 10]))
    result = Fp16Quantize(Fp16Config(exclude=("b*",))).call(ir.from_proto(proto))  # not normalized
    reasons = {s["tensor"]: s["reason"] for s in result.stats["skipped"]}
    assert reasons == {"b1": "excluded by include/exclude globs",
                       "w2": "is also a graph input, so callers may override it at run time"}
    # normalize takes initializers out of the inputs (IR 3 files list them all there): then w2 is a weight
    result, _, _ = _run(proto, exclude=("b*",))
    assert [s["tensor"] for s in result.stats["skipped"]] == ["b1"] and "w2" in result.stats["per_tensor"]
    result, _, _ = _run(tiny_mlp(), min_elements=2000)
    assert list(result.stats["per_tensor"]) == ["w1"] and result.stats["small_tensors_kept"] == 2


def test_after_int4_quantization_parameters_stay_exact():
    model = ir.from_proto(tiny_mlp())
    int4 = PASSES["quantize"]["int4"]
    model = int4(int4.config_cls(method="rtn", format="matmulnbits", min_elements=1)).call(model).model
    result = Fp16Quantize(Fp16Config()).call(model)
    check_model(result.model)
    reasons = {s["tensor"]: s["reason"] for s in result.stats["skipped"]}
    assert reasons and all(r == "a quantization parameter of MatMulNBits (kept exact)" for r in reasons.values())
    assert list(result.stats["per_tensor"]) == ["b1"]


def if_model() -> onnx.ModelProto:
    """x[N,64] -> If(sum(x) > 0): then MatMul(wt) / else MatMul(we), both then times the outer
    `scale` row [32] (an outer-scope weight read inside both branches)."""
    rng = np.random.default_rng(3)
    wt, we = (rng.normal(0, 0.3, (64, 32)).astype(np.float32) for _ in range(2))
    scale = rng.normal(1, 0.1, (1, 32)).astype(np.float32)

    def branch(name, weight):
        nodes = [helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_h"]),
                 helper.make_node("Mul", [f"{name}_h", "scale"], [f"{name}_y"])]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)],
                                 initializer=[numpy_helper.from_array(weight, f"{name}_w")])

    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=branch("then", wt), else_branch=branch("else", we))]
    graph = helper.make_graph(nodes, "if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
                              initializer=[numpy_helper.from_array(scale, "scale"),
                                           numpy_helper.from_array(np.float32(0), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_if_subgraph_weights_and_outer_scope_weight(tmp_path):
    proto = if_model()
    result, model, before = _run(proto)
    assert sorted(result.stats["per_tensor"]) == ["else_w", "scale", "then_w"]
    stored = _initializers(onnx.load_from_string(model))
    assert {n for n, t in stored.items() if t.data_type == TensorProto.FLOAT16} == {"else_w_fp16", "scale_fp16", "then_w_fp16"}
    assert stored["zero"].data_type == TensorProto.FLOAT  # one element: below min_elements
    assert before / initializer_bytes(ir.from_proto(onnx.load_from_string(model))) > 1.99
    reference, optimized = _session(proto.SerializeToString()), str(tmp_path / "optimized.onnx")
    candidate = _session(model, optimized)
    for x in (X, -X):  # both branches
        want = reference.run(None, {"x": x})[0]
        got = candidate.run(None, {"x": x})[0]
        assert np.abs(got - want).max() <= 2e-3 * np.abs(want).max()
    assert _op_count(optimized, "Cast") == 0


def test_constant_node_weights_and_bfloat16_opset_upgrade():
    proto = tiny_mlp(opset=11, constant_weights=True)
    model = ir.from_proto(proto)
    assert normalize(model)  # the Constant nodes became initializers
    result = Fp16Quantize(Fp16Config(dtype="bfloat16")).call(model)
    check_model(result.model)
    assert result.stats["tensors_converted"] == 3 and result.stats["notes"] == ["opset upgraded 11 -> 13 for Cast from bfloat16"]
    out = _session(to_bytes(result.model)).run(None, {"input": X})[0]
    np.testing.assert_allclose(out, _mlp_reference(tiny_mlp(), ml_dtypes.bfloat16), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_digits_models_half_the_size_same_accuracy(zoo_models, digits, name):
    _, _, x_test, y_test = digits
    path = zoo_models(name)
    model = load_model(path)
    normalize(model)
    result = Fp16Quantize(Fp16Config()).call(model)
    check_model(result.model)
    data = to_bytes(result.model)
    assert path.stat().st_size / len(data) > 1.9
    x = zoo.model_input(name, x_test)
    before = _session(path.read_bytes()).run(None, {"input": x})[0]
    after = _session(data).run(None, {"input": x})[0]
    assert np.mean(before.argmax(1) == after.argmax(1)) == 1.0  # every prediction unchanged
    assert np.mean(after.argmax(1) == y_test) == np.mean(before.argmax(1) == y_test)
    assert np.abs(after - before).max() <= 1e-3 * np.abs(before).max()
    assert result.stats["max_relative_error"] < 5e-4


def test_deterministic_registered_and_config_errors():
    assert PASSES["quantize"]["fp16"] is Fp16Quantize
    assert _run(tiny_mlp())[1] == _run(tiny_mlp())[1]
    with pytest.raises(ValidationError, match="dtype"):
        Fp16Config(dtype="float8")
    with pytest.raises(ValidationError, match="extra"):
        Fp16Config(dtyp="float16")
