"""The structured pass: dependency groups on graphs with residual Adds, Concats, depthwise Convs,
BatchNorm, Flatten/Reshape -> Gemm and an Erf-GELU FFN; exact outputs when nothing (or only all-zero
units) is removed; parameter counts that shrink by the counted amounts; the reasons for what is left
alone; the same bytes twice; and the digits CNN pruned by half and recovered within 1 pp."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from modelpress.compressors.model import check_model, load_model, normalize, to_bytes
from modelpress.compressors.pipeline import PassContext, run_passes
from modelpress.compressors.prune.recover import Recover, RecoverConfig
from modelpress.compressors.prune.structured import (
    StructuredConfig,
    StructuredPrune,
    kept_count,
)
from modelpress.compressors.registry import PASSES
from modelpress.compressors.prune.structured_place import constant
from onnx import TensorProto, helper, numpy_helper


def _conv(rng, out, cin, k=3):
    return rng.normal(0, 0.3, (out, cin, k, k)).astype(np.float32), rng.normal(0, 0.1, out).astype(np.float32)


def residual_cnn(zero_channels=(), seed=0) -> onnx.ModelProto:
    """x[N,3,8,8] -> conv_a(8)+BN+Relu =r ; conv_b(8) ; Add(r) ; Relu ; depthwise(8) ; Concat with
    conv_c(4) (channel offset 8) ; conv_d(6) ; Relu ; Flatten(6*8*8) ; Gemm -> logits[N,5].
    ``zero_channels`` of conv_a/conv_b/depthwise are made exactly 0 downstream (weights, biases,
    BatchNorm shift and mean), so removing them changes nothing."""
    rng = np.random.default_rng(seed)
    wa, ba = _conv(rng, 8, 3)
    wb, bb = _conv(rng, 8, 8)
    wdw, bdw = _conv(rng, 8, 1)
    wc, bc = _conv(rng, 4, 8)
    wd, bd = _conv(rng, 6, 12)
    gamma = rng.uniform(0.5, 1.5, 8).astype(np.float32)
    beta = rng.normal(0, 0.1, 8).astype(np.float32)
    mean = rng.normal(0, 0.1, 8).astype(np.float32)
    var = rng.uniform(0.5, 1.5, 8).astype(np.float32)
    for c in zero_channels:
        for array in (wa, ba, wb, bb, wdw, bdw, beta, mean):
            array[c] = 0
    wg = rng.normal(0, 0.1, (5, 6 * 64)).astype(np.float32)
    bg = rng.normal(0, 0.1, 5).astype(np.float32)
    inits = {"wa": wa, "ba": ba, "gamma": gamma, "beta": beta, "mean": mean, "var": var, "wb": wb, "bb": bb,
             "wdw": wdw, "bdw": bdw, "wc": wc, "bc": bc, "wd": wd, "bd": bd, "wg": wg, "bg": bg}
    pads = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=pads),
        helper.make_node("BatchNormalization", ["a", "gamma", "beta", "mean", "var"], ["a_bn"], name="bn_a"),
        helper.make_node("Relu", ["a_bn"], ["r"], name="relu_a"),
        helper.make_node("Conv", ["r", "wb", "bb"], ["b"], name="conv_b", pads=pads),
        helper.make_node("Add", ["b", "r"], ["res"], name="residual"),
        helper.make_node("Relu", ["res"], ["res_r"], name="relu_res"),
        helper.make_node("Conv", ["res_r", "wdw", "bdw"], ["dw"], name="depthwise", pads=pads, group=8),
        helper.make_node("Conv", ["res_r", "wc", "bc"], ["c"], name="conv_c", pads=pads),
        helper.make_node("Concat", ["dw", "c"], ["cat"], name="concat", axis=1),
        helper.make_node("Conv", ["cat", "wd", "bd"], ["d"], name="conv_d", pads=pads),
        helper.make_node("Relu", ["d"], ["d_r"], name="relu_d"),
        helper.make_node("Flatten", ["d_r"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "wg", "bg"], ["logits"], name="head", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "residual_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def gelu_ffn(seed=0, constant_units=0) -> onnx.ModelProto:
    """x[N,6,16] -> MatMul 16x32 -> Add b -> Erf GELU -> MatMul 32x16 -> Add -> residual Add x -> out
    (the FFN intermediate units are prunable, the residual width is not: it is a graph input)."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.3, (16, 32)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 32).astype(np.float32)
    w1[:, :constant_units] = 0  # these units output GELU(b1): a constant, not zero
    b1[:constant_units] = 0.5
    w2 = rng.normal(0, 0.3, (32, 16)).astype(np.float32)
    b2 = rng.normal(0, 0.1, 16).astype(np.float32)
    scalars = {"sqrt2": np.array(1.4142135, np.float32), "one": np.array(1.0, np.float32),
               "half": np.array(0.5, np.float32)}
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["b1", "h"], ["hb"], name="fc1_bias"),
        helper.make_node("Div", ["hb", "sqrt2"], ["d"], name="gelu_div"),
        helper.make_node("Erf", ["d"], ["e"], name="gelu_erf"),
        helper.make_node("Add", ["e", "one"], ["e1"], name="gelu_add"),
        helper.make_node("Mul", ["hb", "e1"], ["m"], name="gelu_mul"),
        helper.make_node("Mul", ["m", "half"], ["g"], name="gelu_half"),
        helper.make_node("MatMul", ["g", "w2"], ["o"], name="fc2"),
        helper.make_node("Add", ["o", "b2"], ["ob"], name="fc2_bias"),
        helper.make_node("Add", ["x", "ob"], ["out"], name="residual"),
    ]
    inits = {"w1": w1, "b1": b1, "w2": w2, "b2": b2, **scalars}
    graph = helper.make_graph(
        nodes, "gelu_ffn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6, 16])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 6, 16])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def model_of(nodes, inputs, outputs, arrays) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs,
                              initializer=[numpy_helper.from_array(a, k) for k, a in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def image(name, channels):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", channels, 8, 8])


def skip_reasons(proto, tmp_path) -> dict[str, str]:
    result = prune(proto, tmp_path, ratio=0.5)
    assert not result.modified
    return {s["group"]: s["reason"] for s in result.stats["skipped"]}


def prune(proto, tmp_path, calibration=None, **config):
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    model = load_model(path)
    normalize(model)
    context = PassContext(calibration=calibration, seed=0)
    config.setdefault("round_to", 1)  # the default (8) would keep every channel of these small layers
    result = StructuredPrune(StructuredConfig(**config), context).call(model)
    check_model(result.model)  # onnx checker + an onnxruntime session
    return result


def run(model, feed):
    data = to_bytes(model) if not isinstance(model, onnx.ModelProto) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def shapes(model):
    return {v.name: tuple(v.const_value.shape) for v in model.graph.initializers.values()}


X_IMAGE = {"x": np.random.default_rng(5).normal(size=(4, 3, 8, 8)).astype(np.float32)}
X_TOKENS = {"x": np.random.default_rng(6).normal(size=(3, 6, 16)).astype(np.float32)}


def test_registered():
    assert PASSES["prune"]["structured"] is StructuredPrune


def test_groups_shapes_and_parameter_counts(tmp_path):
    result = prune(residual_cnn(), tmp_path, ratio=0.5, criterion="l2")
    stats = result.stats
    # conv_a and conv_b are tied by the residual Add (the depthwise conv follows them): one group.
    assert stats["per_group"] == {"wa, wb": "4/8", "wc": "2/4", "wd": "3/6"}
    assert [s["group"] for s in stats["skipped"]] == ["wg"] and "graph output" in stats["skipped"][0]["reason"]
    after = shapes(result.model)
    assert after["wa"] == (4, 3, 3, 3) and after["gamma"] == (4,) and after["var"] == (4,)
    assert after["wb"] == (4, 4, 3, 3) and after["bb"] == (4,)
    assert after["wdw"] == (4, 1, 3, 3) and after["bdw"] == (4,)
    assert after["wc"] == (2, 4, 3, 3)
    assert after["wd"] == (3, 6, 3, 3)  # inputs: 4 depthwise + 2 conv_c channels of the Concat
    assert after["wg"] == (5, 3 * 64)  # Flatten: each channel is 64 consecutive features
    depthwise = next(n for n in result.model.graph if n.name == "depthwise")
    assert depthwise.attributes["group"].value == 4
    before = sum(int(np.prod(s)) for s in shapes(load_model_from(residual_cnn(), tmp_path)).values())
    expected = (4 * 27 + 4 + 4 * 4) + (4 * 36 + 4) + (4 * 9 + 4) + (2 * 36 + 2) + (3 * 54 + 3) + (5 * 192 + 5)
    assert stats["parameters_before"] == before and stats["parameters_after"] == expected
    assert run(result.model, X_IMAGE).shape == (4, 5)


def load_model_from(proto, tmp_path):
    path = tmp_path / "orig.onnx"
    onnx.save(proto, path)
    return load_model(path)


def test_ratio_zero_is_exact(tmp_path):
    proto = residual_cnn()
    result = prune(proto, tmp_path, ratio=0.0)
    assert not result.modified and result.stats["groups_pruned"] == 0
    np.testing.assert_allclose(run(result.model, X_IMAGE), run(proto, X_IMAGE), atol=1e-5)


@pytest.mark.parametrize("criterion", ["l1", "l2", "activation"])
def test_removing_all_zero_channels_keeps_outputs(tmp_path, criterion):
    proto = residual_cnn(zero_channels=(1, 4, 5, 7))
    calibration = [X_IMAGE] if criterion == "activation" else None
    # Only the tied group loses channels: exactly its 4 all-zero ones (conv_c and conv_d are excluded).
    result = prune(proto, tmp_path, calibration, ratio=0.5, criterion=criterion, exclude=("wc", "wd"))
    assert result.stats["per_group"]["wa, wb"] == "4/8"
    np.testing.assert_allclose(run(result.model, X_IMAGE), run(proto, X_IMAGE), atol=1e-5)


def test_gelu_ffn_hidden_units(tmp_path):
    proto = gelu_ffn()
    result = prune(proto, tmp_path, [X_TOKENS], ratio=0.75)
    after = shapes(result.model)
    assert after["w1"] == (16, 8) and after["b1"] == (8,) and after["w2"] == (8, 16)
    assert after["b2"] == (16,) and after["sqrt2"] == ()
    skipped = {s["group"]: s["reason"] for s in result.stats["skipped"]}
    assert "graph output" in skipped["w2"]
    same = prune(proto, tmp_path, [X_TOKENS], ratio=0.0)
    np.testing.assert_allclose(run(same.model, X_TOKENS), run(proto, X_TOKENS), atol=1e-5)


def test_attention_heads_and_ffn_units_of_an_exported_encoder(tmp_path):
    """The zoo's encoder (torch export: Reshape to heads, Transpose, MatMul q.kT, Softmax, MatMul v,
    merge back, Erf GELU FFN), untrained, with head 1 and FFN units 0-15 made all-zero: a quarter of
    the heads and units go, and those are exactly the zero ones, so the outputs do not change."""
    import torch
    from conftest import zoo

    torch.manual_seed(0)
    net = zoo.Transformer(d=32, layers=1, heads=4, ffn=64).eval()
    layer = net.layers[0]
    with torch.no_grad():
        for linear in (layer.q, layer.k, layer.v):
            linear.weight[8:16] = 0
            linear.bias[8:16] = 0
        layer.ffn[0].weight[:16] = 0
        layer.ffn[0].bias[:16] = 0
    path = zoo._export(net, torch.zeros(1, 64), tmp_path / "encoder.onnx")
    proto = onnx.load(path)
    feed = {"input": np.random.default_rng(9).random((5, 64), dtype=np.float32)}
    for criterion in ("l2", "activation"):
        result = prune(proto, tmp_path, [feed], ratio=0.25, criterion=criterion)
        kept = sorted(result.stats["per_group"].items())
        assert [k for _, k in kept] == ["3/4", "48/64"] and "units of 8 channels" in kept[0][0]
        np.testing.assert_allclose(run(result.model, feed), run(proto, feed), atol=1e-5)
    sizes = sorted(shapes(result.model).values())
    assert (32, 24) in sizes and (24, 32) in sizes and (32, 48) in sizes and (48, 32) in sizes


def test_constant_units_are_folded_into_the_next_bias(tmp_path):
    """Units whose output is a constant carry no information: with --data they are the ones removed
    (their centred activation is 0) and their constant contribution moves into the fc2 bias, so the
    output is unchanged; without compensation it changes."""
    proto = gelu_ffn(constant_units=8)
    kept = prune(proto, tmp_path, [X_TOKENS], ratio=0.25)
    assert shapes(kept.model)["w1"] == (16, 24) and kept.stats["compensated_biases"] == 1
    np.testing.assert_allclose(run(kept.model, X_TOKENS), run(proto, X_TOKENS), atol=1e-5)
    dropped = prune(proto, tmp_path, [X_TOKENS], ratio=0.25, compensate=False, criterion="l2")
    assert np.abs(run(dropped.model, X_TOKENS) - run(proto, X_TOKENS)).max() > 0.1


def test_reshape_flatten_and_global_pool(tmp_path):
    """Conv -> GlobalAveragePool -> Reshape [-1, 8] -> Gemm: the target becomes [0, -1]."""
    rng = np.random.default_rng(2)
    w, b = _conv(rng, 8, 3)
    wg = rng.normal(0, 0.3, (8, 4)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c"], ["p"]),
             helper.make_node("Reshape", ["p", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "wg"], ["logits"])]
    proto = model_of(nodes, [image("x", 3)], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
                     {"w": w, "b": b, "wg": wg, "shape": np.array([-1, 8])})
    result = prune(proto, tmp_path, ratio=0.5, criterion="l1")
    assert shapes(result.model)["wg"] == (4, 4) and shapes(result.model)["w"] == (4, 3, 3, 3)
    assert "shape" not in shapes(result.model)  # the old target, now unused, is gone
    assert run(result.model, X_IMAGE).shape == (4, 4)


def test_unprunable_groups_are_listed_with_reasons(tmp_path):
    """A conv whose output is also a graph output, and one read by an op the walk does not know."""
    rng = np.random.default_rng(3)
    w1, b1 = _conv(rng, 4, 3)
    w2, b2 = _conv(rng, 4, 3)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="exposed", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w2", "b2"], ["c2"], name="odd", pads=[1, 1, 1, 1]),
             helper.make_node("LpNormalization", ["c2"], ["n"], name="lpnorm", axis=1)]
    proto = model_of(nodes, [image("x", 3)], [image("c1", 4), image("n", 4)],
                     {"w1": w1, "b1": b1, "w2": w2, "b2": b2})
    reasons = skip_reasons(proto, tmp_path)
    assert "graph output 'c1'" in reasons["w1"]
    assert "LpNormalization node 'lpnorm'" in reasons["w2"]


def test_residual_with_graph_input_and_subgraph_use_are_left_alone(tmp_path):
    """Add(conv(x), x) cannot lose channels of the graph input; a value read inside an If branch
    cannot change shape under the branch's feet."""
    rng = np.random.default_rng(4)
    w1, b1 = _conv(rng, 3, 3)
    w2, b2 = _conv(rng, 4, 3)
    then_branch = helper.make_graph([helper.make_node("Identity", ["c2"], ["t"])], "then", [], [image("t", 4)])
    else_branch = helper.make_graph([helper.make_node("Neg", ["c2"], ["e"])], "else", [], [image("e", 4)])
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c1", "x"], ["res"], name="skip"),
             helper.make_node("Conv", ["res", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("If", ["flag"], ["out"], name="branch", then_branch=then_branch,
                              else_branch=else_branch)]
    flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, [])
    proto = model_of(nodes, [image("x", 3), flag], [image("out", 4)], {"w1": w1, "b1": b1, "w2": w2, "b2": b2})
    reasons = skip_reasons(proto, tmp_path)
    assert "node 'skip' ties these channels to 'x'" in reasons["w1"]
    assert "inside an If/Loop/Scan subgraph" in reasons["w2"]


def test_shared_bias_gets_a_copy(tmp_path):
    """Two Gemms share one bias (one of them through an Identity, as the torch exporter writes equal
    initializers); only the first is prunable: it gets a sliced copy, the second keeps the original."""
    rng = np.random.default_rng(7)
    arrays = {"w1": rng.normal(size=(8, 16)), "w2": rng.normal(size=(8, 16)), "b": rng.normal(size=8),
              "head": rng.normal(size=(3, 8))}
    nodes = [helper.make_node("Identity", ["b"], ["b_alias"]),
             helper.make_node("Gemm", ["x", "w1", "b_alias"], ["g1"], transB=1),
             helper.make_node("Relu", ["g1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "head"], ["out1"], transB=1),
             helper.make_node("Gemm", ["x", "w2", "b"], ["out2"], transB=1)]
    proto = model_of(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                     [helper.make_tensor_value_info("out1", TensorProto.FLOAT, ["N", 3]),
                      helper.make_tensor_value_info("out2", TensorProto.FLOAT, ["N", 8])],
                     {k: a.astype(np.float32) for k, a in arrays.items()})
    result = prune(proto, tmp_path, ratio=0.5, criterion="l2")
    after = shapes(result.model)
    assert result.stats["per_group"] == {"w1": "4/8"} and result.stats["copied"] == ["b_alias"]
    assert after["w1"] == (4, 16) and after["b"] == (8,) and after["b_alias_pruned"] == (4,)
    assert not any(n.op_type == "Identity" for n in result.model.graph)  # nothing reads it any more
    feed = {"x": np.random.default_rng(8).normal(size=(5, 16)).astype(np.float32)}
    session = ort.InferenceSession(to_bytes(result.model), providers=["CPUExecutionProvider"])
    original = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["out2"], feed)[0], original.run(["out2"], feed)[0], atol=1e-5)


def test_round_to_min_channels_and_globs(tmp_path):
    assert kept_count(300, StructuredConfig(ratio=0.5, round_to=8)) == 152
    assert kept_count(12, StructuredConfig(ratio=0.5)) == 8  # default round_to 8
    assert kept_count(6, StructuredConfig(ratio=0.5)) == 6  # never more than there are
    assert kept_count(10, StructuredConfig(ratio=0.9, min_channels=4, round_to=1)) == 4
    result = prune(residual_cnn(), tmp_path, ratio=0.5, criterion="l1", exclude=("wc",))
    assert "wc" not in result.stats["per_group"]
    assert any(s["group"] == "wc" and "globs" in s["reason"] for s in result.stats["skipped"])


def test_same_bytes_twice(tmp_path):
    calibration = [X_IMAGE]
    first = to_bytes(prune(residual_cnn(), tmp_path, calibration, ratio=0.5).model)
    second = to_bytes(prune(residual_cnn(), tmp_path, calibration, ratio=0.5).model)
    assert first == second


def test_digits_cnn_half_the_channels_then_recovered(zoo_models, digits):
    """Half of every prunable channel group of the digits CNN, then distillation: within 1 pp."""
    x_train, _, x_test, y_test = digits
    from conftest import zoo

    model = load_model(zoo_models("cnn"))
    normalize(model)
    original = to_bytes(model)
    images = zoo.model_input("cnn", x_train)
    context = PassContext(calibration=[{"input": images[i:i + 512]} for i in range(0, len(images), 512)],
                          original=original, seed=0)
    # 15 epochs (~320 steps) instead of the default ~1000 steps: enough here, and a third of the time.
    passes = [StructuredPrune(StructuredConfig(ratio=0.5), context), Recover(RecoverConfig(epochs=15), context)]
    pruned, records = run_passes(model, passes)
    feed = {"input": zoo.model_input("cnn", x_test)}
    base = float((run(onnx.load_model_from_string(original), feed).argmax(1) == y_test).mean())
    after = float((run(pruned, feed).argmax(1) == y_test).mean())
    stats = records[0].stats
    assert stats["per_group"] == {"features.0.weight": "16/32", "features.3.weight": "32/64"}
    assert stats["parameters_after"] < 0.36 * stats["parameters_before"]
    assert base - after <= 0.01, (base, after)


def test_paddle_bias_adds_are_followed_and_new_biases_are_cut(tmp_path):
    """paddle2onnx writes Conv biases as Add(conv, Reshape(offset, [1, C, 1, 1])): normalize folds the
    Reshape into the offset, so the group is found; a bias created to hold removed channels' means
    is cut when its own layer loses output channels too. Channels 4-7 of conv a and b are constant
    (zero weights), so removing them with compensation leaves the output unchanged."""
    rng = np.random.default_rng(3)
    arrays = {}
    nodes = []
    source, cin = "x", 3
    for name, out in (("a", 8), ("b", 8), ("c", 4)):
        weight = rng.normal(0, 0.3, (out, cin, 1, 1)).astype(np.float32)  # 1x1: no padded border, so
        if name != "c":  # a constant channel's contribution is a constant (a bias) everywhere
            weight[4:] = 0
        arrays[f"w_{name}"], arrays[f"offset_{name}"] = weight, rng.normal(0, 0.5, out).astype(np.float32)
        arrays[f"shape_{name}"] = np.array([1, out, 1, 1], np.int64)
        nodes += [helper.make_node("Conv", [source, f"w_{name}"], [f"conv_{name}"]),
                  helper.make_node("Reshape", [f"offset_{name}", f"shape_{name}"], [f"bias_{name}"]),
                  helper.make_node("Add", [f"conv_{name}", f"bias_{name}"], [f"sum_{name}"])]
        if name != "c":
            nodes.append(helper.make_node("Relu", [f"sum_{name}"], [f"act_{name}"]))
        source, cin = f"act_{name}", out
    proto = model_of(nodes, [image("x", 3)], [image("sum_c", 4)], arrays)
    result = prune(proto, tmp_path, [X_IMAGE], ratio=0.5, criterion="activation")
    assert not [n for n in result.model.graph if n.op_type == "Reshape"]
    sizes = shapes(result.model)
    assert sizes["w_a"] == (4, 3, 1, 1) and sizes["w_b"] == (4, 4, 1, 1) and sizes["w_c"] == (4, 4, 1, 1)
    assert result.stats["compensated_biases"] == 2
    np.testing.assert_allclose(run(result.model, X_IMAGE), run(proto, X_IMAGE), atol=1e-5)


def _spatial_chain(opset: int, channel_crop: bool = False) -> onnx.ModelProto:
    """conv_1(6, channels 1, 3, 4 all-zero) -> Slice (crops H, W) -> Pad (H, W) -> Resize 2x -> conv_2:
    the neck of detectors and U-Nets. ``channel_crop``: the Slice also drops the last channel."""
    rng = np.random.default_rng(8)
    w1, b1 = _conv(rng, 6, 3)
    w1[[1, 3, 4]], b1[[1, 3, 4]] = 0, 0
    w2, b2 = _conv(rng, 4, 5 if channel_crop else 6)
    arrays = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
    axes = [1, 2, 3] if channel_crop else [2, 3]
    crop = {"starts": [0, 1, 1] if channel_crop else [1, 1], "ends": [5, 7, 7] if channel_crop else [7, 7]}
    if opset >= 11:
        arrays.update({"starts": np.array(crop["starts"]), "ends": np.array(crop["ends"]), "axes": np.array(axes),
                       "pads": np.array([0, 0, 1, 1, 0, 0, 1, 1]), "scales": np.array([1, 1, 2, 2], np.float32)})
        spatial = [helper.make_node("Slice", ["r", "starts", "ends", "axes"], ["s"], name="crop"),
                   helper.make_node("Pad", ["s", "pads"], ["p"], name="pad"),
                   helper.make_node("Resize", ["p", "", "scales"], ["u"], name="up", mode="nearest")]
    else:  # opset 9: Slice and Pad parameters are attributes, the 2x upsample is Upsample
        arrays["scales"] = np.array([1, 1, 2, 2], np.float32)
        spatial = [helper.make_node("Slice", ["r"], ["s"], name="crop", axes=axes, **crop),
                   helper.make_node("Pad", ["s"], ["p"], name="pad", pads=[0, 0, 1, 1, 0, 0, 1, 1]),
                   helper.make_node("Upsample", ["p", "scales"], ["u"], name="up", mode="nearest")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv_1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), *spatial,
             helper.make_node("Conv", ["u", "w2", "b2"], ["y"], name="conv_2")]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 14, 14])
    graph = helper.make_graph(nodes, "spatial", [image("x", 3)], [out],
                              initializer=[numpy_helper.from_array(a, k) for k, a in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [9, 17])
def test_channels_pass_through_crops_pads_and_upsampling(tmp_path, opset):
    proto = _spatial_chain(opset)
    result = prune(proto, tmp_path, ratio=0.5, criterion="l1")
    assert result.stats["per_group"] == {"w1": "3/6"}
    assert shapes(result.model)["w2"] == (4, 3, 3, 3)
    # The removed channels were all zero (and Pad fills zeros): the output is the same.
    np.testing.assert_allclose(run(result.model, X_IMAGE), run(proto, X_IMAGE), atol=1e-5)


def test_a_slice_that_crops_channels_stops_the_group(tmp_path):
    assert "Slice node 'crop': it crops the channel axis" in skip_reasons(_spatial_chain(17, True), tmp_path)["w1"]


def _c2f(opset: int) -> onnx.ModelProto:
    """YOLOv8's C2f block: conv_1(8) -> SiLU -> Split in halves a, b; b -> conv_2 -> SiLU -> conv_3,
    residual Add to b = c; Concat(a, b, c) -> conv_4. conv_1's channels 1, 2 (in a) and 5 (in b), and
    conv_3's channel 1 (added to b's channel 5) are all zero, and so is conv_2's channel 3. The split
    sizes: an attribute (opset 11), a constant input (13), none with ``num_outputs`` (18)."""
    rng = np.random.default_rng(9)
    w1, b1 = _conv(rng, 8, 3)
    w2, b2 = _conv(rng, 4, 4)
    w3, b3 = _conv(rng, 4, 4)
    w4, b4 = _conv(rng, 5, 12)
    w1[[1, 2, 5]], b1[[1, 2, 5]], w3[1], b3[1], w2[3], b2[3] = 0, 0, 0, 0, 0, 0
    arrays = {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3, "b3": b3, "w4": w4, "b4": b4}
    if opset == 11:
        split = helper.make_node("Split", ["s1"], ["a", "b"], name="split", axis=1, split=[4, 4])
    elif opset == 13:
        arrays["sizes"] = np.array([4, 4], np.int64)
        split = helper.make_node("Split", ["s1", "sizes"], ["a", "b"], name="split", axis=1)
    else:
        split = helper.make_node("Split", ["s1"], ["a", "b"], name="split", axis=1, num_outputs=2)

    def silu(x, y):
        return [helper.make_node("Sigmoid", [x], [f"{y}_sig"]), helper.make_node("Mul", [x, f"{y}_sig"], [y])]

    pads = [1, 1, 1, 1]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv_1", pads=pads), *silu("c1", "s1"), split,
             helper.make_node("Conv", ["b", "w2", "b2"], ["c2"], name="conv_2", pads=pads), *silu("c2", "s2"),
             helper.make_node("Conv", ["s2", "w3", "b3"], ["c3"], name="conv_3", pads=pads),
             helper.make_node("Add", ["b", "c3"], ["c"], name="residual"),
             helper.make_node("Concat", ["a", "b", "c"], ["cat"], name="concat", axis=1),
             helper.make_node("Conv", ["cat", "w4", "b4"], ["y"], name="conv_4")]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 6, 6])
    graph = helper.make_graph(nodes, "c2f", [image("x", 3)], [out],
                              initializer=[numpy_helper.from_array(a, k) for k, a in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_a_split_layer_is_pruned_part_by_part(tmp_path, opset):
    proto = _c2f(opset)
    onnx.checker.check_model(proto)
    result = prune(proto, tmp_path, ratio=0.25, criterion="l1", compensate=False)
    # conv_1 is two groups: channels 0-3 alone, 4-7 tied to conv_3 by the residual Add.
    assert result.stats["per_group"] == {"w1[0:4]": "3/4", "w1[4:8], w3": "3/4", "w2": "3/4"}
    sizes = shapes(result.model)
    assert sizes["w1"] == (6, 3, 3, 3) and sizes["w3"] == (3, 3, 3, 3) and sizes["w4"] == (5, 9, 3, 3)
    split = next(n for n in result.model.graph if n.op_type == "Split")
    given = split.attributes["split"].value if opset == 11 else constant(split.inputs[1]).tolist()
    assert list(given) == [3, 3]
    # Only all-zero channels went (removing a zero channel of a, b, c changes nothing): same output.
    np.testing.assert_allclose(run(result.model, X_IMAGE), run(proto, X_IMAGE), atol=1e-5)


def test_transposed_convs_lose_input_and_output_channels(tmp_path):
    """conv_1(6, channels 1 and 3 zero) -> Relu -> ConvTranspose 2x2 stride 2 (6 -> 4, its output channel
    2 zero) -> Relu -> conv_2: DBNet's upsampling head. Both layers lose the zero channels only."""
    rng = np.random.default_rng(10)
    w1, b1 = _conv(rng, 6, 3)
    w1[[1, 3]], b1[[1, 3]] = 0, 0
    wt = rng.normal(0, 0.3, (6, 4, 2, 2)).astype(np.float32)  # [C_in, C_out, k, k]
    bt = rng.normal(0, 0.1, 4).astype(np.float32)
    wt[:, 2], bt[2] = 0, 0
    w2, b2 = _conv(rng, 3, 4)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv_1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("ConvTranspose", ["r", "wt", "bt"], ["u"], name="up", strides=[2, 2]),
             helper.make_node("Relu", ["u"], ["ur"]),
             helper.make_node("Conv", ["ur", "w2", "b2"], ["y"], name="conv_2")]
    proto = model_of(nodes, [image("x", 3)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 14, 14])],
                     {"w1": w1, "b1": b1, "wt": wt, "bt": bt, "w2": w2, "b2": b2})
    onnx.checker.check_model(proto)
    result = prune(proto, tmp_path, ratio=0.25, criterion="l1")
    assert result.stats["per_group"] == {"w1": "5/6", "wt": "3/4"}
    sizes = shapes(result.model)
    assert sizes["w1"] == (5, 3, 3, 3) and sizes["wt"] == (5, 3, 2, 2) and sizes["bt"] == (3,) and sizes["w2"] == (3, 3, 3, 3)
    np.testing.assert_allclose(run(result.model, X_IMAGE), run(proto, X_IMAGE), atol=1e-5)


def test_a_constant_channel_into_a_transposed_conv_is_folded_on_average(tmp_path):
    """A channel that outputs a constant 0.5 into a stride-1 ConvTranspose with full overlap: folding
    its mean into the bias is exact away from the borders (each interior position gets every tap)."""
    rng = np.random.default_rng(11)
    w1, b1 = _conv(rng, 4, 3)
    w1[0], b1[0] = 0, 0.5
    wt = rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    w2, b2 = _conv(rng, 2, 3, k=1)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c"], name="conv_1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("ConvTranspose", ["r", "wt"], ["u"], name="up", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["u", "w2", "b2"], ["y"], name="conv_2")]
    proto = model_of(nodes, [image("x", 3)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 8, 8])],
                     {"w1": w1, "b1": b1, "wt": wt, "w2": w2, "b2": b2})
    result = prune(proto, tmp_path, calibration=[X_IMAGE], ratio=0.25, include=("w1",))
    assert result.stats["per_group"] == {"w1": "3/4"} and result.stats["compensated_biases"] == 1
    got, want = run(result.model, X_IMAGE), run(proto, X_IMAGE)
    np.testing.assert_allclose(got[:, :, 1:-1, 1:-1], want[:, :, 1:-1, 1:-1], atol=1e-5)
    assert np.abs(got - want).max() > 1e-3  # the borders see fewer taps: the fold is an average there


def test_sensitivity_is_measured_as_the_pruned_model_computes(tmp_path):
    """allocation: sensitivity measures each group without rebuilding the graph (consumer inputs zeroed,
    means folded into their biases): each measured change equals that of the model really pruned so."""
    proto = residual_cnn()
    calibration = [{"x": np.random.default_rng(12).normal(size=(16, 3, 8, 8)).astype(np.float32)}]
    result = prune(proto, tmp_path, calibration=calibration, ratio=0.5, allocation="sensitivity")
    allocation = result.stats["allocation"]
    reference = run(proto, calibration[0])
    for label, curve in allocation["curves"].items():
        names = tuple(label.split(", "))
        for level, measured in zip(allocation["levels"], curve):
            pruned = prune(proto, tmp_path, calibration=calibration, ratio=level, include=names)
            change = run(pruned.model, calibration[0]) - reference
            assert measured == pytest.approx(float((change ** 2).sum() / (reference ** 2).sum()), rel=1e-3, abs=1e-9), (label, level)
    # The groups lose different shares, and no more estimated time is left than uniform 50 % leaves.
    ratios = allocation["ratios"]
    assert len(set(ratios.values())) > 1 and all(0 <= r <= 0.75 for r in ratios.values())
    assert allocation["cost"] == "latency" and allocation["left"] <= allocation["left_uniform"]
    uniform = prune(proto, tmp_path, calibration=calibration, ratio=0.5)
    error = {name: float(((run(r.model, calibration[0]) - reference) ** 2).sum()) for name, r in
             (("sensitivity", result), ("uniform", uniform))}
    assert error["sensitivity"] < error["uniform"]


def test_sensitivity_without_data_falls_back_to_uniform(tmp_path):
    result = prune(residual_cnn(), tmp_path, ratio=0.5, allocation="sensitivity")
    assert "allocation: sensitivity needs --data: every group lost the same ratio" in result.stats["notes"]
    assert "allocation" not in result.stats
