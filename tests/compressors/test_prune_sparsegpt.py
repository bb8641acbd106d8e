"""SparseGPT / Wanda passes and calibration capture on tiny graphs and the digits MLP."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import REPO, tiny_mlp
from modelpress.compressors.calibration import (
    ColumnNorms,
    CrossGram,
    Gram,
    capture,
    first_samples,
    padding_masks,
)
from modelpress.compressors.model import (
    check_model,
    iter_weights,
    load_model,
    normalize,
    to_bytes,
)
from modelpress.compressors.pipeline import PassContext, run_passes
from modelpress.compressors.prune.magnitude import MagnitudeConfig, MagnitudePrune
from modelpress.compressors.prune.sparsegpt import SparseGPTConfig, SparseGPTPrune
from modelpress.compressors.prune.wanda import WandaConfig, WandaPrune
from modelpress.compressors.recipe import load_recipe
from modelpress.compressors.registry import PASSES
from modelpress.kernels.hessian import refit_kept, sparsegpt_prune
from modelpress.kernels.sparsity import nm_mask
from onnx import TensorProto, helper, numpy_helper


def correlated(rows, k, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(k, k)) * 0.4 + np.eye(k)
    return np.abs(rng.normal(size=(rows, k)) @ mix).astype(np.float32)


def load(tmp_path, proto, name="m.onnx"):
    onnx.save(proto, tmp_path / name)
    model = load_model(tmp_path / name)
    normalize(model)
    return model


def run(model, feed):
    session = ort.InferenceSession(to_bytes(model), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


def weights(model):
    return {v.name: v.const_value.numpy() for _, v in iter_weights(model)}


def sparsegpt(model, x, **config):
    config = {"min_elements": 100, **config}
    result = SparseGPTPrune(SparseGPTConfig(**config), PassContext(calibration=x)).call(model)
    check_model(result.model)
    return result


@pytest.fixture
def calib():
    return [{"input": correlated(128, 64)}, {"input": correlated(128, 64, seed=1)}]


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_output_error_beats_magnitude_and_sparsity_is_exact(tmp_path, calib, pattern):
    held_out = {"input": correlated(256, 64, seed=7)}
    reference = run(load(tmp_path, tiny_mlp()), held_out)
    result = sparsegpt(load(tmp_path, tiny_mlp()), calib, pattern=pattern)
    pruned = weights(result.model)
    if pattern == "unstructured":
        magnitude = MagnitudePrune(MagnitudeConfig(sparsity=0.5, min_elements=100)).call(load(tmp_path, tiny_mlp())).model
        for name in ("w1", "w2"):
            assert np.count_nonzero(pruned[name] == 0) == pruned[name].size // 2
    else:
        magnitude = load(tmp_path, tiny_mlp())
        for _, value in iter_weights(magnitude):  # magnitude 2:4 along the input axis
            if value.name in ("w1", "w2"):
                w = value.const_value.numpy()
                value.const_value = ir.Tensor(np.where(nm_mask(np.abs(w), 2, 4, axis=0), w, 0), name=value.name)
        for name in ("w1", "w2"):
            groups = (pruned[name] != 0).reshape(-1, 4, pruned[name].shape[1]).sum(axis=1)
            assert groups.max() <= 2 and np.mean(pruned[name] == 0) == 0.5
    ours = np.mean((run(result.model, held_out) - reference) ** 2)
    theirs = np.mean((run(magnitude, held_out) - reference) ** 2)
    assert ours < 0.5 * theirs
    assert np.array_equal(pruned["b1"], numpy_helper.to_array(tiny_mlp().graph.initializer[1]))
    assert result.stats["sparsity"] == 0.5 and set(result.stats["output_error"]) == {"w1", "w2"}


def test_deterministic_bytes_and_rounds(tmp_path, calib):
    first = sparsegpt(load(tmp_path, tiny_mlp()), calib)
    second = sparsegpt(load(tmp_path, tiny_mlp()), calib)
    assert to_bytes(first.model) == to_bytes(second.model)
    assert first.stats["rounds"] == 2  # sequential: w2 sees the output of the pruned w1
    one_shot = sparsegpt(load(tmp_path, tiny_mlp()), calib, rounds=1)
    assert one_shot.stats["rounds"] == 1
    assert np.array_equal(weights(one_shot.model)["w1"], weights(first.model)["w1"])
    assert not np.array_equal(weights(one_shot.model)["w2"], weights(first.model)["w2"])


def test_samples_caps_the_calibration_this_pass_uses(tmp_path, calib):
    """``samples: 160`` = the first feed and 32 rows of the second: the same bytes as running on them."""
    capped = sparsegpt(load(tmp_path, tiny_mlp()), calib, samples=160)
    by_hand = sparsegpt(load(tmp_path, tiny_mlp()), [calib[0], {"input": calib[1]["input"][:32]}])
    assert to_bytes(capped.model) == to_bytes(by_hand.model)
    assert capped.stats["calibration_rows"] == 160 < sparsegpt(load(tmp_path, tiny_mlp()), calib).stats["calibration_rows"]
    assert to_bytes(sparsegpt(load(tmp_path, tiny_mlp()), calib, samples=10_000).model) == \
        to_bytes(sparsegpt(load(tmp_path, tiny_mlp()), calib).model)
    assert [len(f["input"]) for f in first_samples(calib, 128)] == [128]
    assert first_samples(calib, None) == calib


def test_needs_calibration(tmp_path):
    with pytest.raises(ValueError, match="needs calibration data.*--data"):
        SparseGPTPrune(SparseGPTConfig(), PassContext(calibration=None)).call(load(tmp_path, tiny_mlp()))
    assert SparseGPTPrune.needs_calibration and WandaPrune.needs_calibration
    assert PASSES["prune"]["sparsegpt"] is SparseGPTPrune and PASSES["prune"]["wanda"] is WandaPrune


def gemm_model(trans_a: int, trans_b: int) -> onnx.ModelProto:
    """input [N, 32] (fed to Gemm transposed when trans_a) -> Gemm(W 32->24, transB) -> out."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(32, 24)).astype(np.float32)
    w = w.T.copy() if trans_b else w
    nodes = [helper.make_node("Relu", ["input"], ["x"])]
    if trans_a:
        nodes.append(helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0]))
    nodes.append(helper.make_node("Gemm", ["xt" if trans_a else "x", "w", "b"], ["out"], transA=trans_a, transB=trans_b))
    graph = helper.make_graph(
        nodes, "gemm", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 24])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(24, np.float32), "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (0, 1), (1, 1)])
def test_gemm_layouts_match_the_kernel(tmp_path, trans_a, trans_b):
    x = correlated(200, 32) - 0.5
    model = load(tmp_path, gemm_model(trans_a, trans_b))
    original = weights(model)["w"]
    result = sparsegpt(model, [{"input": x}])
    relu = np.maximum(x, 0).astype(np.float64)
    layout, h = "out_in" if trans_b else "in_out", relu.T @ relu / len(x)
    expected = refit_kept(original, sparsegpt_prune(original, h, layout=layout, sparsity=0.5), h, layout=layout)
    np.testing.assert_allclose(weights(result.model)["w"], expected, atol=1e-5)


def test_capture_reshapes_3d_inputs_and_chunks(tmp_path):
    x = correlated(60, 64).reshape(6, 10, 64)  # [B, T, K]
    proto = tiny_mlp()
    for value, last in ((proto.graph.input[0], 64), (proto.graph.output[0], 10)):
        value.CopyFrom(helper.make_tensor_value_info(value.name, TensorProto.FLOAT, ["B", "T", last]))
    model = load(tmp_path, proto)
    grams = [Gram(), Gram(), Gram()]
    norms = ColumnNorms()
    capture(model, [("input", grams[0]), ("r", grams[1]), ("h", grams[2]), ("r", norms)], [{"input": x[:3]}, {"input": x[3:]}], values_per_run=1)
    flat = x.reshape(-1, 64).astype(np.float64)
    np.testing.assert_allclose(grams[0].hessian, flat.T @ flat / 60, rtol=1e-5)
    w = weights(model)
    r = np.maximum(flat @ w["w1"] + w["b1"], 0)
    np.testing.assert_allclose(grams[1].hessian, r.T @ r / 60, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(norms.norms, np.linalg.norm(r, axis=0), rtol=1e-4)
    assert grams[2].rows == 60 and grams[2].hessian.shape == (128, 128)
    with pytest.raises(ValueError, match="not values of the main graph"):
        capture(model, [("nope", Gram())], [{"input": x}])


def test_cross_gram_pairs_the_model_with_its_reference(tmp_path):
    x = correlated(50, 64)
    original = load(tmp_path, tiny_mlp())
    pruned = sparsegpt(load(tmp_path, tiny_mlp()), [{"input": x}]).model
    cross, plain = CrossGram(flush_rows=16), CrossGram()
    capture(pruned, [("r", cross), ("r", plain)], [{"input": x[:20]}, {"input": x[20:]}], reference=ir.to_proto(original))

    def relu_input(model):
        w = weights(model)
        return np.maximum(x.astype(np.float64) @ w["w1"] + w["b1"], 0)

    r_hat, r = relu_input(pruned), relu_input(original)
    for stat in (cross, plain):
        np.testing.assert_allclose(stat.hessian, r_hat.T @ r_hat / 50, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(stat.cross, r_hat.T @ r / 50, rtol=1e-4, atol=1e-6)
    alone = CrossGram()
    capture(pruned, [("r", alone)], [{"input": x}])  # no reference: C = H
    np.testing.assert_array_equal(alone.cross, alone.hessian)


def test_upstream_correction_lowers_the_final_error(tmp_path, calib):
    held_out = {"input": correlated(256, 64, seed=7)}
    reference = run(load(tmp_path, tiny_mlp()), held_out)
    errors = {}
    for correct in (True, False):
        model = sparsegpt(load(tmp_path, tiny_mlp()), calib, sparsity=0.7, correct_upstream=correct).model
        errors[correct] = np.mean((run(model, held_out) - reference) ** 2)
    assert errors[True] < 0.9 * errors[False]
    with pytest.raises(ValueError, match="sequential"):
        SparseGPTConfig(rounds=2, correct_upstream=True)
    assert not SparseGPTConfig(rounds=2).corrects and SparseGPTConfig().corrects


def if_model() -> onnx.ModelProto:
    """MatMul w_main in the main graph, then an If whose branches each hold a MatMul weight."""
    rng = np.random.default_rng(0)

    def branch(name):
        w = numpy_helper.from_array(rng.normal(size=(64, 16)).astype(np.float32), f"w_{name}")
        return helper.make_graph([helper.make_node("MatMul", ["h", f"w_{name}"], [f"y_{name}"])], name, [],
                                 [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, ["N", 16])], [w])

    w_main = numpy_helper.from_array(rng.normal(size=(64, 64)).astype(np.float32), "w_main")
    w_conv = numpy_helper.from_array(rng.normal(size=(4, 1, 8, 8)).astype(np.float32), "w_conv")
    nodes = [
        helper.make_node("MatMul", ["input", "w_main"], ["h"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else")),
        helper.make_node("Reshape", ["input", "shape"], ["img"]),
        helper.make_node("Conv", ["img", "w_conv"], ["c"]),
    ]
    graph = helper.make_graph(
        nodes, "if_model",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16]), helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 4, 1, 1])],
        [w_main, w_conv, numpy_helper.from_array(np.array([-1, 1, 8, 8], np.int64), "shape")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_subgraph_weights_fall_back_to_magnitude_with_a_reason_and_convs_are_solved(tmp_path):
    feeds = [{"input": correlated(32, 64), "cond": np.array(True)}]
    result = sparsegpt(load(tmp_path, if_model()), feeds, min_elements=200)
    reasons = {f["tensor"]: f["reason"] for f in result.stats["fallback"]}
    assert set(reasons) == {"w_then", "w_else"}
    assert "subgraph" in reasons["w_then"] and "magnitude" in reasons["w_then"]
    assert set(result.stats["output_error"]) == {"w_main", "w_conv"}  # the Conv through its patches
    for name, w in weights(result.model).items():
        if name.startswith("w_"):
            assert np.mean(w == 0) == 0.5, name
    nm = sparsegpt(load(tmp_path, if_model()), feeds, min_elements=200, pattern="4:8")
    assert nm.stats["per_tensor"] == {"w_main": 0.5, "w_then": 0.5, "w_else": 0.5}  # Conv C_in=1: no 4:8
    assert any(s["tensor"] == "w_conv" and "N:M" in s["reason"] for s in nm.stats["skipped"])


def test_wanda_prunes_each_output_by_weight_times_activation(tmp_path, calib):
    model = load(tmp_path, tiny_mlp())
    original = weights(model)
    result = WandaPrune(WandaConfig(sparsity=0.25, min_elements=100), PassContext(calibration=calib)).call(model)
    check_model(result.model)
    pruned = weights(result.model)
    x = np.concatenate([f["input"] for f in calib]).astype(np.float64)
    score = np.abs(original["w1"]) * np.linalg.norm(x, axis=0)[:, None]
    for col in range(128):  # each output keeps its 48 highest scores
        kept = pruned["w1"][:, col] != 0
        assert kept.sum() == 48 and score[kept, col].min() >= score[~kept, col].max()
    assert np.array_equal(pruned["w1"][pruned["w1"] != 0], original["w1"][pruned["w1"] != 0])
    nm = WandaPrune(WandaConfig(pattern="2:4", min_elements=100), PassContext(calibration=calib)).call(load(tmp_path, tiny_mlp()))
    assert (weights(nm.model)["w2"] != 0).reshape(32, 4, 10).sum(axis=1).max() == 2


def test_shipped_sparse_50_recipe_runs(tmp_path, calib):
    recipe = load_recipe(str(REPO / "configs" / "sparse-50.yaml"))
    passes, encoder = recipe.build(PassContext(calibration=calib))
    assert encoder is None and [p.name for p in passes] == ["admm", "sparse_storage"]
    _, records = run_passes(load(tmp_path, tiny_mlp()), passes)
    # Per layer by sensitivity: the mean over both weights is 50 %.
    per_tensor = records[0].stats["per_tensor"]
    assert records[0].stats["sparsity"] == pytest.approx(0.5, abs=1e-3) and set(per_tensor) == {"w1", "w2"}
    assert records[1].stats["per_tensor"]["w1"]["bytes_after"] < 0.6 * 64 * 128 * 4  # the bitmap + the nonzero values
    assert recipe.gates.max_accuracy_drop == 0.01 and recipe.calibration.samples == 4096


def test_digits_mlp_keeps_accuracy_where_magnitude_loses_it(zoo_models, digits):
    x_train, _, x_test, y_test = digits
    path = zoo_models("mlp")

    def accuracy(model):
        return float(np.mean(run(model, {"input": x_test}).argmax(axis=1) == y_test))

    baseline = accuracy(load_model(path))
    magnitude = MagnitudePrune(MagnitudeConfig(sparsity=0.8, min_elements=100)).call(load_model(path)).model
    ours = SparseGPTPrune(SparseGPTConfig(sparsity=0.8, min_elements=100), PassContext(calibration=[{"input": x_train[:256]}])).call(load_model(path)).model
    assert accuracy(ours) >= baseline - 0.02
    assert accuracy(ours) > accuracy(magnitude) + 0.02


def test_padding_positions_are_left_out_of_the_statistics(tmp_path):
    """[B, T, K] inputs with an attention_mask: the Gram, cross Gram and column norms see only the
    rows of real tokens; values whose shape does not match the mask are taken whole."""
    x = correlated(60, 64).reshape(6, 10, 64)
    mask = (np.arange(10) < np.array([[3], [10], [1], [5], [7], [2]])).astype(np.int64)
    proto = tiny_mlp()
    proto.graph.input[0].CopyFrom(helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", "T", 64]))
    proto.graph.input.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"]))
    proto.graph.output[0].CopyFrom(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "T", 10]))
    model = load(tmp_path, proto)
    feeds = [{"input": x[:2], "attention_mask": mask[:2]}, {"input": x[2:], "attention_mask": mask[2:]}]
    masks = padding_masks(feeds, "attention_mask")
    gram, cross, norms, whole = Gram(), CrossGram(), ColumnNorms(), Gram()
    capture(model, [("input", gram), ("r", cross), ("r", norms)], feeds, row_masks=masks, reference=ir.to_proto(model))
    capture(model, [("input", whole)], feeds)
    real = x[mask == 1].astype(np.float64)
    assert gram.rows == cross.rows == norms.rows == int(mask.sum()) == real.shape[0]
    np.testing.assert_allclose(gram.hessian, real.T @ real / len(real), rtol=1e-5)
    w = weights(model)
    r = np.maximum(real @ w["w1"] + w["b1"], 0)
    np.testing.assert_allclose(cross.hessian, r.T @ r / len(r), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(norms.norms, np.linalg.norm(r, axis=0), rtol=1e-4)
    assert whole.rows == 60
    assert padding_masks(feeds, None) is None and padding_masks(feeds, "nope") is None
    # The passes use it by default: pruning with the mask equals pruning on the real rows alone.
    masked = sparsegpt(load(tmp_path, proto), feeds, rounds=1)
    flat = sparsegpt(load(tmp_path, tiny_mlp()), [{"input": real.astype(np.float32)}], rounds=1)
    # (The pass also regroups the samples by length, so the sums run in another order: float noise.)
    np.testing.assert_allclose(weights(masked.model)["w1"], weights(flat.model)["w1"], atol=1e-4)
