"""Magnitude pruning with ``allocation: sensitivity``: the mean sparsity is exact, the insensitive
tensor takes more of it, and without data it falls back to uniform."""

import numpy as np
import onnx
import pytest
from modelpress.compressors.model import check_model, iter_weights, normalize
from modelpress.compressors.pipeline import PassContext
from modelpress.compressors.prune.allocation import allocate_levels
from modelpress.compressors.prune.magnitude import MagnitudeConfig, MagnitudePrune
from onnx import TensorProto, helper, numpy_helper


def _model() -> onnx.ModelProto:
    """y = x @ w1 + 0.01 * (x @ w2): the output hardly depends on w2, so w2 should take the sparsity."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h1"]), helper.make_node("MatMul", ["x", "w2"], ["h2"]),
         helper.make_node("Mul", ["h2", "k"], ["s"]), helper.make_node("Add", ["h1", "s"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
        initializer=[numpy_helper.from_array(rng.normal(0, 0.2, (64, 64)).astype(np.float32), "w1"),
                     numpy_helper.from_array(rng.normal(0, 0.2, (64, 64)).astype(np.float32), "w2"),
                     numpy_helper.from_array(np.array(0.01, np.float32), "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _prune(calibration, **config):
    import onnx_ir as ir

    model = ir.from_proto(_model())
    normalize(model)
    context = PassContext(calibration=calibration, seed=0)
    result = MagnitudePrune(MagnitudeConfig(min_elements=16, **config), context).call(model)
    check_model(result.model)
    return result, {v.name: v.const_value.numpy() for _, v in iter_weights(result.model)}


def _feeds():
    x = np.random.default_rng(1).random((200, 64)).astype(np.float32)
    return [{"x": x[:100]}, {"x": x[100:]}]


def test_sensitivity_spreads_the_mean_where_it_hurts_least():
    result, weights = _prune(_feeds(), sparsity=0.6, allocation="sensitivity")
    per = result.stats["per_tensor"]
    assert per["w2"] > 0.6 > per["w1"]
    zeros = sum(int(np.count_nonzero(w == 0)) for w in weights.values())
    assert zeros == pytest.approx(0.6 * 2 * 64 * 64, abs=2)  # the mean is exact
    curves = result.stats["sensitivity"]
    assert set(curves) == {"w1", "w2"} and curves["w1"]["0"] == 0.0
    assert curves["w2"]["0.5"] < curves["w1"]["0.5"] / 100  # the measured change says why


def test_without_data_it_falls_back_to_uniform_with_a_note():
    result, _ = _prune(None, sparsity=0.6, allocation="sensitivity")
    assert result.stats["per_tensor"] == {"w1": pytest.approx(0.6, abs=1e-3), "w2": pytest.approx(0.6, abs=1e-3)}
    assert any("needs --data" in note for note in result.stats["notes"])


def test_deterministic():
    first = _prune(_feeds(), sparsity=0.7, allocation="sensitivity")[1]
    second = _prune(_feeds(), sparsity=0.7, allocation="sensitivity")[1]
    assert all(np.array_equal(first[n], second[n]) for n in first)


def test_allocation_follows_the_lower_hull_and_hits_the_target():
    levels = [0.0, 0.5, 0.9]
    # a is cheap up to 0.5 then expensive; b costs the same per weight throughout; c is never cheap.
    curves = {"a": [0.0, 0.01, 1.0], "b": [0.0, 0.1, 0.18], "c": [0.0, 5.0, 9.0]}
    sizes = {"a": 100, "b": 100, "c": 100}
    got = allocate_levels(curves, sizes, levels, wanted=0.5 * 300)
    # a to 0.5 (cheapest), b to 0.9 (next), then the last 10 zeros from a's next step, interpolated.
    assert got == {"a": pytest.approx(0.6), "b": 0.9, "c": 0.0}
