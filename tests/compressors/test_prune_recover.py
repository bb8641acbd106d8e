"""The recover pass: distillation brings the 90 %-pruned digits MLP back within 1 pp, keeps every zero
exactly zero, writes the same bytes twice, and handles softmax outputs, labels, features, feeds that
cannot be pooled and its error cases on tiny graphs."""

import time

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_mlp
from onnx import helper
from pydantic import ValidationError

from modelpress.compressors.model import check_model, iter_weights, load_model, normalize, to_bytes
from modelpress.compressors.pipeline import PassContext, run_passes
from modelpress.compressors.prune.magnitude import MagnitudeConfig, MagnitudePrune
from modelpress.compressors.prune.recover import Recover, RecoverConfig
from modelpress.compressors.quantize.kmeans import KMeansConfig, KMeansQuantize
from modelpress.compressors.recipe import load_recipe
from modelpress.compressors.registry import PASSES


def weights(model):
    return {v.name: v.const_value.numpy().copy() for _, v in iter_weights(model)}


def accuracy(model, x, y):
    session = ort.InferenceSession(to_bytes(model), providers=["CPUExecutionProvider"])
    return float((session.run(None, {"input": x})[0].argmax(1) == y).mean())


@pytest.fixture(scope="module")
def mlp_recovered(zoo_models, digits):
    """The digits MLP pruned to 90 % and recovered with the default config, twice."""
    x_train, y_train, x_test, y_test = digits
    path = zoo_models("mlp")

    def once():
        model = load_model(path)
        normalize(model)
        context = PassContext(calibration=[{"input": x_train[i:i + 256]} for i in range(0, len(x_train), 256)],
                              labels=y_train, original=to_bytes(model), seed=0)
        base = accuracy(model, x_test, y_test)
        pruned = MagnitudePrune(MagnitudeConfig(sparsity=0.9, min_elements=1024), context).call(model).model
        before = weights(pruned)
        pruned_accuracy = accuracy(pruned, x_test, y_test)
        started = time.perf_counter()
        result = Recover(RecoverConfig(), context).call(pruned)
        seconds = time.perf_counter() - started
        check_model(result.model)
        return dict(result=result, base=base, pruned=pruned_accuracy, before=before, seconds=seconds,
                    recovered=accuracy(result.model, x_test, y_test), bytes=to_bytes(result.model))

    return once(), once()


def test_recovery_brings_accuracy_back_within_one_point(mlp_recovered):
    run = mlp_recovered[0]
    print(f"\ndigits MLP 90 % magnitude: {run['base']:.4f} -> pruned {run['pruned']:.4f} -> recovered "
          f"{run['recovered']:.4f}; recovery took {run['seconds']:.1f} s")
    assert run["pruned"] < run["base"] - 0.05  # there was something to recover
    assert run["base"] - run["recovered"] <= 0.01
    stats = run["result"].stats
    assert stats["agreement_after"] > stats["agreement_before"] and stats["loss_last"] < stats["loss_first"]
    assert stats["tensors_trained"] == 6 and not stats["not_reached"] and stats["loss"] == "kl"
    assert not stats["labels_used"] and not stats["stopped_by_budget"]


def test_masks_stay_exactly_zero_and_names_and_dtypes_are_kept(mlp_recovered):
    run = mlp_recovered[0]
    after = weights(run["result"].model)
    assert set(after) == set(run["before"])
    pruned = [n for n, w in run["before"].items() if np.mean(w == 0) > 0.5]
    assert len(pruned) == 2
    for name, w in run["before"].items():
        assert after[name].dtype == w.dtype and after[name].shape == w.shape
        assert np.array_equal(after[name] == 0, w == 0), name
        assert not np.array_equal(after[name], w), name  # every tensor was trained
    assert np.signbit(after[pruned[0]][after[pruned[0]] == 0]).sum() == 0  # +0.0, not -0.0
    assert run["result"].stats["zeros_kept"] == sum(int((w == 0).sum()) for w in run["before"].values())


def test_two_runs_write_the_same_bytes(mlp_recovered):
    assert mlp_recovered[0]["bytes"] == mlp_recovered[1]["bytes"]


def test_deep_compression_after_recovery_keeps_accuracy(mlp_recovered, digits):
    _, _, x_test, y_test = digits
    run = mlp_recovered[1]
    model = ir.from_proto(onnx.load_model_from_string(run["bytes"]))
    model = KMeansQuantize(KMeansConfig(bits=4)).call(model).model
    check_model(model)
    assert run["base"] - accuracy(model, x_test, y_test) <= 0.01
    assert len(run["bytes"]) / len(to_bytes(model)) > 6


# --------------------------------------------------------------------------- tiny graphs


def softmax_mlp() -> onnx.ModelProto:
    """tiny_mlp whose output is Softmax(logits) and named ``probs``."""
    proto = tiny_mlp()
    proto.graph.node.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
    proto.graph.output[0].name = "probs"
    return proto


def tiny_setup(tmp_path, proto, *, labels=True, feeds=None, sparsity=0.8):
    onnx.save(proto, tmp_path / "m.onnx")
    model = load_model(tmp_path / "m.onnx")
    normalize(model)
    rng = np.random.default_rng(0)
    feeds = feeds or [{"input": rng.random((32, 64), dtype=np.float32)} for _ in range(3)]
    context = PassContext(calibration=feeds, labels=rng.integers(0, 10, 96) if labels else None,
                          original=to_bytes(model), seed=0)
    model = MagnitudePrune(MagnitudeConfig(sparsity=sparsity, min_elements=100), context).call(model).model
    return model, context


def test_softmax_output_is_distilled_as_logits_with_labels(tmp_path):
    model, context = tiny_setup(tmp_path, softmax_mlp())
    result = Recover(RecoverConfig(epochs=5, label_weight=0.5), context).call(model)
    check_model(result.model)
    stats = result.stats
    assert stats["loss"] == "kl" and stats["labels_used"] and "label_accuracy_after" in stats
    assert stats["agreement_after"] >= stats["agreement_before"]
    assert sorted(stats["trained"]) == ["b1", "w1", "w2"]


def test_mse_loss_with_feature_matching(tmp_path):
    model, context = tiny_setup(tmp_path, tiny_mlp())
    result = Recover(RecoverConfig(epochs=5, loss="mse", features=("r",)), context).call(model)
    stats = result.stats
    assert stats["loss"] == "mse" and stats["relative_error_after"] < stats["relative_error_before"]
    with pytest.raises(ValueError, match="'nope' are not computed"):
        Recover(RecoverConfig(epochs=1, features=("nope",)), context).call(model)


def test_feeds_whose_samples_interact_are_used_whole(tmp_path):
    """A batch-mean subtracted from the input couples the samples: re-batching would change the
    teacher's function, so each feed is one step."""
    proto = tiny_mlp()
    proto.graph.node.insert(0, helper.make_node("ReduceMean", ["input"], ["mu"], axes=[0], keepdims=1))
    proto.graph.node.insert(1, helper.make_node("Sub", ["input", "mu"], ["centered"]))
    proto.graph.node[2].input[0] = "centered"
    model, context = tiny_setup(tmp_path, proto)
    result = Recover(RecoverConfig(epochs=2), context).call(model)
    assert result.stats["samples"] == 3 and result.stats["steps"] == 6
    assert "one step per feed" in result.stats["notes"][0]


def test_keep_masks_false_lets_zeros_move_and_budget_stops(tmp_path):
    model, context = tiny_setup(tmp_path, tiny_mlp())
    zeros = int((weights(model)["w1"] == 0).sum())
    result = Recover(RecoverConfig(epochs=3, keep_masks=False, max_seconds=1e-9), context).call(model)
    assert result.stats["stopped_by_budget"] and result.stats["steps"] == 1
    assert int((weights(result.model)["w1"] == 0).sum()) < zeros


def test_torch_settings_are_restored(tmp_path):
    model, context = tiny_setup(tmp_path, tiny_mlp())
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    Recover(RecoverConfig(epochs=1), context).call(model)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic


def test_errors_name_the_problem(tmp_path):
    model, context = tiny_setup(tmp_path, tiny_mlp())
    with pytest.raises(ValueError, match="calibration data"):
        Recover(RecoverConfig(), PassContext(original=context.original)).call(model)
    with pytest.raises(ValueError, match="original model as teacher"):
        Recover(RecoverConfig(), PassContext(calibration=context.calibration)).call(model)
    proto = tiny_mlp()
    proto.graph.node.append(helper.make_node("Celu", ["logits"], ["out"], name="celu"))
    proto.graph.output[0].name = "out"
    model, context = tiny_setup(tmp_path, proto)
    with pytest.raises(ValueError, match=r"unsupported ONNX op: Celu \(node 'celu'\)"):
        Recover(RecoverConfig(epochs=1), context).call(model)


def test_registered_and_usable_from_a_recipe(tmp_path):
    assert PASSES["prune"]["recover"] is Recover and Recover.needs_original and Recover.needs_calibration
    with pytest.raises(ValidationError):
        RecoverConfig(epoch=3)
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text("prune:\n  - type: magnitude\n    sparsity: 0.8\n    min_elements: 100\n"
                           "  - type: recover\n    epochs: 2\n    optimizer: sgd\n    lr: 0.01\n")
    model, context = tiny_setup(tmp_path, tiny_mlp(), sparsity=0.0)
    passes, _ = load_recipe(str(recipe_path)).build(context)
    model, records = run_passes(model, passes)
    assert [r.name for r in records] == ["magnitude", "recover"]
    assert records[1].stats["epochs"] == 2 and records[1].stats["zeros_kept"] > 0


def test_fixed_batch_models_train_feed_by_feed(tmp_path):
    proto = tiny_mlp()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 32
    model, context = tiny_setup(tmp_path, proto)
    result = Recover(RecoverConfig(epochs=1), context).call(model)
    assert result.stats["steps"] == 3 and "one step per feed" in result.stats["notes"][0]


def test_a_model_already_equal_to_its_teacher_is_left_alone(tmp_path):
    model, context = tiny_setup(tmp_path, tiny_mlp(), sparsity=0.0)
    before = to_bytes(model)
    result = Recover(RecoverConfig(epochs=2), context).call(model)
    assert not result.modified and to_bytes(result.model) == before
    assert result.stats["kd_loss_after"] == result.stats["kd_loss_before"] == 0.0
    assert result.stats["steps"] == 0 and "not trained" in result.stats["notes"][-1]


def token_model(leaky: bool = False):
    """ids [N, S] -> embedding table -> MatMul -> [N, S, 8], with an attention_mask input; ``leaky``
    adds the mean over all positions (padding included) to every position."""
    rng = np.random.default_rng(1)
    table = helper.make_tensor("table", onnx.TensorProto.FLOAT, [20, 8], rng.normal(size=160).astype(np.float32))
    w = helper.make_tensor("w", onnx.TensorProto.FLOAT, [8, 8], rng.normal(size=64).astype(np.float32))
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"]),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=onnx.TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["m", "axis"], ["m3"]), helper.make_node("Mul", ["y", "m3"], ["out"])]
    inits = [table, w, helper.make_tensor("axis", onnx.TensorProto.INT64, [1], [2])]
    if leaky:
        nodes[-1].output[0] = "masked"
        nodes += [helper.make_node("ReduceMean", ["h"], ["mu"], axes=[1], keepdims=1),
                  helper.make_node("Add", ["masked", "mu"], ["out"])]
    inputs = [helper.make_tensor_value_info(n, onnx.TensorProto.INT64, ["N", "S"]) for n in ("input_ids", "attention_mask")]
    graph = helper.make_graph(nodes, "tokens", inputs, [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def token_feeds():
    """Right-padded sentences of 2..9 tokens in 16 positions; id 0 is the padding token."""
    rng = np.random.default_rng(2)
    lengths = rng.integers(2, 10, 48)
    mask = (np.arange(16)[None] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(1, 20, (48, 16)), 0)
    return [{"input_ids": ids[i:i + 16], "attention_mask": mask[i:i + 16]} for i in range(0, 48, 16)]


def test_padding_is_left_out_of_the_loss_and_cut_from_batches(tmp_path):
    feeds = token_feeds()
    model, context = tiny_setup(tmp_path, token_model(), labels=False, feeds=feeds, sparsity=0.0)
    w = model.graph.initializers["w"]
    w.const_value = ir.Tensor(w.const_value.numpy() * 0.5, name="w")  # a student that needs training
    table = weights(model)["table"]
    config = RecoverConfig(epochs=3, batch_size=8, lr=0.01)
    result = Recover(config, context).call(model)
    stats = result.stats
    assert stats["relative_error_after"] < 0.6 * stats["relative_error_before"] and stats["notes"] == []
    after = weights(result.model)["table"]
    assert np.array_equal(after[0], table[0])  # the padding token's row got no gradient
    assert not np.array_equal(after[1:], table[1:])

    from modelpress.compressors.prune.recover_data import TrainingData, run_onnx
    data = TrainingData.build(feeds, run_onnx(context.original, feeds, (), 1), None, config, "out", "Mul")
    assert data.trim and data.positions == sum(int(f["attention_mask"].sum()) for f in feeds)
    for batch in data.batches(lambda n, b, g: list(torch.randperm(n, generator=g).split(b)), torch.Generator(), 8):
        length = batch.mask.shape[1]
        assert batch.mask.any(0)[-1] and length <= 9 and batch.teacher.shape == (len(batch.mask), length, 8)
        assert batch.feed["input_ids"].shape == batch.mask.shape


def test_padding_that_reaches_real_positions_keeps_full_batches(tmp_path):
    _, context = tiny_setup(tmp_path, token_model(leaky=True), labels=False, feeds=token_feeds(), sparsity=0.0)
    from modelpress.compressors.prune.recover_data import TrainingData, run_onnx
    feeds = context.calibration
    data = TrainingData.build(feeds, run_onnx(context.original, feeds, (), 1), None, RecoverConfig(), "out", "Add")
    assert data.mask_input == "attention_mask" and not data.trim
    assert "padding changes the outputs" in data.notes[0]
    assert next(data.in_order(8)).feed["input_ids"].shape == (8, 16)
    none = TrainingData.build(feeds, run_onnx(context.original, feeds, (), 1), None, RecoverConfig(padding_mask=None),
                              "out", "Add")
    assert none.mask_input is None and none.positions == 48 and next(none.in_order(8)).mask is None


def test_without_epochs_large_models_get_fewer_passes(tmp_path, monkeypatch):
    """AUTO_WORK caps the automatic pass count (trainable weights x positions), at least one pass."""
    from modelpress.compressors.prune import recover_train
    model, context = tiny_setup(tmp_path, tiny_mlp())
    monkeypatch.setattr(recover_train, "AUTO_WORK", 1.0)
    assert Recover(RecoverConfig(), context).call(model).stats["epochs"] == 1
    params = sum(v.const_value.size for v in model.graph.initializers.values())
    monkeypatch.setattr(recover_train, "AUTO_WORK", 3.5 * params * 96)
    assert Recover(RecoverConfig(), context).call(model).stats["epochs"] == 3


def test_conv_work_counts_every_output_pixel(tmp_path, monkeypatch):
    """A Conv kernel costs its size x output pixels per sample: the automatic pass count reads it so
    (counted once per sample, a small CNN on large images planned 1000 passes)."""
    from onnx import TensorProto, numpy_helper

    from modelpress.compressors.prune import recover_train
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["input", "w"], ["out"], pads=[1, 1, 1, 1])], "conv",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 1, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4, 8, 8])], initializer=[w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"input": rng.random((16, 1, 8, 8), dtype=np.float32)} for _ in range(2)]
    model, context = tiny_setup(tmp_path, proto, labels=False, feeds=feeds, sparsity=0.0)
    kernel = model.graph.initializers["w"]
    kernel.const_value = ir.Tensor(kernel.const_value.numpy() * 0.9, name="w")  # something to recover
    # 36 weights x 64 pixels x 32 samples per pass: a budget of 3 passes, where counting each kernel
    # once per sample would allow 192 (and AUTO_STEPS would then plan 1000 / 1 step = 1000 passes).
    monkeypatch.setattr(recover_train, "AUTO_WORK", 3.5 * 36 * 64 * 32)
    stats = Recover(RecoverConfig(batch_size=64), context).call(model).stats
    assert stats["epochs"] == 3


@pytest.mark.parametrize("leaky", [False, True])
def test_features_are_kept_at_real_positions_and_train_the_same(tmp_path, monkeypatch, leaky):
    """With a padding mask the teacher's features are stored packed (real positions only: here 269 of
    768 rows); batches see them zero-filled at padding, which the losses skip, so training writes the
    same bytes as with every position stored — whether batches are cut (trim) or kept whole (leaky)."""
    from modelpress.compressors.prune import recover_data

    feeds = token_feeds()
    model, context = tiny_setup(tmp_path, token_model(leaky), labels=False, feeds=feeds, sparsity=0.0)
    w = model.graph.initializers["w"]
    w.const_value = ir.Tensor(w.const_value.numpy() * 0.5, name="w")
    teacher = recover_data.run_onnx(context.original, feeds, ["h", "y"], 1, "attention_mask")
    real = sum(int(f["attention_mask"].sum()) for f in feeds)
    packed = [f for fs in teacher.features for f in fs]
    assert all(isinstance(f, recover_data.Packed) for f in packed) and sum(len(f.rows) for f in packed) == 2 * real
    dense = recover_data.run_onnx(context.original, feeds, ["h", "y"], 1)
    for fs, ds, feed in zip(teacher.features, dense.features, feeds):
        for f, d in zip(fs, ds):
            m = feed["attention_mask"] != 0
            assert np.array_equal(f.take(np.arange(len(m))).numpy(), np.where(m[..., None], d, 0))

    config = RecoverConfig(epochs=2, batch_size=8, lr=0.01, features=("h", "y"))
    stored = to_bytes(Recover(config, context).call(model.clone()).model)
    from modelpress.compressors.prune import recover_train

    dense_teacher = lambda model, feeds, names, threads, mask=None: recover_data.run_onnx(model, feeds, names, threads)  # noqa: E731
    monkeypatch.setattr(recover_train, "run_onnx", dense_teacher)  # every position stored
    assert to_bytes(Recover(config, context).call(model).model) == stored


def test_a_saturated_sigmoid_output_is_distilled_through_its_logits(tmp_path):
    """A multi-label head Sigmoid(logits) whose student weights push every logit far past 0: MSE on the
    probabilities has almost no gradient there; the binary KD loss on the logits (auto for a Sigmoid
    output) pulls the student back."""
    proto = tiny_mlp()
    proto.graph.node.append(helper.make_node("Sigmoid", ["logits"], ["probs"]))
    proto.graph.output[0].name = "probs"
    onnx.save(proto, tmp_path / "m.onnx")
    teacher = load_model(tmp_path / "m.onnx")
    normalize(teacher)
    feeds = [{"input": np.random.default_rng(1).random((64, 64), dtype=np.float32)}]
    context = PassContext(calibration=feeds, original=to_bytes(teacher), seed=0)
    errors = {}
    for loss in ("auto", "mse"):
        student = load_model(tmp_path / "m.onnx")
        normalize(student)
        w2 = student.graph.initializers["w2"]
        w2.const_value = ir.Tensor(w2.const_value.numpy() * 40 - 2, name="w2")  # saturated, mostly wrong
        result = Recover(RecoverConfig(epochs=60, batch_size=16, loss=loss, lr=1e-3), context).call(student)
        errors[result.stats["loss"]] = (result.stats["relative_error_before"], result.stats["relative_error_after"])
    (before, bce), (_, mse) = errors["bce"], errors["mse"]
    assert bce < 0.25 * before and bce < 0.6 * mse  # measured: 0.788 -> 0.164 (bce), -> 0.352 (mse)


def test_loss_bce_needs_a_sigmoid_output(tmp_path):
    model, context = tiny_setup(tmp_path, tiny_mlp())
    with pytest.raises(ValueError, match="loss: bce distils a Sigmoid output"):
        Recover(RecoverConfig(epochs=1, loss="bce"), context).call(model)
