"""Benchmark: metrics equal an independent numpy computation; latency is well-formed (no timing thresholds)."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_data import VOCAB, softmax_model, token_model

from modelpress.compressors.benchmark import (
    TURN_RUNS,
    BenchSettings,
    compare,
    make_session,
    measure,
    run_outputs,
    time_in_turns,
)
from modelpress.compressors.environment import RELEVANT_ISA, environment
from modelpress.compressors.data import load_data
from modelpress.compressors.model_inputs import model_inputs
from modelpress.compressors.synthetic import synthesize
from modelpress.compressors.errors import InputError, ModelpressError
from modelpress.compressors.recipe import BenchmarkSettings

FAST = BenchSettings(threads=1, warmup=1, runs=7)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def perturbed(model: onnx.ModelProto, name: str, scale: float, seed: int = 1) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for i, tensor in enumerate(copy.graph.initializer):
        if tensor.name == name:
            array = numpy_helper.to_array(tensor)
            noise = np.random.default_rng(seed).normal(0, scale, array.shape).astype(array.dtype)
            copy.graph.initializer[i].CopyFrom(numpy_helper.from_array(array + noise, name))
    return copy


def softmax_numpy(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    w = weights(model)
    z = x.astype(np.float64) @ w["w"] + w["b"]
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def labelled(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4)).astype(np.float32)
    labels = rng.integers(0, 3, 50)
    np.savez(tmp_path / "d.npz", x=x, labels=labels)
    return x, labels, load_data(tmp_path / "d.npz", model_inputs(softmax_model()), batch_size=16)


def test_identical_models_agree_fully_and_accuracy_matches_numpy(tmp_path, labelled):
    x, labels, data = labelled
    model = softmax_model()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    before, after = compare(path, model.SerializeToString(), data, FAST)
    expected = float(np.mean(softmax_numpy(model, x).argmax(axis=1) == labels))
    assert before.metrics == {"accuracy": pytest.approx(expected)}
    assert after.metrics["accuracy"] == pytest.approx(expected)
    assert after.metrics["agreement"] == 1.0
    assert after.metrics["cosine"] == pytest.approx(1.0)
    assert after.metrics["max_abs_error"] == 0.0 and after.metrics["mean_abs_error"] == 0.0
    assert before.size_bytes == path.stat().st_size == after.size_bytes


def test_perturbed_model_metrics_match_numpy(labelled):
    x, labels, data = labelled
    model = softmax_model()
    changed = perturbed(model, "w", scale=0.8)
    _, after = compare(model.SerializeToString(), changed.SerializeToString(), data, FAST)
    a, b = softmax_numpy(model, x), softmax_numpy(changed, x)
    cosine = np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    agreement = np.mean(a.argmax(1) == b.argmax(1))
    assert 0 < agreement < 1  # the perturbation really changes some predictions
    assert after.metrics["agreement"] == pytest.approx(agreement)
    assert after.metrics["cosine"] == pytest.approx(cosine, abs=1e-5)
    assert after.metrics["max_abs_error"] == pytest.approx(np.abs(a - b).max(), abs=1e-5)
    assert after.metrics["mean_abs_error"] == pytest.approx(np.abs(a - b).mean(), abs=1e-5)
    assert after.metrics["accuracy"] == pytest.approx(np.mean(b.argmax(1) == labels))


def test_latency_and_memory_are_well_formed(labelled):
    _, _, data = labelled
    model = softmax_model().SerializeToString()
    progress = []
    before, after = compare(model, model, data, FAST, progress=lambda d, c, t: progress.append((d, c, t)))
    for latency in (before.latency, after.latency):
        assert 0 < latency.p50 <= latency.p90 <= latency.p99
        assert latency.mean > 0 and latency.throughput > 0
    assert before.peak_memory_mb is None or before.peak_memory_mb >= 0
    assert ("latency", FAST.runs, FAST.runs) in progress
    assert ("evaluating", len(data.feeds), len(data.feeds)) in progress


class _Recorded:
    """A real ORT session that notes which session each run went to (and the feed of each run)."""

    def __init__(self, session, label, log):
        self.session, self.label, self.log = session, label, log

    def run(self, outputs, feed):
        self.log.append((self.label, float(next(iter(feed.values())).ravel()[0])))
        return self.session.run(outputs, feed)


def test_latency_is_timed_in_rotating_turns_of_back_to_back_runs():
    model = softmax_model().SerializeToString()
    log: list = []
    sessions = [_Recorded(make_session(model, 1), name, log) for name in "abc"]
    feeds = [{"x": np.full((1, 4), float(i), np.float32)} for i in range(3)]
    runs = 2 * TURN_RUNS + 3
    times = time_in_turns(sessions, feeds, runs, warmup=2)
    assert [len(t) for t in times] == [runs] * 3 and all(t > 0 for ts in times for t in ts)
    # Warm-up first, then per round each session settles on feed 0 and runs its turn back to back,
    # cycling the feeds; the order of the sessions rotates from round to round.
    assert log[:6] == [(name, float(i)) for name in "abc" for i in range(2)]
    turns, current = [], None
    for label, value in log[6:]:
        if current is None or current[0] != label:
            current = (label, [])
            turns.append(current)
        current[1].append(value)
    assert [label for label, _ in turns] == list("abc" "bca" "cab")
    for (_, values), start in zip(turns, [0] * 3 + [TURN_RUNS] * 3 + [2 * TURN_RUNS] * 3):
        size = min(TURN_RUNS, runs - start)
        timed, settle = values[-size:], values[:-size]
        assert settle and set(settle) == {0.0}  # at least one untimed run before the turn
        assert timed == [float(i % 3) for i in range(start, start + size)]


def test_embedding_outputs_use_per_sample_cosine_over_feeds_of_different_sizes(tmp_path):
    model = token_model()
    changed = perturbed(model, "table", scale=0.3)
    folder = tmp_path / "feeds"
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i, (batch, seq) in enumerate([(2, 3), (1, 6), (3, 4)]):
        mask = (rng.random((batch, seq)) > 0.3).astype(np.int64)
        mask[:, 0] = 1  # no all-zero sample, whose cosine numpy leaves undefined
        np.savez(folder / f"{i}.npz", input_ids=rng.integers(0, VOCAB, (batch, seq)), attention_mask=mask)
    data = load_data(folder, model_inputs(model))
    _, after = compare(model.SerializeToString(), changed.SerializeToString(), data, FAST)

    def forward(m, feed):
        return weights(m)["table"][feed["input_ids"]] * feed["attention_mask"][..., None]

    cosines = []
    for feed in data.feeds:
        a, b = forward(model, feed), forward(changed, feed)
        for row_a, row_b in zip(a.reshape(len(a), -1), b.reshape(len(b), -1)):
            cosines.append(row_a @ row_b / (np.linalg.norm(row_a) * np.linalg.norm(row_b)))
    assert after.metrics["cosine"] == pytest.approx(np.mean(cosines), abs=1e-5)
    assert after.metrics["worst_cosine"] == pytest.approx(np.min(cosines), abs=1e-5)
    # [N, T, D] features: an argmax over hidden features decides nothing, so no agreement is claimed.
    assert "agreement" not in after.metrics
    assert after.latency.p50 > 0


def test_feature_cosine_leaves_out_padded_positions():
    """Padded positions (attention_mask 0) hold values nobody reads; a change there must not count."""
    from modelpress.compressors.fidelity import OutputFidelity

    rng = np.random.default_rng(0)
    reference = rng.standard_normal((2, 5, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int64)
    candidate = reference.copy()
    candidate[0, 3:] = -candidate[0, 3:]  # only padding of sample 0 changes
    candidate[1] *= 2.0  # a scale change keeps the cosine at 1
    measured = OutputFidelity()
    measured.add(reference, candidate, {"input_ids": np.zeros((2, 5), np.int64), "attention_mask": mask})
    assert measured.values()["cosine"] == pytest.approx(1.0, abs=1e-9)
    unmasked = OutputFidelity()
    unmasked.add(reference, candidate, {"input_ids": np.zeros((2, 5), np.int64)})
    assert unmasked.values()["worst_cosine"] < 0.9


def test_measure_without_labels_reports_no_accuracy_and_accepts_recipe_settings(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(softmax_model(), path)
    data = synthesize(model_inputs(path), None, samples=4)
    result = measure(path, data, BenchmarkSettings(threads=1, warmup=0, runs=3))
    assert result.metrics == {} and result.size_bytes == path.stat().st_size
    assert 0 < result.latency.p50 <= result.latency.p99


def test_labels_that_do_not_fit_the_output_are_an_input_error(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 4), np.float32), labels=np.zeros((4, 2), np.int64))
    data = load_data(tmp_path / "d.npz", model_inputs(softmax_model()))
    with pytest.raises(InputError, match=r"labels of shape \[4, 2\].*output 'probs' gives predictions of shape \[4\]"):
        measure(softmax_model().SerializeToString(), data, FAST)


def test_failures_of_the_original_and_the_compressed_model_are_told_apart(tmp_path):
    model = softmax_model()
    data = synthesize(model_inputs(model), None, samples=2)
    renamed = onnx.ModelProto()
    renamed.CopyFrom(model)
    renamed.graph.input[0].name = "y"
    renamed.graph.node[0].input[0] = "y"
    with pytest.raises(ModelpressError, match="compressed model") as err:
        compare(model.SerializeToString(), renamed.SerializeToString(), data, FAST)
    assert not isinstance(err.value, InputError)
    with pytest.raises(InputError, match="fails on synthetic"):
        compare(renamed.SerializeToString(), None, data, FAST)
    with pytest.raises(InputError, match="onnxruntime cannot load"):
        make_session(b"garbage", 1)


def test_session_options_and_outputs(labelled):
    _, _, data = labelled
    session = make_session(softmax_model().SerializeToString(), threads=2)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    assert session.get_providers() == ["CPUExecutionProvider"]
    outputs = run_outputs(session, data)
    assert [o.shape for o in outputs] == [(16, 3), (16, 3), (16, 3), (2, 3)]


def test_environment_names_runtime_and_cpu():
    env = environment(3)
    assert env["threads"] == 3 and env["onnxruntime"] and env["cpu"] and env["python"]
    assert set(env["isa"]) <= set(RELEVANT_ISA)


@pytest.mark.parametrize("shape", [(6,), (6, 1)])
def test_one_score_per_sample_is_decided_by_threshold(shape):
    """A sigmoid's single column: argmax over it is always 0, so 0.28 -> 0.61 used to count as agreeing."""
    from modelpress.compressors.fidelity import OutputFidelity, predictions

    reference = np.array([0.28, 0.27, 0.17, 0.9, 0.49, 0.6], np.float32).reshape(shape)
    candidate = np.array([0.61, 0.44, 0.15, 0.8, 0.53, 1.0001], np.float32).reshape(shape)
    fidelity = OutputFidelity()
    fidelity.add(reference, candidate)
    assert fidelity.values()["agreement"] == pytest.approx(4 / 6)  # 0.28 and 0.49 cross 0.5
    logits = np.array([-2.0, 0.5, 3.0, -0.1], np.float32).reshape((4,) + shape[1:])
    assert predictions(logits).tolist() == [False, True, True, False]  # outside [0, 1]: threshold 0
    labels = np.array([0, 1, 1, 0])
    assert (predictions(logits) == labels).all()


def test_class_scores_with_pooled_axes_left_on_are_scores():
    """SqueezeNet / DenseNet of the ONNX model zoo give [N, 1000, 1, 1]: top-1 agreement and label
    accuracy apply as for [N, 1000] (they were judged as a feature map, by cosine only)."""
    from modelpress.compressors.fidelity import OutputFidelity, is_features, predictions

    rng = np.random.default_rng(0)
    reference = rng.normal(size=(5, 7, 1, 1)).astype(np.float32)
    candidate = reference.copy()
    candidate[0, :, 0, 0] = -candidate[0, :, 0, 0]  # sample 0 changes its top class
    assert not is_features(reference) and is_features(rng.normal(size=(5, 7, 2, 1)).astype(np.float32))
    assert predictions(reference).tolist() == reference[:, :, 0, 0].argmax(1).tolist()
    fidelity = OutputFidelity()
    fidelity.add(reference, candidate)
    assert fidelity.values()["agreement"] == pytest.approx(4 / 5)
