"""The example zoo builds real, deterministic models that stock onnxruntime runs accurately."""

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import zoo  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return zoo.digits_data()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Each zoo model built once per module, on first use: name -> path."""
    out, paths = tmp_path_factory.mktemp("zoo"), {}

    def get(name):
        if name not in paths:
            paths[name] = zoo.ZOO[name].build(out)
        return paths[name]

    return get


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_model_is_valid_and_accurate(name, built, digits):
    entry = zoo.ZOO[name]
    path = built(name)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    assert [i.name for i in model.graph.input] == [zoo.INPUT]
    assert [o.name for o in model.graph.output] == [zoo.OUTPUT]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"

    _, _, x_test, y_test = digits
    x = zoo.model_input(name, x_test)
    assert zoo.accuracy(path, x[:1], y_test[:1]) in (0.0, 1.0)  # batch 1 runs too
    assert zoo.accuracy(path, x, y_test) >= entry.min_accuracy


def test_constant_cnn_has_only_constant_weights(built):
    model = onnx.load(built("constant_cnn"))
    assert model.opset_import[0].version == zoo.CONSTANT_OPSET
    assert len(model.graph.initializer) == 0
    assert sum(n.op_type == "Constant" for n in model.graph.node) == 6  # 2 Conv + Gemm, W and B


def test_if_model_keeps_weights_in_both_branches(built):
    model = onnx.load(built("if_model"))
    assert len(model.graph.initializer) == 0
    (if_node,) = [n for n in model.graph.node if n.op_type == "If"]
    for branch in if_node.attribute:
        assert len(branch.g.initializer) == 6  # 3 Gemm layers, weight and bias


def test_transformer_has_data_dependent_gather_embedding(built):
    model = onnx.load(built("transformer"))
    inits = {i.name: i for i in model.graph.initializer}
    (gather,) = [n for n in model.graph.node if n.op_type == "Gather"]
    assert list(inits[gather.input[0]].dims) == [256, 96]  # 2^8 row patterns x d_model
    assert gather.input[1] not in inits


def test_rebuild_is_byte_identical_and_restores_torch_threads(tmp_path, built):
    import torch

    before = torch.get_num_threads()
    rebuilt = zoo.build_cnn(tmp_path)
    assert torch.get_num_threads() == before
    assert rebuilt.read_bytes() == built("cnn").read_bytes()


def test_write_data_names_arrays_after_the_input(tmp_path, digits):
    x_train, y_train, _, _ = digits
    path = zoo.write_data(tmp_path / "d.npz", x_train[:10], y_train[:10])
    with np.load(path) as data:
        assert sorted(data.files) == ["input", "labels"]
        assert data["input"].dtype == np.float32 and data["labels"].dtype == np.int64
        np.testing.assert_array_equal(data["input"], x_train[:10])
    with np.load(zoo.write_data(tmp_path / "x.npz", x_train[:3])) as data:
        assert data.files == ["input"]


def test_split_is_deterministic_and_disjoint(digits):
    again = zoo.digits_data()
    for a, b in zip(digits, again):
        np.testing.assert_array_equal(a, b)
    x_train, _, x_test, _ = digits
    assert len(x_train) + len(x_test) == 1797
    assert x_train.dtype == np.float32 and 0.0 <= x_train.min() and x_train.max() <= 1.0
