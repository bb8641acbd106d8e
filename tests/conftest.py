"""Shared fixtures: tiny graphs built with onnx.helper, and real digits models from examples/zoo.py."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

import zoo  # noqa: E402


def tiny_mlp(seed: int = 0, opset: int = 17, constant_weights: bool = False) -> onnx.ModelProto:
    """input[N,64] -> MatMul 64x128 -> Add -> Relu -> MatMul 128x10 -> logits, random weights."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.2, (64, 128)).astype(np.float32)
    b1 = rng.normal(0, 0.1, (128,)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (128, 10)).astype(np.float32)
    tensors = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2")]
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["logits"]),
    ]
    initializers = tensors
    if constant_weights:
        nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in tensors] + nodes
        initializers = []
    graph = helper.make_graph(
        nodes, "tiny_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def tiny_model_path(tmp_path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_mlp(), path)
    return path


@pytest.fixture
def tiny_data_path(tmp_path) -> Path:
    rng = np.random.default_rng(1)
    path = tmp_path / "tiny.npz"
    np.savez(path, input=rng.random((40, 64), dtype=np.float32), labels=rng.integers(0, 10, 40))
    return path


@pytest.fixture(scope="session")
def digits():
    return zoo.digits_data()


@pytest.fixture(scope="session")
def zoo_models(tmp_path_factory, digits):
    """Build each zoo model once per session, on first use: name -> path."""
    folder = tmp_path_factory.mktemp("zoo")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = zoo.ZOO[name].build(folder)
        return built[name]

    return get


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory, digits):
    """name -> .npz of held-out digits laid out for that zoo model, with labels."""
    folder = tmp_path_factory.mktemp("digits")
    _, _, x_test, y_test = digits

    def get(name: str) -> Path:
        path = folder / f"{name}.npz"
        if not path.exists():
            zoo.write_data(path, zoo.model_input(name, x_test), y_test)
        return path

    return get
