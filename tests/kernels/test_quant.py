"""int8 quantization math: scales, zero points, rounding (checked against ONNX's reference
QuantizeLinear/DequantizeLinear) and calibration ranges."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from modelpress.kernels import quant


def test_symmetric_per_channel_weights_round_trip_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, (16, 3, 3, 3)).astype(np.float32) * np.linspace(0.01, 10, 16)[:, None, None, None]
    q, params = quant.quantize_weights(w, axis=0, symmetric=True)
    assert q.dtype == np.int8 and params.scale.shape == (16,) and params.axis == 0
    assert not params.zero_point.any()
    assert q.min() >= -127 and q.max() <= 127
    # Each channel's extreme maps to +-127 exactly: the full grid is used per channel.
    assert np.all(np.abs(q).reshape(16, -1).max(axis=1) == 127)
    error = np.abs(quant.dequantize(q, params) - w)
    assert np.all(error <= params.scale[:, None, None, None] / 2 + 1e-7)


def test_symmetric_quantization_is_odd():
    w = np.array([[-0.5, 0.25, 0.5], [1.0, -1.0, 0.3]], np.float32)
    q, params = quant.quantize_weights(w, axis=0)
    q_neg, _ = quant.quantize_weights(-w, axis=0)
    np.testing.assert_array_equal(q_neg, -q)


def test_asymmetric_per_tensor_covers_range_and_keeps_zero_exact():
    w = np.array([[0.1, 0.9, 2.0], [0.5, 1.5, 0.0]], np.float32)  # all >= 0: asymmetric pays off
    q, params = quant.quantize_weights(w, axis=None, symmetric=False)
    assert params.scale.shape == () and params.axis is None
    assert params.scale == pytest.approx(2.0 / 255, rel=1e-6)
    assert q.min() == -128 and q.max() == 127
    assert quant.dequantize(q, params)[1, 2] == 0.0  # 0.0 is representable exactly
    assert np.abs(quant.dequantize(q, params) - w).max() <= params.scale / 2 + 1e-7


def test_all_zero_channel_gets_a_valid_scale():
    w = np.zeros((4, 8), np.float32)
    w[1] = 1.0
    q, params = quant.quantize_weights(w, axis=0)
    assert np.all(params.scale > 0)
    assert params.scale[0] == 1.0
    np.testing.assert_array_equal(quant.dequantize(q, params), w)


def test_negative_axis_is_normalized():
    w = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)
    assert quant.weight_qparams(w, axis=-1).axis == 1
    np.testing.assert_array_equal(quant.weight_qparams(w, axis=-1).scale, quant.weight_qparams(w, axis=1).scale)


@pytest.mark.parametrize(
    ("low", "high", "zero_point"),
    [(0.0, 6.0, 0), (-1.0, 3.0, 64), (-1.0, 0.0, 255), (0.5, 3.0, 0)],  # range always includes 0
)
def test_activation_qparams(low, high, zero_point):
    params = quant.activation_qparams(low, high)
    assert params.zero_point.dtype == np.uint8 and int(params.zero_point) == zero_point
    assert params.scale == pytest.approx((max(high, 0) - min(low, 0)) / 255)
    assert quant.dequantize(quant.quantize(np.float32(0.0), params), params) == 0.0


def test_activation_qparams_degenerate_and_symmetric():
    assert float(quant.activation_qparams(0.0, 0.0).scale) == 1.0
    params = quant.activation_qparams(-1.0, 3.0, symmetric=True)
    assert int(params.zero_point) == 128 and params.scale == pytest.approx(6.0 / 255)


def _onnx_quantize(x, scale, zero_point, axis):
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], axis=axis),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], axis=axis),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("q", helper.np_dtype_to_tensor_dtype(zero_point.dtype), x.shape),
         helper.make_tensor_value_info("d", TensorProto.FLOAT, x.shape)],
        [numpy_helper.from_array(scale, "s"), numpy_helper.from_array(zero_point, "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    return ReferenceEvaluator(model).run(None, {"x": x})


def test_matches_onnx_quantize_linear_including_half_to_even_rounding():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(6, 10)).astype(np.float32)
    params = quant.weight_qparams(w, axis=0, symmetric=False)
    # Values exactly halfway between two steps: ONNX rounds them to even.
    w[0, :4] = (np.array([0.5, 1.5, 2.5, -0.5], np.float32)) * params.scale[0]
    q_ref, d_ref = _onnx_quantize(w, params.scale, params.zero_point, axis=0)
    np.testing.assert_array_equal(quant.quantize(w, params), q_ref)
    np.testing.assert_array_equal(quant.dequantize(q_ref, params), d_ref)

    x = rng.normal(size=(3, 7)).astype(np.float32)
    act = quant.activation_qparams(float(x.min()), float(x.max()))
    q_ref, d_ref = _onnx_quantize(x, act.scale, act.zero_point, axis=1)
    np.testing.assert_array_equal(quant.quantize(x, act), q_ref)
    np.testing.assert_allclose(quant.dequantize(q_ref, act), d_ref, rtol=0, atol=0)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=8),
               elements=st.floats(-1e3, 1e3, width=32)),
    st.booleans(),
    st.sampled_from([None, 0, -1]),
)
def test_round_trip_error_is_at_most_half_a_step(w, symmetric, axis):
    q, params = quant.quantize_weights(w, axis=axis, symmetric=symmetric)
    shape = quant.broadcast_shape(params.scale, params.axis, w.ndim)
    step = params.scale.reshape(shape)
    error = np.abs(quant.dequantize(q, params) - w)
    assert np.all(error <= step / 2 + np.abs(w) * 1e-6 + 1e-30)


def test_minmax_observer_ignores_non_finite_values():
    observer = quant.MinMaxObserver()
    assert not observer.seen and observer.range() == (0.0, 0.0)
    observer.update(np.array([1.0, np.nan, -3.0, np.inf], np.float32))
    observer.update(np.array([2.0], np.float32))
    assert observer.range() == (-3.0, 2.0)


def test_percentile_range_clips_both_tails():
    values = np.arange(1000, dtype=np.float32)  # uniform 0..999
    observer = quant.HistogramObserver(0.0, 999.0, bins=1000)
    observer.update(values)
    low, high = observer.percentile_range(99.0)  # 1 % cut from each tail
    assert low == pytest.approx(10.0, abs=1.5) and high == pytest.approx(990.0, abs=1.5)
    assert observer.percentile_range(100.0) == pytest.approx((0.0, 999.0))


def test_percentile_range_ignores_a_rare_outlier():
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0, 1, 100_000), [1000.0]]).astype(np.float32)
    observer = quant.HistogramObserver(float(x.min()), float(x.max()))
    observer.update(x)
    low, high = observer.percentile_range(99.99)
    assert high < 10 and low > -10  # the outlier no longer sets the scale


def test_histogram_is_independent_of_batch_order():
    rng = np.random.default_rng(4)
    batches = [rng.normal(size=500).astype(np.float32) for _ in range(4)]
    forward, backward = quant.HistogramObserver(-5, 5), quant.HistogramObserver(-5, 5)
    for b in batches:
        forward.update(b)
    for b in reversed(batches):
        backward.update(b)
    np.testing.assert_array_equal(forward.counts, backward.counts)
    assert forward.percentile_range(99.9) == backward.percentile_range(99.9)


def test_percentile_rejects_out_of_range():
    with pytest.raises(ValueError):
        quant.percentile_range(np.ones(4, np.int64), np.linspace(0, 1, 5), 0.0)


def test_agreement_and_cosine():
    a = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]], np.float32)
    b = np.array([[0.2, 0.8], [0.1, 0.9], [0.4, 0.6]], np.float32)
    assert quant.agreement(a, b) == pytest.approx(2 / 3)
    assert quant.agreement(a[:, :1], b[:, :1]) is None  # one class: nothing to agree on
    assert quant.cosine(a, a) == pytest.approx(1.0)
    assert quant.cosine(np.zeros(3), np.zeros(3)) == 1.0
    assert quant.cosine(np.ones(3), -np.ones(3)) == pytest.approx(-1.0)


def test_deterministic():
    w = np.random.default_rng(5).normal(size=(64, 32)).astype(np.float32)
    first = quant.quantize_weights(w, axis=1)
    second = quant.quantize_weights(w.copy(), axis=1)
    assert first[0].tobytes() == second[0].tobytes()
    assert first[1].scale.tobytes() == second[1].scale.tobytes()


def test_module_needs_no_onnx():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(quant))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"numpy", "dataclasses", "__future__"}
    assert onnx  # the test itself may use onnx as a reference


def _fake_quant_error(x: np.ndarray, low: float, high: float) -> float:
    params = quant.activation_qparams(low, high)
    restored = (quant.quantize(x, params).astype(np.float32) - params.zero_point.astype(np.float32)) * params.scale
    return float(np.mean((x - restored) ** 2))


def test_mse_range_keeps_a_uniform_range_and_clips_a_heavy_tail():
    rng = np.random.default_rng(5)
    uniform = rng.uniform(-3, 3, 100_000).astype(np.float32)
    observer = quant.HistogramObserver(float(uniform.min()), float(uniform.max()))
    observer.update(uniform)
    low, high = observer.range("mse")
    assert low == pytest.approx(uniform.min(), abs=0.05) and high == pytest.approx(uniform.max(), abs=0.05)
    # A Laplace body with a long tail: clipping the tail buys finer steps for the body.
    tailed = rng.laplace(0, 1, 200_000).astype(np.float32)
    observer = quant.HistogramObserver(float(tailed.min()), float(tailed.max()))
    observer.update(tailed)
    low, high = observer.range("mse")
    assert high < 0.9 * tailed.max()
    assert _fake_quant_error(tailed, low, high) < 0.8 * _fake_quant_error(tailed, tailed.min(), tailed.max())


def test_entropy_range_clips_relu_outliers_but_keeps_the_body():
    rng = np.random.default_rng(6)
    relu = np.maximum(rng.normal(0, 2, 200_000), 0).astype(np.float32)
    relu[:20] = 40.0  # a few outliers would set the minmax scale
    observer = quant.HistogramObserver(float(relu.min()), float(relu.max()))
    observer.update(relu)
    low, high = observer.range("entropy")
    assert low == 0.0
    assert np.quantile(relu, 0.999) < high < 20.0
    body = relu[relu <= np.quantile(relu, 0.999)]  # what KL protects: the bulk, at the outliers' expense
    assert _fake_quant_error(body, low, high) < 0.5 * _fake_quant_error(body, 0.0, 40.0)
