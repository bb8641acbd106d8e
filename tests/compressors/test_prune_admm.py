"""The ADMM pruning pass on the tiny MLP and the digits MLP, against SparseGPT on the same data."""

import numpy as np
import pytest
from modelpress.compressors.model import check_model, load_model, to_bytes
from modelpress.compressors.pipeline import PassContext
from modelpress.compressors.prune.admm import ADMMConfig, ADMMPrune
from modelpress.compressors.prune.sparsegpt import SparseGPTConfig, SparseGPTPrune
from modelpress.compressors.registry import PASSES
from test_prune_sparsegpt import correlated, load, run, tiny_mlp, weights


def prune(cls, config_cls, model, calibration, **config):
    result = cls(config_cls(**{"min_elements": 100, **config}), PassContext(calibration=calibration)).call(model)
    check_model(result.model)
    return result


@pytest.fixture
def calib():
    return [{"input": correlated(512, 64)}, {"input": correlated(512, 64, seed=1)}]


@pytest.mark.parametrize("sparsity, pattern", [(0.7, "unstructured"), (0.5, "2:4")])
def test_held_out_error_against_sparsegpt_at_the_same_sparsity(tmp_path, calib, sparsity, pattern):
    """70 % unstructured: 18 % less held-out error than SparseGPT on the same data (measured: 3.05 vs
    3.72). 2:4 leaves ADMM little choice of mask on this 64-input MLP: on par (2.15 vs 2.12)."""
    held_out = {"input": correlated(256, 64, seed=7)}
    reference = run(load(tmp_path, tiny_mlp()), held_out)
    config = {"pattern": pattern} if pattern != "unstructured" else {"sparsity": sparsity}
    ours = prune(ADMMPrune, ADMMConfig, load(tmp_path, tiny_mlp()), calib, **config)
    theirs = prune(SparseGPTPrune, SparseGPTConfig, load(tmp_path, tiny_mlp()), calib, **config)
    pruned = weights(ours.model)
    for name in ("w1", "w2"):
        assert np.count_nonzero(pruned[name] == 0) == round(sparsity * pruned[name].size)
        if pattern == "2:4":
            assert (pruned[name] != 0).reshape(-1, 4, pruned[name].shape[1]).sum(axis=1).max() <= 2
    errors = [np.mean((run(r.model, held_out) - reference) ** 2) for r in (ours, theirs)]
    assert errors[0] < (0.9 if pattern == "unstructured" else 1.05) * errors[1], errors
    assert ours.stats["mean_output_error"] < theirs.stats["mean_output_error"]
    assert ours.stats["sparsity"] == sparsity and ours.stats["rounds"] == 2


def test_deterministic_bytes_config_checks_and_registry(tmp_path, calib):
    first = prune(ADMMPrune, ADMMConfig, load(tmp_path, tiny_mlp()), calib)
    second = prune(ADMMPrune, ADMMConfig, load(tmp_path, tiny_mlp()), calib)
    assert to_bytes(first.model) == to_bytes(second.model)
    assert PASSES["prune"]["admm"] is ADMMPrune
    with pytest.raises(ValueError, match="ramp"):
        ADMMConfig(iterations=50)  # the default ramp of 100 does not fit
    with pytest.raises(ValueError, match="sequential"):
        ADMMConfig(rounds=2, correct_upstream=True)


def test_digits_mlp_at_80_percent(zoo_models, digits):
    x_train, _, x_test, y_test = digits
    path = zoo_models("mlp")

    def accuracy(model):
        return float(np.mean(run(model, {"input": x_test}).argmax(axis=1) == y_test))

    calibration = [{"input": x_train[:256]}]
    ours = prune(ADMMPrune, ADMMConfig, load_model(path), calibration, sparsity=0.8)
    assert accuracy(ours.model) >= accuracy(load_model(path)) - 0.02


def test_layers_past_the_work_bound_fall_back_to_sparsegpt(tmp_path, calib, monkeypatch):
    """A layer whose ADMM would cost more than ADMM_FLOPS is pruned by SparseGPT's one pass, and says so."""
    from modelpress.compressors.prune import admm

    monkeypatch.setattr(admm, "ADMM_FLOPS", 1e8)  # w1 [64, 128]: 150·2·64²·128 = 1.6e8 over; w2 [128, 10]: 4.9e7
    result = prune(ADMMPrune, ADMMConfig, load(tmp_path, tiny_mlp()), calib)
    sparsegpt = prune(SparseGPTPrune, SparseGPTConfig, load(tmp_path, tiny_mlp()), calib)
    assert result.stats["admm_skipped"] == {"w1": 1}
    assert np.array_equal(weights(result.model)["w1"], weights(sparsegpt.model)["w1"])


def test_digits_cnn_convolutions_are_solved_through_their_patches(zoo_models, digits):
    """The digits CNN's Conv kernels are layer-wise problems over their im2col patches (not magnitude
    fallbacks): at 70 % the accuracy stays within 2 pp, where magnitude pruning alone loses more."""
    from conftest import zoo
    from modelpress.compressors.prune.magnitude import MagnitudeConfig, MagnitudePrune

    x_train, _, x_test, y_test = digits
    path = zoo_models("cnn")
    test_feed = {"input": zoo.model_input("cnn", x_test)}

    def accuracy(model):
        return float(np.mean(run(model, test_feed).argmax(axis=1) == y_test))

    calibration = [{"input": zoo.model_input("cnn", x_train[:256])}]
    ours = prune(ADMMPrune, ADMMConfig, load_model(path), calibration, sparsity=0.7)
    convs = [n for n in ours.stats["output_error"] if n.startswith("features")]
    assert len(convs) == 2 and not ours.stats["fallback"]
    assert all(abs(ours.stats["per_tensor"][n] - 0.7) < 0.01 for n in convs)  # 9 inputs a row: 0.7014
    magnitude = MagnitudePrune(MagnitudeConfig(sparsity=0.7, min_elements=100), PassContext()).call(load_model(path))
    base, solved, plain = accuracy(load_model(path)), accuracy(ours.model), accuracy(magnitude.model)
    assert solved >= base - 0.02 and solved > plain, (base, solved, plain)
