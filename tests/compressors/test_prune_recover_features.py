"""The recover pass's ``feature_ops``: intermediate values found by op type are matched as features
when the original computes them with the same shape, and left out (with a note) when structured
pruning changed their shape."""

import numpy as np
import onnx
import pytest
from conftest import tiny_mlp

from modelpress.compressors.model import check_model, load_model, normalize, to_bytes
from modelpress.compressors.pipeline import PassContext
from modelpress.compressors.prune.magnitude import MagnitudeConfig, MagnitudePrune
from modelpress.compressors.prune.recover import Recover, RecoverConfig
from modelpress.compressors.prune.structured import StructuredConfig, StructuredPrune


def setup(tmp_path, prune):
    onnx.save(tiny_mlp(), tmp_path / "m.onnx")
    model = load_model(tmp_path / "m.onnx")
    normalize(model)
    rng = np.random.default_rng(0)
    context = PassContext(calibration=[{"input": rng.random((32, 64), dtype=np.float32)} for _ in range(3)],
                          original=to_bytes(model), seed=0)
    return prune(context).call(model).model, context


def test_feature_ops_match_the_hidden_layer_and_lower_its_error(tmp_path):
    model, context = setup(tmp_path, lambda c: MagnitudePrune(MagnitudeConfig(sparsity=0.8, min_elements=100), c))
    plain = Recover(RecoverConfig(epochs=4, loss="mse"), context).call(model.clone()).stats
    result = Recover(RecoverConfig(epochs=4, loss="mse", feature_ops=("Relu", "MatMul")), context).call(model)
    check_model(result.model)
    stats = result.stats
    # "h" (first MatMul) and "r" (Relu); the second MatMul's output is the graph output, matched anyway.
    assert plain["features_matched"] == 0 and stats["features_matched"] == 2
    assert "2 intermediate values matched as features" in stats["notes"]
    assert stats["relative_error_after"] < 0.7 * stats["relative_error_before"]


def test_feature_ops_skip_values_whose_shape_pruning_changed(tmp_path):
    model, context = setup(tmp_path, lambda c: StructuredPrune(StructuredConfig(ratio=0.5), c))
    stats = Recover(RecoverConfig(epochs=2, loss="mse", feature_ops=("Relu",)), context).call(model).stats
    assert stats["features_matched"] == 0
    assert any("left out, shapes differ" in n and "r" in n for n in stats["notes"])
    with pytest.raises(ValueError, match="feature 'r' has shape"):
        Recover(RecoverConfig(epochs=1, loss="mse", features=("r",)), context).call(model)



def test_large_teacher_features_are_kept_as_float16_and_still_recover(tmp_path, monkeypatch):
    """Past HALF_FEATURES_BYTES the teacher's features are stored as float16 targets (memory: thousands
    of sentences x every hidden state); training reads them as float32 and still lowers the error."""
    from modelpress.compressors.prune import recover_data

    model, context = setup(tmp_path, lambda c: MagnitudePrune(MagnitudeConfig(sparsity=0.8, min_elements=100), c))
    teacher = recover_data.run_onnx(context.original, context.calibration, ["h", "r"], threads=1)
    assert all(f.dtype == np.float32 for fs in teacher.features for f in fs)
    monkeypatch.setattr(recover_data, "HALF_FEATURES_BYTES", 1000)
    halved = recover_data.run_onnx(context.original, context.calibration, ["h", "r"], threads=1)
    assert all(f.dtype == np.float16 for fs in halved.features for f in fs)
    assert halved.outputs[0].dtype == np.float32  # the distilled output stays exact
    result = Recover(RecoverConfig(epochs=4, loss="mse", feature_ops=("Relu", "MatMul")), context).call(model)
    assert result.stats["features_matched"] == 2
    assert result.stats["relative_error_after"] < 0.7 * result.stats["relative_error_before"]
