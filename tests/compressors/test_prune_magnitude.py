"""Magnitude pruning: exact sparsity, the right tensors, global vs layer scope."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import tiny_mlp

from modelpress.compressors.model import check_model, iter_weights, load_model, normalize, to_bytes
from modelpress.compressors.prune.magnitude import MagnitudeConfig, MagnitudePrune


def _pruned(tmp_path, **config):
    onnx.save(tiny_mlp(), tmp_path / "m.onnx")
    model = load_model(tmp_path / "m.onnx")
    normalize(model)
    result = MagnitudePrune(MagnitudeConfig(**config)).call(model)
    check_model(result.model)
    return result, {v.name: v.const_value.numpy() for _, v in iter_weights(result.model)}


def test_layer_scope_exact_sparsity_and_smallest_removed(tmp_path):
    original = {t.name: onnx.numpy_helper.to_array(t) for t in tiny_mlp().graph.initializer}
    result, weights = _pruned(tmp_path, sparsity=0.75, min_elements=100)
    for name in ("w1", "w2"):
        w, o = weights[name], original[name]
        assert np.mean(w == 0) == pytest.approx(0.75, abs=1 / w.size)
        kept = w != 0
        assert np.array_equal(w[kept], o[kept])  # survivors unchanged
        assert np.abs(o[~kept]).max() <= np.abs(o[kept]).min()  # the smallest went
    assert np.array_equal(weights["b1"], original["b1"])  # bias left alone
    assert result.stats["tensors_pruned"] == 2
    assert result.stats["sparsity"] == pytest.approx(0.75, abs=1e-3)


def test_min_elements_and_excludes_are_reported(tmp_path):
    result, weights = _pruned(tmp_path, sparsity=0.5, min_elements=2000, exclude=("w1",))
    assert np.count_nonzero(weights["w1"]) == weights["w1"].size
    reasons = {s["tensor"]: s["reason"] for s in result.stats["skipped"]}
    assert "include/exclude" in reasons["w1"] and "min_elements" in reasons["w2"]
    assert not result.modified


def test_global_scope_uses_one_threshold(tmp_path):
    original = {t.name: onnx.numpy_helper.to_array(t) for t in tiny_mlp().graph.initializer}
    result, weights = _pruned(tmp_path, sparsity=0.5, scope="global", min_elements=100)
    everything = np.concatenate([np.abs(original[n]).ravel() for n in ("w1", "w2")])
    threshold = np.sort(everything)[everything.size // 2 - 1]
    for name in ("w1", "w2"):
        assert np.array_equal(weights[name] == 0, np.abs(original[name]) <= threshold)
    assert result.stats["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_pruned_model_runs_and_is_deterministic(tmp_path):
    first, _ = _pruned(tmp_path, sparsity=0.5, min_elements=100)
    second, _ = _pruned(tmp_path, sparsity=0.5, min_elements=100)
    assert to_bytes(first.model) == to_bytes(second.model)
    session = ort.InferenceSession(to_bytes(first.model), providers=["CPUExecutionProvider"])
    assert session.run(None, {"input": np.ones((2, 64), np.float32)})[0].shape == (2, 10)


def test_recurrent_weights_are_pruned_only_when_asked(tmp_path):
    from test_quantize_int8 import _recurrent

    path = _recurrent(tmp_path)
    feed = {"x": np.random.default_rng(8).normal(size=(6, 4, 8)).astype(np.float32)}
    for op_types, pruned in ((None, set()), (("LSTM", "GRU"), {"lw", "lr", "gw", "gr"})):
        model = load_model(path)
        normalize(model)
        config = MagnitudeConfig(sparsity=0.5, min_elements=100, **({"op_types": op_types} if op_types else {}))
        result = MagnitudePrune(config).call(model)
        check_model(result.model)
        weights = {v.name: v.const_value.numpy() for _, v in iter_weights(result.model)}
        assert {n for n, w in weights.items() if np.mean(w == 0) == pytest.approx(0.5, abs=0.01)} == pruned
        assert np.all(weights["lb"] != 0)  # gate biases B are never pruned
    outputs = ort.InferenceSession(to_bytes(result.model)).run(None, feed)
    assert all(np.isfinite(o).all() for o in outputs)
