"""The torch interpreter of ONNX graphs: parity with onnxruntime on the zoo and on tiny graphs per op
family, gradients into initializers (and k-means codebooks), and errors that name unsupported ops."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from conftest import tiny_mlp, zoo
from onnx import TensorProto, helper, numpy_helper

from modelpress.compressors.model import load_model, normalize, to_bytes
from modelpress.compressors.quantize.kmeans import KMeansConfig, KMeansQuantize
from modelpress.compressors.torch_graph import TorchGraph

RNG = np.random.default_rng(0)
F32 = TensorProto.FLOAT


def ort_run(proto_or_bytes, feeds):
    data = proto_or_bytes if isinstance(proto_or_bytes, bytes) else proto_or_bytes.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)


def torch_run(model, feeds, **kw):
    with torch.no_grad():
        return [t.numpy() for t in TorchGraph(model, **kw).run(feeds).values()]


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_models_match_onnxruntime(name, zoo_models, digits):
    x = zoo.model_input(name, digits[2])
    path = zoo_models(name)
    expected = ort_run(open(path, "rb").read(), {"input": x})[0]
    model = load_model(path)  # as loaded (Constant weights included) ...
    assert np.abs(torch_run(model, {"input": x})[0] - expected).max() < 1e-4
    normalize(model)  # ... and normalized, as passes see it
    assert np.abs(torch_run(model, {"input": x})[0] - expected).max() < 1e-4


def graph(nodes, inputs, outputs, inits=(), opset=17):
    """inputs: {name: array}; outputs: [(name, elem_type)]; inits: {name: array}."""
    def info(name, array):
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)
    model = helper.make_model(
        helper.make_graph(
            nodes, "g", [info(n, a) for n, a in inputs.items()],
            [helper.make_tensor_value_info(n, t, None) for n, t in outputs],
            initializer=[numpy_helper.from_array(a, n) for n, a in dict(inits).items()],
        ),
        opset_imports=[helper.make_opsetid("", opset)],
    )
    model.ir_version = 10 if opset >= 21 else 8
    return model  # outputs have no shapes, which onnx.checker refuses but onnxruntime accepts


def check(nodes, inputs, outputs, inits=(), opset=17, atol=1e-5):
    model = graph(nodes, inputs, outputs, inits, opset)
    expected = ort_run(model, inputs)
    got = torch_run(model, inputs)
    for e, g, (name, _) in zip(expected, got, outputs):
        assert g.shape == e.shape, name
        assert g.dtype == e.dtype, name
        np.testing.assert_allclose(g, e, atol=atol, rtol=1e-5, err_msg=name)


def x(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def node(op, ins, outs, **attrs):
    return helper.make_node(op, ins, outs, name=f"{op}_{outs[0]}", **attrs)


def test_elementwise_ops():
    a, b = x(3, 4), np.abs(x(3, 4)) + 0.5
    unary = ["Relu", "Sigmoid", "Tanh", "Erf", "Neg", "Exp", "Abs", "Floor", "Ceil", "Softplus", "Sign"]
    nodes = [node(op, ["a"], [f"u{i}"]) for i, op in enumerate(unary)]
    nodes += [node(op, ["a", "b"], [f"b{i}"]) for i, op in enumerate(["Add", "Sub", "Mul", "Div", "Max", "Min"])]
    nodes += [node("Sqrt", ["b"], ["sq"]), node("Log", ["b"], ["lg"]), node("Pow", ["b", "a"], ["pw"]),
              node("LeakyRelu", ["a"], ["lr"], alpha=0.1), node("Clip", ["a", "lo", "hi"], ["cl"]),
              node("Greater", ["a", "b"], ["gt"]), node("Less", ["a", "b"], ["lt"]), node("Equal", ["i", "j"], ["eq"]),
              node("Where", ["gt", "a", "b"], ["wh"]), node("HardSigmoid", ["a"], ["hs"]), node("Elu", ["a"], ["el"]),
              node("Div", ["i", "j"], ["idiv"]), node("PRelu", ["a", "slope"], ["pr"])]
    outs = [(f"u{i}", F32) for i in range(len(unary))] + [(f"b{i}", F32) for i in range(6)]
    outs += [("sq", F32), ("lg", F32), ("pw", F32), ("lr", F32), ("cl", F32), ("gt", TensorProto.BOOL),
             ("lt", TensorProto.BOOL), ("eq", TensorProto.BOOL), ("wh", F32), ("hs", F32), ("el", F32),
             ("idiv", TensorProto.INT64), ("pr", F32)]
    inits = {"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32), "slope": x(4)}
    ints = {"i": np.array([7, -7, 3, 0], np.int64), "j": np.array([2, 2, 3, 1], np.int64)}
    check(nodes, {"a": a, "b": b, **ints}, outs, inits)


@pytest.mark.parametrize("opset", [11, 17])
def test_softmax_family_and_reductions(opset):
    nodes = [node("Softmax", ["a"], ["sm"], axis=1), node("LogSoftmax", ["a"], ["lsm"], axis=1),
             node("ReduceMean", ["a"], ["rm"], axes=[1], keepdims=0)]
    if opset >= 13:
        nodes.append(node("ReduceSum", ["a", "ax"], ["rs"], keepdims=1))
        inits = {"ax": np.array([-1], np.int64)}
    else:
        nodes.append(node("ReduceSum", ["a"], ["rs"], axes=[-1], keepdims=1))
        inits = {}
    nodes += [node("ReduceMax", ["a"], ["rmax"], keepdims=0), node("ArgMax", ["a"], ["am"], axis=2)]
    outs = [("sm", F32), ("lsm", F32), ("rm", F32), ("rs", F32), ("rmax", F32), ("am", TensorProto.INT64)]
    check(nodes, {"a": x(2, 3, 5)}, outs, inits, opset=opset)


def test_gelu_and_layernorm_at_opset_20():
    nodes = [node("Gelu", ["a"], ["g"]), node("Gelu", ["a"], ["gt"], approximate="tanh"),
             node("LayerNormalization", ["a", "s", "b"], ["ln"], axis=-1, epsilon=1e-5),
             node("LayerNormalization", ["a", "s2"], ["ln2"], axis=1)]
    check(nodes, {"a": x(2, 3, 4)}, [("g", F32), ("gt", F32), ("ln", F32), ("ln2", F32)],
          {"s": x(4), "b": x(4), "s2": x(3, 4)}, opset=20)


def test_matmul_gemm_einsum():
    nodes = [node("MatMul", ["a3", "w"], ["mm"]),
             node("Gemm", ["a", "w", "c"], ["g0"]),
             node("Gemm", ["at", "wt", "c"], ["g1"], alpha=0.5, beta=2.0, transA=1, transB=1),
             node("Gemm", ["a", "w"], ["g2"]),
             node("Einsum", ["a", "w"], ["es"], equation="ij,jk->ik")]
    inits = {"w": x(4, 5), "wt": x(5, 4), "c": x(5)}
    check(nodes, {"a": x(3, 4), "a3": x(2, 3, 4), "at": x(4, 3)},
          [("mm", F32), ("g0", F32), ("g1", F32), ("g2", F32), ("es", F32)], inits)


def test_convolutions():
    nodes = [node("Conv", ["img", "w", "b"], ["c0"], pads=[1, 0, 2, 1], strides=[2, 1], dilations=[1, 2]),
             node("Conv", ["img", "wg"], ["c1"], group=2, auto_pad="SAME_UPPER", strides=[2, 2]),
             node("Conv", ["img", "w"], ["c2"], auto_pad="VALID"),
             node("Conv", ["seq", "w1"], ["c3"], pads=[1, 1]),
             node("ConvTranspose", ["img", "wt", "bt"], ["ct"], strides=[2, 2], pads=[1, 0, 0, 1], output_padding=[1, 1])]
    inits = {"w": x(6, 4, 3, 3), "b": x(6), "wg": x(6, 2, 3, 3), "w1": x(5, 3, 3), "wt": x(4, 3, 3, 3), "bt": x(3)}
    check(nodes, {"img": x(2, 4, 9, 8), "seq": x(2, 3, 7)},
          [("c0", F32), ("c1", F32), ("c2", F32), ("c3", F32), ("ct", F32)], inits, atol=1e-4)


def test_pooling_and_normalization():
    nodes = [node("MaxPool", ["img"], ["mp0"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 2, 1]),
             node("MaxPool", ["img"], ["mp1"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
             node("AveragePool", ["img"], ["ap0"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             node("AveragePool", ["img"], ["ap1"], kernel_shape=[3, 2], pads=[0, 1, 2, 0], count_include_pad=1),
             node("AveragePool", ["img"], ["ap2"], kernel_shape=[2, 2], strides=[2, 2]),
             node("GlobalAveragePool", ["img"], ["gap"]), node("GlobalMaxPool", ["img"], ["gmp"]),
             node("BatchNormalization", ["img", "s", "b", "m", "v"], ["bn"], epsilon=1e-3),
             node("InstanceNormalization", ["img", "s", "b"], ["inn"]),
             node("LRN", ["img"], ["lrn3"], size=3),  # GoogLeNet / AlexNet of the ONNX model zoo
             node("LRN", ["img"], ["lrn5"], size=5, alpha=0.1, beta=0.6, bias=2.0)]
    inits = {"s": x(4), "b": x(4), "m": x(4), "v": np.abs(x(4)) + 0.1}
    outs = [(n, F32) for n in ("mp0", "mp1", "ap0", "ap1", "ap2", "gap", "gmp", "bn", "inn", "lrn3", "lrn5")]
    check(nodes, {"img": x(2, 4, 7, 9)}, outs, inits, atol=1e-4)


def test_shape_ops_opset_17():
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    nodes = [node("Shape", ["a"], ["sh"]), node("Gather", ["sh", "zero"], ["n"]),
             node("Unsqueeze", ["n", "zero1"], ["n1"]), node("Concat", ["n1", "tail"], ["shape"], axis=0),
             node("Reshape", ["a", "shape"], ["r0"]), node("Reshape", ["a", "zm1"], ["r1"]),
             node("Transpose", ["a"], ["t"], perm=[2, 0, 1]), node("Flatten", ["a"], ["f"], axis=2),
             node("Squeeze", ["u", "ax1"], ["sq"]), node("Unsqueeze", ["a", "ax02"], ["us"]),
             node("Slice", ["a", "st", "en", "axs", "stp"], ["sl"]),
             node("Expand", ["b", "eshape"], ["ex"]), node("ConstantOfShape", ["eshape"], ["cs"],
                                                            value=numpy_helper.from_array(np.array([1.5], np.float32))),
             node("Range", ["r_start", "r_limit", "r_delta"], ["rg"]), node("Cast", ["a"], ["ci"], to=TensorProto.INT32),
             node("Constant", [], ["k"], value_floats=[1.0, 2.0]), node("Identity", ["a"], ["id"]),
             node("Dropout", ["a"], ["dr"]), node("Split", ["a", "parts"], ["s0", "s1"], axis=2),
             node("Tile", ["b", "reps"], ["tl"]), node("Pad", ["a", "pads", "pv"], ["pd"]),
             node("Gather", ["a", "idx"], ["ga"], axis=1), node("Size", ["a"], ["sz"])]
    inits = {"zero": np.array(0, np.int64), "zero1": i64(0), "tail": i64(-1), "zm1": i64(0, -1),
             "ax1": i64(1), "ax02": i64(0, 2), "st": i64(-1, 0), "en": i64(-100, 5), "axs": i64(1, 2),
             "stp": i64(-2, 2), "eshape": i64(2, 3, 4), "r_start": np.array(1, np.int64), "r_limit": np.array(9, np.int64),
             "r_delta": np.array(3, np.int64), "parts": i64(1, 3), "reps": i64(2, 1), "pads": i64(0, 1, 0, 0, 0, 2),
             "pv": np.array(0.5, np.float32), "idx": np.array([[2, -1], [0, 0]], np.int64)}
    names = ["sh", "r0", "r1", "t", "f", "sq", "us", "sl", "ex", "cs", "rg", "ci", "k", "id", "dr", "s0", "s1",
             "tl", "pd", "ga", "sz"]
    types = {"sh": TensorProto.INT64, "rg": TensorProto.INT64, "ci": TensorProto.INT32, "sz": TensorProto.INT64}
    check(nodes, {"a": x(2, 3, 4), "u": x(2, 1, 4), "b": x(3, 1)}, [(n, types.get(n, F32)) for n in names], inits)


def test_shape_ops_opset_11_attribute_forms():
    nodes = [node("Squeeze", ["u"], ["sq"], axes=[1]), node("Unsqueeze", ["a"], ["us"], axes=[-1, 0]),
             node("Slice", ["a", "st", "en"], ["sl"]), node("Clip", ["a", "lo"], ["cl"]),
             node("Softmax", ["a"], ["sm"])]
    inits = {"st": np.array([1], np.int64), "en": np.array([3], np.int64), "lo": np.array(0.0, np.float32)}
    check(nodes, {"a": x(2, 3, 4), "u": x(2, 1, 4)}, [(n, F32) for n in ("sq", "us", "sl", "cl", "sm")], inits, opset=11)


def test_if_runs_the_branch_its_condition_picks():
    def branch(op):
        return helper.make_graph([node(op, ["a", "w"], [f"{op}_out"])], op, [],
                                 [helper.make_tensor_value_info(f"{op}_out", F32, None)],
                                 initializer=[numpy_helper.from_array(x(4), f"{op}_w")])
    then_g, else_g = branch("Add"), branch("Mul")
    then_g.node[0].input[1], else_g.node[0].input[1] = "Add_w", "Mul_w"
    nodes = [node("ReduceSum", ["a"], ["total"], keepdims=0), node("Greater", ["total", "zero"], ["cond"]),
             node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    for sign in (1, -1):
        a = np.abs(x(2, 4)) * sign
        check(nodes, {"a": a}, [("y", F32)], {"zero": np.array(0.0, np.float32)})


def test_trainable_initializers_get_gradients_and_keep_names():
    model = ir.from_proto(tiny_mlp())
    module = TorchGraph(model, trainable=["w1", "b1"])
    assert [v.name for v, _ in module.trainable] == ["w1", "b1"]
    out = module(input=np.ones((2, 64), np.float32))["logits"]
    out.sum().backward()
    (_, w1), (_, b1) = module.trainable
    assert w1.grad is not None and w1.grad.shape == (64, 128) and b1.grad.abs().sum() > 0
    assert len(list(module.parameters())) == 2  # w2 is a constant
    with pytest.raises(ValueError, match="no initializer named 'nope'"):
        TorchGraph(model, trainable=["nope"])


def test_kmeans_lookup_runs_and_trains_the_codebook(tmp_path):
    onnx.save(tiny_mlp(), tmp_path / "m.onnx")
    model = load_model(tmp_path / "m.onnx")
    normalize(model)
    model = KMeansQuantize(KMeansConfig(bits=4, min_elements=100)).call(model).model  # uint4 indices
    feed = {"input": x(5, 64)}
    expected = ort_run(to_bytes(model), feed)[0]
    module = TorchGraph(model, trainable=["w1_kmeans_codebook"])
    out = module(**feed)["logits"]
    assert np.abs(out.detach().numpy() - expected).max() < 1e-5
    out.sum().backward()
    (_, codebook), = module.trainable
    assert codebook.shape == (16,) and codebook.grad is not None and codebook.grad.abs().sum() > 0


def test_unsupported_ops_are_all_named_at_once():
    proto = graph([node("TopK", ["a", "k"], ["v", "i"]), node("Relu", ["v"], ["r"]),
                   node("TopK", ["r", "k"], ["v2", "i2"]), node("CumSum", ["a", "axis"], ["rs"])],
                  {"a": x(2, 4)}, [("v2", F32), ("rs", F32)],
                  {"k": np.array([2], np.int64), "axis": np.array(1, np.int64)})
    custom = helper.make_node("FusedThing", ["a"], ["z"], name="fused", domain="com.example")
    proto.graph.node.append(custom)
    with pytest.raises(ValueError) as error:
        TorchGraph(proto)
    message = str(error.value)
    for part in ("TopK (nodes 'TopK_v', 'TopK_v2')", "CumSum (node 'CumSum_rs')", "com.example.FusedThing (node 'fused')"):
        assert part in message
    assert "Relu" not in message


def test_unsupported_attributes_are_named():
    proto = graph([node("ConvTranspose", ["img", "w"], ["y"], output_shape=[5, 5])], {"img": x(1, 2, 3, 3)},
                  [("y", F32)], {"w": x(2, 2, 3, 3)})
    with pytest.raises(ValueError, match="ConvTranspose node 'ConvTranspose_y': the output_shape attribute"):
        TorchGraph(proto)


@pytest.mark.parametrize("shape, pads", [
    ((2, 100), [0, 0, 0, 7]),                        # silero-vad: [batch, samples], reflect the end
    ((2, 3, 10), [0, 0, 2, 0, 0, 3]),                # last dim of a 3-D input
    ((2, 3, 6, 5), [0, 0, 1, 2, 0, 0, 3, 1]),        # last two dims of an image
    ((3, 6, 5), [0, 1, 2, 0, 3, 1]),                 # last two dims, no batch dim
    ((2, 9), [1, 2, 0, 3]),                          # every dim of a 2-D input
])
@pytest.mark.parametrize("mode", ["reflect", "edge"])
def test_reflect_and_edge_pad_on_any_rank(shape, pads, mode):
    check([node("Pad", ["a", "pads"], ["y"], mode=mode)], {"a": x(*shape)}, [("y", TensorProto.FLOAT)],
          {"pads": np.array(pads, np.int64)})


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("extras", [(), ("B", "", "h0", "c0", "P")])
def test_lstm_matches_onnxruntime(direction, extras):
    dirs, seq, batch, size, hidden = (2 if direction == "bidirectional" else 1), 5, 3, 4, 6
    inits = {"W": x(dirs, 4 * hidden, size) * 0.5, "R": x(dirs, 4 * hidden, hidden) * 0.5,
             "B": x(dirs, 8 * hidden) * 0.1, "P": x(dirs, 3 * hidden) * 0.3}
    states = {"h0": x(dirs, batch, hidden), "c0": x(dirs, batch, hidden)}
    inputs = {"X": x(seq, batch, size)}
    inputs.update({k: v for k, v in states.items() if k in extras})
    ins = ["X", "W", "R", *extras]
    lstm = node("LSTM", ins, ["Y", "Y_h", "Y_c"], hidden_size=hidden, direction=direction)
    check([lstm], inputs, [("Y", TensorProto.FLOAT), ("Y_h", TensorProto.FLOAT), ("Y_c", TensorProto.FLOAT)],
          {k: v for k, v in inits.items() if k in ins}, opset=14)


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
@pytest.mark.parametrize("before_reset", [0, 1])
def test_gru_matches_onnxruntime(direction, before_reset):
    dirs, hidden = (2 if direction == "bidirectional" else 1), 5
    inits = {"W": x(dirs, 3 * hidden, 4) * 0.5, "R": x(dirs, 3 * hidden, hidden) * 0.5, "B": x(dirs, 6 * hidden) * 0.1}
    gru = node("GRU", ["X", "W", "R", "B", "", "h0"], ["Y", "Y_h"], hidden_size=hidden, direction=direction,
               linear_before_reset=before_reset)
    check([gru], {"X": x(7, 2, 4), "h0": x(dirs, 2, hidden)}, [("Y", TensorProto.FLOAT), ("Y_h", TensorProto.FLOAT)],
          inits, opset=14)


def test_lstm_with_clip_is_refused_by_name():
    model = graph([node("LSTM", ["X", "W", "R"], ["Y"], hidden_size=2, clip=1.0)], {"X": x(3, 1, 2)},
                  [("Y", TensorProto.FLOAT)], {"W": x(1, 8, 2), "R": x(1, 8, 2)})
    with pytest.raises(ValueError, match="LSTM node 'LSTM_Y': clip is not supported"):
        TorchGraph(model)


@pytest.mark.parametrize("ctm, nearest", [("asymmetric", "floor"), ("half_pixel", "round_prefer_floor")])
@pytest.mark.parametrize("by_sizes", [False, True])
def test_nearest_resize_by_whole_factors(ctm, nearest, by_sizes):
    """YOLOv8's and PP-OCR's FPN upsampling (nearest, x2) matches onnxruntime; bilinear is refused."""
    inits = {"roi": np.zeros(0, np.float32)}
    if by_sizes:
        inits.update(scales=np.zeros(0, np.float32), sizes=np.array([2, 3, 8, 12], np.int64))
    else:
        inits["scales"] = np.array([1, 1, 2, 3], np.float32)
    resize = node("Resize", ["a", "roi", "scales", *(["sizes"] if by_sizes else [])], ["y"], mode="nearest",
                  coordinate_transformation_mode=ctm, nearest_mode=nearest)
    check([resize], {"a": x(2, 3, 4, 4)}, [("y", TensorProto.FLOAT)], inits)
    linear = graph([node("Resize", ["a", "roi", "scales"], ["y"], mode="linear")], {"a": x(1, 1, 2, 2)},
                   [("y", TensorProto.FLOAT)], {"roi": np.zeros(0, np.float32), "scales": np.array([1, 1, 2, 2], np.float32)})
    with pytest.raises(ValueError, match="Resize node 'Resize_y': mode 'linear'"):
        TorchGraph(linear)
