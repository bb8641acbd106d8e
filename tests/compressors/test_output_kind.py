"""Per-position class scores are told from features by the graph, and judged by per-position agreement."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_benchmark import FAST, perturbed
from test_data import VOCAB, token_model

from modelpress.compressors.benchmark import compare
from modelpress.compressors.data import load_data
from modelpress.compressors.fidelity import OutputFidelity
from modelpress.compressors.model_inputs import model_inputs
from modelpress.compressors.output_kind import output_kind

CLASSES = 5


def head_model(tail: list[str], softmax_axis: int = -1, classes: int = CLASSES, output: str = "y") -> onnx.ModelProto:
    """x [N, T, 4] -> ``tail`` ops in order, each reading the previous value, -> ``output``.
    Op names: matmul (constant weight), bias, reshape (to [N, -1, classes]), transpose (swaps the
    last two axes), swap (the first two: the last stays), layernorm, softmax, relu."""
    rng = np.random.default_rng(0)
    arrays = {"w": rng.normal(size=(4, classes)).astype(np.float32), "b": rng.normal(size=classes).astype(np.float32),
              "shape": np.array([0, -1, classes]), "g": np.ones(4, np.float32)}
    nodes, value = [], "x"
    for i, op in enumerate(tail):
        out = f"v{i}"
        nodes.append({
            "matmul": lambda v: helper.make_node("MatMul", [v, "w"], [out]),
            "bias": lambda v: helper.make_node("Add", ["b", v], [out]),
            "reshape": lambda v: helper.make_node("Reshape", [v, "shape"], [out]),
            "transpose": lambda v: helper.make_node("Transpose", [v], [out], perm=[0, 2, 1]),
            "swap": lambda v: helper.make_node("Transpose", [v], [out], perm=[1, 0, 2]),
            "layernorm": lambda v: helper.make_node("LayerNormalization", [v, "g"], [out], axis=-1),
            "softmax": lambda v: helper.make_node("Softmax", [v], [out], axis=softmax_axis),
            "relu": lambda v: helper.make_node("Relu", [v], [out]),
        }[op](value))
        value = out
    nodes.append(helper.make_node("Identity", [value], [output]))
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 4])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(a, k) for k, a in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("tail, kind", [
    (["matmul", "bias", "reshape"], "positions"),        # a tagger / CTC head: logits per position
    (["matmul", "bias", "swap", "softmax"], "positions"),  # time-major probabilities
    (["layernorm"], "auto"),                             # hidden states
    (["matmul", "relu"], "auto"),                        # an activation: features
    (["matmul", "transpose"], "auto"),                   # classes no longer on the last axis
    (["softmax"], "positions"),
])
def test_heads_are_told_from_features(tmp_path, tail, kind):
    path = tmp_path / "m.onnx"
    onnx.save(head_model(tail), path)
    assert output_kind(path) == kind
    assert output_kind(path.read_bytes(), "y") == kind


@pytest.mark.parametrize("classes, output, kind", [
    (3, "y", "auto"),          # 4 -> 3: a projection (mel frames, token vectors), not a classifier
    (4, "y", "auto"),          # 4 -> 4: an output projection
    (3, "logits", "positions"),  # exporters name classifier / CTC / tagger heads logits
])
def test_a_narrowing_projection_is_a_head_only_when_named_logits(classes, output, kind):
    assert output_kind(head_model(["matmul", "bias"], classes=classes, output=output).SerializeToString()) == kind


def test_softmax_over_another_axis_is_not_a_head():
    assert output_kind(head_model(["softmax"], softmax_axis=1).SerializeToString()) == "auto"


def embedding_model(norm: str) -> onnx.ModelProto:
    """x [N, 8] -> MatMul [8, 6] -> L2-normalized, as exporters write it: ``reducel2`` (torch's
    F.normalize: ReduceL2, Clip at eps, Expand, Div), ``sqrt`` (Sqrt(ReduceSum(x*x)), Max eps, Div),
    ``lp`` (LpNormalization), ``scale`` (a Div by a constant: not a norm)."""
    rng = np.random.default_rng(2)
    arrays = {"w": rng.normal(size=(8, 6)).astype(np.float32), "axes": np.array([1]),
              "eps": np.array(1e-12, np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["e"])]
    if norm == "reducel2":
        nodes += [helper.make_node("ReduceL2", ["e"], ["n"], axes=[1], keepdims=1),
                  helper.make_node("Clip", ["n", "eps"], ["c"]), helper.make_node("Shape", ["e"], ["s"]),
                  helper.make_node("Expand", ["c", "s"], ["d"]), helper.make_node("Div", ["e", "d"], ["y"])]
    elif norm == "sqrt":
        nodes += [helper.make_node("Mul", ["e", "e"], ["sq"]), helper.make_node("ReduceSum", ["sq", "axes"], ["ss"]),
                  helper.make_node("Sqrt", ["ss"], ["n"]), helper.make_node("Max", ["n", "eps"], ["d"]),
                  helper.make_node("Div", ["e", "d"], ["y"])]
    elif norm == "lp":
        nodes += [helper.make_node("LpNormalization", ["e"], ["y"], axis=1, p=2)]
    else:
        nodes += [helper.make_node("Div", ["e", "eps"], ["y"])]
    graph = helper.make_graph(nodes, "embed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
                              initializer=[numpy_helper.from_array(a, k) for k, a in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("norm, kind", [("reducel2", "embedding"), ("sqrt", "embedding"), ("lp", "embedding"),
                                        ("scale", "auto")])
def test_l2_normalized_vectors_are_embeddings(norm, kind):
    assert output_kind(embedding_model(norm).SerializeToString()) == kind


def test_an_embedding_is_judged_by_cosine_not_by_an_argmax(tmp_path):
    model = embedding_model("reducel2")
    changed = perturbed(model, "w", scale=0.3)
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(3).normal(size=(16, 8)).astype(np.float32))
    data = load_data(tmp_path / "d.npz", model_inputs(model))
    _, after = compare(model.SerializeToString(), changed.SerializeToString(), data, FAST)
    assert "agreement" not in after.metrics and 0.5 < after.metrics["cosine"] < 1.0


def tagger_model() -> onnx.ModelProto:
    """token_model's hidden states [N, T, 4] -> MatMul [4, CLASSES] + bias: per-token class logits."""
    model = token_model()
    rng = np.random.default_rng(3)
    model.graph.initializer.extend([numpy_helper.from_array(rng.normal(size=(4, CLASSES)).astype(np.float32), "head"),
                                    numpy_helper.from_array(rng.normal(size=CLASSES).astype(np.float32), "head_b")])
    model.graph.node.extend([helper.make_node("MatMul", ["hidden", "head"], ["mm"]),
                             helper.make_node("Add", ["mm", "head_b"], ["logits"])])
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", CLASSES]))
    onnx.checker.check_model(model)
    return model


def test_a_tagger_is_judged_by_per_position_agreement_over_real_positions(tmp_path):
    model = tagger_model()
    changed = perturbed(model, "table", scale=0.5)
    rng = np.random.default_rng(4)
    ids = rng.integers(0, VOCAB, (6, 7))
    mask = np.ones((6, 7), np.int64)
    mask[:, 5:] = 0
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=mask)
    data = load_data(tmp_path / "d.npz", model_inputs(model))
    _, after = compare(model.SerializeToString(), changed.SerializeToString(), data, FAST)

    def logits(m):
        w = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
        return (w["table"][ids] * mask[..., None]) @ w["head"] + w["head_b"]

    agree = (logits(model).argmax(-1) == logits(changed).argmax(-1))[mask.astype(bool)]
    assert 0.2 < agree.mean() < 1.0  # the perturbation flips some decisions, not all
    assert after.metrics["agreement"] == pytest.approx(agree.mean())


def test_per_position_can_be_given_per_output():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(2, 3, 4))
    candidate = reference.copy()
    candidate[0, 0] = -candidate[0, 0]  # one position's argmax moves
    as_features = OutputFidelity()
    as_features.add(reference, candidate)
    assert "agreement" not in as_features.values()
    as_scores = OutputFidelity()
    as_scores.add(reference, candidate, kind="positions")
    assert as_scores.values()["agreement"] == pytest.approx(5 / 6)
