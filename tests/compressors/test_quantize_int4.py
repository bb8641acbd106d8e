"""int4 pass on tiny onnx.helper graphs: MatMul (K not a multiple of the block), Gemm (transB,
alpha, beta, bias), Gather tables, an If subgraph. Asserted: outputs within a stated tolerance of
fp32, weight bytes >= 6x smaller, onnx checker + ORT load, the ops ORT is given, determinism."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from modelpress.compressors.errors import InputError
from modelpress.compressors.model import check_model, to_bytes
from modelpress.compressors.pipeline import PassContext
from modelpress.compressors.quantize import int4
from modelpress.compressors.quantize.int4 import Int4Config, Int4Quantize, _MaskedGram
from modelpress.compressors.registry import PASSES

K, N, VOCAB, TOKENS = 80, 96, 400, 6  # K = 80: MatMulNBits pads it to 96 (3 blocks of 32)


def transformer_like(opset: int = 17) -> onnx.ModelProto:
    """ids[B, T] -> Gather(table) -> MatMul(W1 [K, N]) -> Relu -> Gemm(W2 [K, N]^T, transB, alpha,
    beta, bias) -> y[B*T, K]; the table is correlated with W1's inputs so GPTQ has work to do."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(K, K)) * 0.3 + np.eye(K)
    table = (rng.normal(size=(VOCAB, K)) @ mix).astype(np.float32)
    w1 = rng.normal(0, 0.1, (K, N)).astype(np.float32)
    w2 = rng.normal(0, 0.1, (K, N)).astype(np.float32)
    bias = rng.normal(size=(1, K)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"]),
        helper.make_node("MatMul", ["e", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Reshape", ["r", "rows"], ["r2"]),
        helper.make_node("Gemm", ["r2", "w2", "bias"], ["y"], transB=1, alpha=0.5, beta=2.0),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in
             ((table, "table"), (w1, "w1"), (w2, "w2"), (bias, "bias"), (np.array([-1, N], np.int64), "rows"))]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", TOKENS])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["R", K])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def proto():
    return transformer_like()


@pytest.fixture(scope="module")
def feeds():
    rng = np.random.default_rng(1)
    return [{"ids": rng.integers(0, VOCAB, (4, TOKENS))} for _ in range(8)]


def quantize(proto, feeds=None, **config):
    model = ir.from_proto(proto)
    result = Int4Quantize(Int4Config(min_elements=256, **config), PassContext(calibration=feeds, threads=1)).call(model)
    check_model(result.model)  # onnx checker + an ORT CPU session
    return result


def run(model, feed):
    source = model if isinstance(model, bytes) else (model.SerializeToString() if isinstance(model, onnx.ModelProto) else to_bytes(model))
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def relative_error(proto, model, feed) -> float:
    ref, out = run(proto, feed), run(model, feed)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def ops(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_registered_and_config_checked():
    assert PASSES["quantize"]["int4"] is Int4Quantize
    for bad in ({"block_size": 24}, {"block_size": 8}, {"embedding_block_size": 48}, {"bits": 3}, {"method": "awq"}):
        with pytest.raises(ValidationError):
            Int4Config(**bad)


def test_folded_form_on_large_batches(proto, feeds):
    """6 rows of small weights per run: MatMulNBits would be slower than fp32, so all is folded."""
    result = quantize(proto, feeds, embeddings="int4")
    stats = result.stats
    assert stats["forms"] == {"folded": 3} and stats["opset"] == 21
    assert "opset upgraded 17 -> 21" in stats["notes"][0]
    assert relative_error(proto, result.model, feeds[0]) < 0.05
    per_tensor = stats["per_tensor"]
    assert {per_tensor[n]["method"] for n in ("w1", "w2")} == {"gptq"} and per_tensor["table"]["method"] == "rtn"
    weights = sum(t["bytes_before"] for t in per_tensor.values()) / sum(t["bytes_after"] for t in per_tensor.values())
    assert weights >= 6.0
    for name in ("w1", "w2"):  # GPTQ beats round-to-nearest on its own objective
        assert per_tensor[name]["output_error"] < per_tensor[name]["rtn_output_error"]
    assert not any(node.op_type == "MatMulNBits" for node in result.model.graph)


@pytest.mark.parametrize("symmetric", [True, False])
def test_matmulnbits_form(proto, feeds, symmetric):
    result = quantize(proto, feeds, format="matmulnbits", symmetric=symmetric, accuracy_level=0)
    assert ops(result.model).get("MatMulNBits") == 2 and "Gemm" not in ops(result.model)
    assert result.stats["opset"] == 17  # int8 tables and MatMulNBits need no opset upgrade
    assert "bias" not in result.model.graph.initializers  # Gemm's C moved into MatMulNBits' bias
    # accuracy level 0: the kernel computes with the dequantized weights exactly, so the folded
    # model of the same integers gives the same outputs.
    folded = quantize(proto, feeds, format="folded", symmetric=symmetric)
    np.testing.assert_allclose(run(to_bytes(result.model), feeds[0]), run(to_bytes(folded.model), feeds[0]),
                               rtol=1e-4, atol=1e-4)
    assert relative_error(proto, result.model, feeds[0]) < 0.05


def test_auto_places_matmulnbits_on_matrix_vector_runs(monkeypatch, proto, feeds):
    monkeypatch.setattr(int4, "NBITS_WIDE_WEIGHTS", 1)  # the tiny weights count as large here
    result = quantize(proto, feeds)  # one sample (as latency is judged): 6 rows per MatMul
    assert result.stats["forms"] == {"matmulnbits": 2, "folded": 1}


def test_without_opset_21_contrib_ops_carry_int4(monkeypatch, proto, feeds):
    def refuse(model, minimum):
        raise InputError("the converter refused")

    monkeypatch.setattr(int4, "ensure_opset", refuse)
    result = quantize(proto, feeds, embeddings="int4")
    assert result.stats["forms"] == {"matmulnbits": 2, "gather": 1} and result.stats["opset"] == 17
    assert "converter refused" in result.stats["notes"][0]
    assert ops(result.model).get("GatherBlockQuantized") == 1
    assert relative_error(proto, result.model, feeds[0]) < 0.05


def test_deterministic_and_bits_8(proto, feeds):
    first, second = quantize(proto, feeds), quantize(proto, feeds)
    assert to_bytes(first.model) == to_bytes(second.model)
    eight = quantize(proto, feeds, bits=8, embeddings="int8")
    assert relative_error(proto, eight.model, feeds[0]) < 0.005


def test_gptq_needs_data_rtn_does_not(proto, feeds):
    with pytest.raises(ValueError, match="--data"):
        Int4Quantize(Int4Config(), PassContext(calibration=None)).call(ir.from_proto(proto))
    result = quantize(proto, None, method="rtn", embeddings="keep")
    assert {t["method"] for t in result.stats["per_tensor"].values()} == {"rtn"}
    assert {"tensor": "table", "reason": "Gather table, and embeddings: keep"} in result.stats["skipped"]
    assert relative_error(proto, result.model, feeds[0]) < 0.08


def test_subgraph_weights_fall_back_to_rtn_and_skips_are_explained(feeds):
    rng = np.random.default_rng(2)
    w_then = numpy_helper.from_array(rng.normal(size=(K, N)).astype(np.float32), "w_then")
    tied = numpy_helper.from_array(rng.normal(size=(VOCAB, K)).astype(np.float32), "tied")
    then = helper.make_graph([helper.make_node("MatMul", ["e", "w_then"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)], initializer=[w_then])
    other = helper.make_graph([helper.make_node("Identity", ["e"], ["o"])], "else", [],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Gather", ["tied", "ids"], ["e"]),
             helper.make_node("Reshape", ["e", "rows"], ["e2"]),
             helper.make_node("Gemm", ["e2", "tied"], ["logits"], transB=1),  # an LM head tied to the table
             helper.make_node("MatMul", ["e", "w_small"], ["small"]),
             helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", TOKENS]),
                     helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "logits", "small")],
        initializer=[tied, numpy_helper.from_array(rng.normal(size=(K, 2)).astype(np.float32), "w_small"),
                     numpy_helper.from_array(np.array([-1, K], np.int64), "rows")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with_flag = [dict(f, flag=np.array(True)) for f in feeds]
    result = quantize(proto, with_flag)
    stats = result.stats
    assert stats["per_tensor"]["w_then"]["method"] == "rtn"
    assert "subgraph" in stats["fallback"][0]["reason"]
    reasons = {s["tensor"]: s["reason"] for s in stats["skipped"]}
    assert "tied" in reasons["tied"] and "min_elements" in reasons["w_small"]
    ref = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], with_flag[0])[0]
    out = ort.InferenceSession(to_bytes(result.model), providers=["CPUExecutionProvider"]).run(["y"], with_flag[0])[0]
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.1  # int4 RTN of Gaussian weights: ~8 %


def test_padding_rows_left_out_of_the_hessian():
    gram = _MaskedGram(False, masks=[np.array([[1, 1, 0]]), None])
    x = np.arange(18, dtype=np.float32).reshape(1, 3, 6)
    gram.update(x)  # the third position is padding
    gram.update(x[:, :1])  # no mask: every row counts
    rows = np.concatenate([x[0, :2], x[0, :1]])
    assert gram.rows == 3
    np.testing.assert_allclose(gram.hessian, rows.T @ rows / 3)
