"""Calibrated pruning with ``allocation: sensitivity``: the mean sparsity is exact, sensitive layers
keep more weights, and accuracy beats uniform sparsity where uniform breaks the model."""

import numpy as np
import onnxruntime as ort
import pytest
from examples import zoo
from modelpress.compressors.model import check_model, load_model, to_bytes
from modelpress.compressors.pipeline import PassContext
from modelpress.compressors.prune.sparsegpt import SparseGPTConfig, SparseGPTPrune
from modelpress.compressors.prune.wanda import WandaConfig, WandaPrune
from pydantic import ValidationError


def _accuracy(model, x, y) -> float:
    session = ort.InferenceSession(to_bytes(model), providers=["CPUExecutionProvider"])
    return float(np.mean(session.run(None, {session.get_inputs()[0].name: x})[0].argmax(axis=1) == y))


@pytest.mark.parametrize("pass_cls, config_cls, sparsity, margin", [
    (SparseGPTPrune, SparseGPTConfig, 0.9, 0.015),  # measured: 0.936 uniform, 0.967 sensitivity
    (WandaPrune, WandaConfig, 0.8, 0.2),  # measured: 0.451 uniform, 0.918 sensitivity
])
def test_sensitivity_beats_uniform_on_the_digits_transformer(zoo_models, digits, pass_cls, config_cls, sparsity, margin):
    x_train, _, x_test, y_test = digits
    path = zoo_models("transformer")
    context = PassContext(calibration=[{"input": zoo.model_input("transformer", x_train[:512])}])
    x_eval = zoo.model_input("transformer", x_test)
    results = {}
    for allocation in ("uniform", "sensitivity"):
        config = config_cls(sparsity=sparsity, min_elements=100, allocation=allocation, max_layer_sparsity=0.95)
        results[allocation] = pass_cls(config, context).call(load_model(path))
        check_model(results[allocation].model)
    stats = results["sensitivity"].stats
    assert stats["sparsity"] == pytest.approx(sparsity, abs=2e-3)  # the mean is the target
    targets = stats["allocation"]
    assert max(targets.values()) <= 0.95 and min(targets.values()) < sparsity - 0.2
    # The most sensitive layer (largest change at the mean level) keeps the most weights.
    at_mean = {name: curve[f"{sparsity:g}"] for name, curve in stats["sensitivity"].items() if f"{sparsity:g}" in curve}
    assert targets[max(at_mean, key=at_mean.get)] <= sparsity
    uniform = _accuracy(results["uniform"].model, x_eval, y_test)
    assert _accuracy(results["sensitivity"].model, x_eval, y_test) >= uniform + margin


def test_sensitivity_needs_unstructured_and_a_reachable_cap():
    with pytest.raises(ValidationError, match="allocation: uniform"):
        SparseGPTConfig(pattern="2:4", allocation="sensitivity")
    with pytest.raises(ValidationError, match="max_layer_sparsity"):
        WandaConfig(sparsity=0.9, allocation="sensitivity", max_layer_sparsity=0.8)


def test_curve_runs_are_bounded_by_thinning_the_feeds(zoo_models, digits, monkeypatch):
    """Many weights x levels x feeds of batch 1 (DenseNet: 34,560 runs) are thinned evenly to the bound."""
    from modelpress.compressors.prune import allocation

    x_train = digits[0]
    model = load_model(zoo_models("mlp"))
    values = [v for v in model.graph.initializers.values() if v.const_value.numpy().ndim == 2]
    feeds = [{"input": zoo.model_input("mlp", x_train[i : i + 1])} for i in range(9)]
    levels = [0.0, 0.5, 0.9]

    def prune(value, weights, level):
        return np.where(np.abs(weights) >= np.quantile(np.abs(weights), level), weights, 0).astype(weights.dtype)

    monkeypatch.setattr(allocation, "MAX_CURVE_RUNS", len(values) * 2 * 3)  # 2 nonzero levels, room for 3 feeds
    thinned = allocation.measure_curves(model, values, levels, feeds, prune, 1)
    chosen = [feeds[0], feeds[4], feeds[8]]  # evenly over the 9
    monkeypatch.setattr(allocation, "MAX_CURVE_RUNS", 10**6)
    assert thinned == allocation.measure_curves(model, values, levels, chosen, prune, 1)
    assert thinned != allocation.measure_curves(model, values, levels, feeds, prune, 1)
    assert all(curve[0] == 0.0 and curve[2] > curve[1] > 0 for curve in thinned.values())
