"""Model I/O: clear errors on broken files, exporter quirks normalized, atomic saves."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import tiny_mlp
from onnx import TensorProto, helper, numpy_helper

from modelpress.compressors.errors import InputError
from modelpress.compressors.model import (
    check_model,
    check_output_path,
    ensure_opset,
    iter_weights,
    load_model,
    normalize,
    save_model,
    to_bytes,
    weight_inputs,
)


def test_truncated_model_is_an_input_error(tmp_path):
    data = tiny_mlp().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.onnx: not a readable ONNX model"):
        load_model(path)


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"\x00\xff" * 100)
    with pytest.raises(InputError, match="junk.onnx"):
        load_model(tmp_path / "junk.onnx")
    with pytest.raises(InputError, match="no such model file"):
        load_model(tmp_path / "absent.onnx")


def test_missing_external_data_names_tensor_and_file(tmp_path):
    model = tiny_mlp()
    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(InputError, match=r"tensor 'w1' keeps its data in 'ext.onnx.data', which is missing"):
        load_model(tmp_path / "ext.onnx")


def test_truncated_external_data(tmp_path):
    onnx.save(tiny_mlp(), tmp_path / "ext.onnx", save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    data = tmp_path / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(InputError, match="truncated"):
        load_model(tmp_path / "ext.onnx")


def test_constant_weights_become_initializers(tmp_path):
    onnx.save(tiny_mlp(constant_weights=True, opset=11), tmp_path / "c.onnx")
    model = load_model(tmp_path / "c.onnx")
    quirks = normalize(model)
    assert any("3 Constant node(s)" in q for q in quirks)
    names = {v.name for _, v in iter_weights(model)}
    assert names == {"w1", "b1", "w2"}
    verdicts = dict((v.name, r) for v, r in weight_inputs(model, {"MatMul"}))
    assert verdicts == {"w1": None, "w2": None}  # b1 is rank 1: never a weight matrix
    check_model(model)


def test_subgraph_weights_are_visible(tmp_path):
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w_then")
    then_graph = helper.make_graph([helper.make_node("MatMul", ["x", "w_then"], ["y_then"])], "then", [],
                                   [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [1, 4])], initializer=[w])
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y_else"])], "else", [],
                                   [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [1, 4])])
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
         helper.make_node("Greater", ["s", "zero"], ["cond"]),
         helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[numpy_helper.from_array(np.array(0, np.float32), "zero")],
    )
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model_proto.ir_version = 8
    onnx.save(model_proto, tmp_path / "if.onnx")
    model = load_model(tmp_path / "if.onnx")
    quirks = normalize(model)
    assert any("inside If/Loop/Scan" in q for q in quirks)
    assert [(v.name, r) for v, r in weight_inputs(model, {"MatMul"})] == [("w_then", None)]


def test_shared_initializer_listed_once(tmp_path):
    proto = tiny_mlp()
    proto.graph.node.append(helper.make_node("MatMul", ["input", "w1"], ["h2"]))
    proto.graph.output.append(helper.make_tensor_value_info("h2", TensorProto.FLOAT, ["N", 128]))
    onnx.save(proto, tmp_path / "shared.onnx")
    model = load_model(tmp_path / "shared.onnx")
    assert any("shared" in q for q in normalize(model))
    assert sum(1 for _, v in iter_weights(model) if v.name == "w1") == 1


def test_opset_upgrade(tmp_path):
    onnx.save(tiny_mlp(opset=11), tmp_path / "o11.onnx")
    model = ensure_opset(load_model(tmp_path / "o11.onnx"), 13)
    assert model.opset_imports[""] == 13
    check_model(model)


def test_save_is_atomic_and_output_rules(tmp_path, tiny_model_path):
    model = load_model(tiny_model_path)
    out = tmp_path / "out.onnx"
    save_model(model, out)
    assert onnx.load(out).graph.node[0].op_type == "MatMul"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
    with pytest.raises(InputError, match="overwrite the input"):
        check_output_path(tiny_model_path, tiny_model_path, force=True)
    with pytest.raises(InputError, match="--force"):
        check_output_path(tiny_model_path, out, force=False)
    check_output_path(tiny_model_path, out, force=True)


def test_checker_failure_is_reported():
    model = ir.from_proto(tiny_mlp())
    model.graph.node(0).op_type = "NoSuchOp"
    with pytest.raises(ValueError, match="onnx.checker rejects|cannot load"):
        check_model(model)


def test_large_models_are_saved_with_external_data(tmp_path, tiny_model_path, monkeypatch):
    """Above the protobuf limit weights go to OUT.onnx.data; the threshold is lowered to test it."""
    import onnxruntime as ort

    import modelpress.compressors.model as model_io

    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    model = load_model(tiny_model_path)
    assert not model_io.fits_in_protobuf(model)
    out = tmp_path / "big.onnx"
    save_model(model, out)
    assert (tmp_path / "big.onnx.data").stat().st_size >= 64 * 128 * 4
    assert out.stat().st_size < 2000
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(tiny_model_path), providers=["CPUExecutionProvider"])
    x = {"input": np.ones((2, 64), np.float32)}
    assert np.array_equal(session.run(None, x)[0], reference.run(None, x)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data", "tiny.onnx"]  # no temp leftovers


@pytest.mark.parametrize("opset", [11, 17])
def test_weight_layout_nodes_are_folded_bit_exactly(tmp_path, opset):
    """Reshape / Unsqueeze / Squeeze / Flatten / Transpose of a weight become the weight itself (one
    node: the consumer reads it where passes look); a weight read twice, or a graph output, stays."""
    rng = np.random.default_rng(0)
    arrays = {"w": rng.normal(size=(8, 4)).astype(np.float32), "shape": np.array([4, 16], np.int64),
              "v": rng.normal(size=(1, 8)).astype(np.float32), "u": rng.normal(size=(8,)).astype(np.float32),
              "s": rng.normal(size=(8, 8)).astype(np.float32), "f": rng.normal(size=(4, 2, 1)).astype(np.float32)}
    axes = [numpy_helper.from_array(np.array([0], np.int64), "axes")] if opset >= 13 else []
    ax = {} if opset >= 13 else {"axes": [0]}
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["h"]),
             helper.make_node("Squeeze", ["v", *(["axes"] if axes else [])], ["vs"], **ax),
             helper.make_node("Add", ["h", "vs"], ["h2"]),
             helper.make_node("Unsqueeze", ["u", *(["axes"] if axes else [])], ["uu"], **ax),
             helper.make_node("Mul", ["h2", "uu"], ["h3"]),
             helper.make_node("Reshape", ["s", "shape"], ["sr"]),                 # s is read twice: stays
             helper.make_node("MatMul", ["h3", "s"], ["h4"]),
             helper.make_node("Flatten", ["f"], ["ff"], axis=1),
             helper.make_node("MatMul", ["x", "ff"], ["g"])]
    inits = [numpy_helper.from_array(a, k) for k, a in arrays.items()] + axes
    graph = helper.make_graph(nodes, "fold", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("h4", TensorProto.FLOAT, ["N", 8]),
                               helper.make_tensor_value_info("sr", TensorProto.FLOAT, [4, 16]),
                               helper.make_tensor_value_info("g", TensorProto.FLOAT, ["N", 2])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 7
    onnx.save(proto, tmp_path / "m.onnx")
    model = load_model(tmp_path / "m.onnx")
    quirks = normalize(model)
    assert "4 Reshape/Transpose-style node(s) of weights folded into the weights" in quirks
    assert [n.op_type for n in model.graph] == ["MatMul", "Add", "Mul", "Reshape", "MatMul", "MatMul"]
    assert "w" not in model.graph.initializers and model.graph.initializers["wt"].const_value.shape == (4, 8)
    x = {"x": rng.normal(size=(5, 4)).astype(np.float32)}
    import onnxruntime as ort
    before = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
    after = ort.InferenceSession(to_bytes(model), providers=["CPUExecutionProvider"]).run(None, x)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_an_already_quantized_model_is_noted(tmp_path):
    """A QDQ / integer model: the passes see only its float weights, and the report says why."""
    from modelpress.compressors.model import normalize

    q = numpy_helper.from_array(np.arange(-8, 8, dtype=np.int8).reshape(4, 4), "wq")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["wq", "s"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["y"])], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], initializer=[q, scale])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert any("already quantized (1 quantize/integer node(s))" in quirk for quirk in normalize(model))


def test_initializers_listed_as_inputs_become_weights_but_a_scalar_default_stays_an_input():
    from modelpress.compressors.model import iter_weights, normalize

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    threshold = numpy_helper.from_array(np.array(0.5, np.float32), "threshold")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Sub", ["h", "threshold"], ["y"])], "ir3",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in (("x", ["N", 4]), ("w", [4, 4]), ("threshold", []))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], initializer=[w, threshold])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    proto.ir_version = 3
    model = ir.from_proto(proto)
    assert any("1 initializer(s) were also listed as graph inputs" in q for q in normalize(model))
    assert [v.name for v in model.graph.inputs] == ["x", "threshold"] and model.ir_version == 4
    onnx.checker.check_model(ir.to_proto(model))
    assert "w" in {v.name for _, v in iter_weights(model)}
