"""int8 bias correction: the rounded weights' mean output shift on the calibration data moves into
the bias, exactly (weight-only MatMul+Add, grouped Conv) and measurably (digits CNN, per-tensor)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import zoo
from conftest import tiny_mlp
from modelpress.compressors.model import check_model, load_model, normalize, to_bytes
from modelpress.compressors.pipeline import PassContext
from modelpress.compressors.quantize.bias_correction import ChannelMean, correction
from modelpress.compressors.quantize.int8 import Int8Config, Int8Quantize
from modelpress.kernels import quant


def _quantize(path, feeds, **config):
    model = load_model(path)
    normalize(model)
    result = Int8Quantize(Int8Config(**config), PassContext(calibration=feeds, seed=0, threads=1)).call(model)
    check_model(result.model)
    return result


def _initializer(model, name: str) -> np.ndarray:
    return next(v.const_value.numpy() for v in model.graph.initializers.values() if v.name == name)


def _run(model, feed):
    session = ort.InferenceSession(to_bytes(model), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def test_matmul_add_bias_absorbs_the_mean_shift(tmp_path):
    """Per-tensor weight-only: b1 becomes b1 - E[x] (deq(W1) - W1), so the first layer's output
    error has zero mean over the calibration samples; the bias-free second MatMul is left alone."""
    proto = tiny_mlp()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    w1, b1 = (numpy_helper.to_array(t) for t in proto.graph.initializer[:2])
    x = np.random.default_rng(4).random((256, 64), dtype=np.float32)  # mean 0.5: the shift adds up
    result = _quantize(path, [{"input": x}], mode="weight_only", per_channel=False)
    assert result.stats["bias_corrected"] == 1
    q, params = quant.quantize_weights(w1, None, True)
    delta = quant.dequantize(q, params) - w1
    expected = b1 - (x.astype(np.float64).mean(axis=0) @ delta)
    np.testing.assert_allclose(_initializer(result.model, "b1"), expected, rtol=0, atol=1e-6)
    first_layer_error = x @ (w1 + delta) + _initializer(result.model, "b1") - (x @ w1 + b1)
    assert np.abs(first_layer_error.mean(axis=0)).max() < 1e-5
    uncorrected = _quantize(path, [{"input": x}], mode="weight_only", per_channel=False, bias_correction=False)
    assert uncorrected.stats["bias_corrected"] == 0
    np.testing.assert_array_equal(_initializer(uncorrected.model, "b1"), b1)


def _grouped_conv(groups: int) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    channels, out = 8, 16
    w = rng.normal(0, 0.3, (out, channels // groups, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, (out,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], group=groups, kernel_shape=[3, 3])],
        "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", out, 8, 8])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_grouped_conv_output_error_has_zero_mean(tmp_path, groups):
    """Inputs constant over the image (each sample and channel its own level): every output
    position sees the channel means, so the corrected Conv's output error averages to zero per
    channel over the calibration data, for dense, grouped and depthwise."""
    proto = _grouped_conv(groups)
    path = tmp_path / "conv.onnx"
    onnx.save(proto, path)
    levels = np.random.default_rng(5).random((32, 8, 1, 1), dtype=np.float32) * 2.0 + 0.5
    x = np.ascontiguousarray(np.broadcast_to(levels, (32, 8, 10, 10)))
    reference = _run(load_model(path), {"x": x})[0]
    errors = {}
    for corrected in (True, False):
        result = _quantize(path, [{"x": x}], mode="weight_only", per_channel=False, min_elements=1,
                           bias_correction=corrected)
        errors[corrected] = np.abs((_run(result.model, {"x": x})[0] - reference).mean(axis=(0, 2, 3))).max()
    assert errors[True] < 1e-5 and errors[False] > 1e-3, errors


def test_channel_mean_and_correction_shapes():
    mean = ChannelMean(axis=1)
    mean.update(np.ones((2, 3, 4, 4), np.float32))
    mean.update(np.full((1, 3, 2, 2), 4.0, np.float32))
    np.testing.assert_allclose(mean.value, [(32 * 1.0 + 4 * 4.0) / 36] * 3)  # 32 ones and 4 fours a channel
    mean.update(np.ones((1, 5, 2, 2), np.float32))  # another channel count: not a channel axis
    assert mean.value is None
    matmul = ir.node("MatMul", [ir.Value(name="x"), ir.Value(name="w")])
    assert correction(matmul, np.ones((4, 2)), np.ones(3)) is None  # mean of the wrong length
    np.testing.assert_allclose(correction(matmul, np.ones((4, 2)), np.arange(4.0)), [6.0, 6.0])


def test_digits_cnn_per_tensor_error_falls(tmp_path, zoo_models, digits):
    """On the trained digits CNN (Conv + BatchNorm + Gemm), per-tensor int8 weights: bias
    correction lowers the logits' mean squared error on held-out digits."""
    path = zoo_models("cnn")
    x_train, _, x_test, _ = digits
    calibration = zoo.model_input("cnn", x_train[:256])
    held_out = {"input": zoo.model_input("cnn", x_test[:256])}
    name = onnx.load(path).graph.input[0].name
    held_out = {name: held_out["input"]}
    reference = _run(load_model(path), held_out)[0]
    mse = {}
    for corrected in (True, False):
        result = _quantize(path, [{name: calibration}], mode="weight_only", per_channel=False,
                           bias_correction=corrected)
        if corrected:
            assert result.stats["bias_corrected"] >= 3
        mse[corrected] = float(((_run(result.model, held_out)[0] - reference) ** 2).mean())
    assert mse[True] < 0.9 * mse[False]


def test_padding_positions_are_left_out_of_the_means(tmp_path):
    """Token rows where ``attention_mask`` is 0 (large values here) do not enter E[x]."""
    rng = np.random.default_rng(6)
    w = rng.normal(0, 0.2, (32, 48)).astype(np.float32)
    b = rng.normal(0, 0.1, (48,)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])], "tokens",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 32]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", 48])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = tmp_path / "tokens.onnx"
    onnx.save(proto, path)
    x = rng.random((8, 12, 32), dtype=np.float32)
    mask = (np.arange(12)[None, :] < rng.integers(3, 12, (8, 1))).astype(np.int64)
    x[mask == 0] = 50.0  # padding that would dominate a plain mean
    result = _quantize(path, [{"x": x, "attention_mask": mask}], mode="weight_only", per_channel=False)
    q, params = quant.quantize_weights(w, None, True)
    delta = quant.dequantize(q, params) - w
    expected = b - x[mask == 1].astype(np.float64).mean(axis=0) @ delta
    np.testing.assert_allclose(_initializer(result.model, "b"), expected, rtol=0, atol=1e-6)


def test_per_tensor_stats_join_the_report_table(tmp_path):
    """int8 says what each weight became, so the report's tensor table has its bytes before and after."""
    from modelpress.compressors.summary import tensor_table

    path = tmp_path / "m.onnx"
    onnx.save(tiny_mlp(), path)
    x = np.random.default_rng(7).random((16, 64), dtype=np.float32)
    result = _quantize(path, [{"input": x}], mode="weight_only")
    w1 = result.stats["per_tensor"]["w1"]
    assert w1["bytes_before"] == 64 * 128 * 4 and w1["bytes_after"] == 64 * 128 + 128 * 4  # int8 + channel scales
    stored = {v.name: v.const_value.nbytes for v in result.model.graph.initializers.values()}
    assert sum(stored[name] for name in w1["stored_as"]) == w1["bytes_after"]
    rows = {r["tensor"]: r for r in tensor_table([{"stage": "quantize", "name": "int8", "stats": result.stats}])}
    assert (rows["w1"]["original_bytes"], rows["w1"]["runnable_bytes"]) == (32768, 8704)
