"""sparse_storage: pruned weights kept as bitmap + nonzero values, rebuilt by ops ORT folds at load;
the outputs are bit-identical, the file smaller, the optimized graph the same as the dense one's."""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from modelpress.compressors.model import check_model, load_model, to_bytes
from modelpress.compressors.pipeline import PassContext, run_passes
from modelpress.compressors.prune.magnitude import MagnitudeConfig, MagnitudePrune
from modelpress.compressors.quantize.int8 import Int8Config, Int8Quantize
from modelpress.compressors.quantize.sparse_storage import SparseStorage, SparseStorageConfig

import zoo


def _optimized_ops(model_bytes: bytes, tmp_path) -> Counter:
    """Op counts of ORT's optimized model, subgraphs included."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    counts: Counter = Counter()

    def walk(graph):
        for node in graph.node:
            counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)

    walk(onnx.load(str(tmp_path / "optimized.onnx")).graph)
    return counts


@pytest.mark.parametrize("name, quantize, most", [("mlp", False, 0.57), ("mlp", True, 0.74), ("if_model", False, 0.57),
                                                  ("transformer", False, 0.62)])
def test_pruned_weights_shrink_and_run_bit_identically(tmp_path, zoo_models, digits, name, quantize, most):
    x_train, _, x_test, _ = digits
    path = zoo_models(name)
    feed_name = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    context = PassContext(calibration=[{feed_name: zoo.model_input(name, x_train[:256])}])
    passes = [MagnitudePrune(MagnitudeConfig(sparsity=0.5), context)]
    if quantize:
        passes.append(Int8Quantize(Int8Config(), context))
    dense, _ = run_passes(load_model(path), passes)
    packed, records = run_passes(load_model(path), [*passes, SparseStorage(SparseStorageConfig(), context)])
    check_model(packed)
    dense_bytes, packed_bytes = to_bytes(dense), to_bytes(packed)
    stats = records[-1].stats
    assert stats["tensors_packed"] >= 2
    assert len(packed_bytes) <= most * len(dense_bytes)  # 50 % zeros: 4 -> 2.125 bytes a float, 1 -> 0.625 an int8
    for tensor in stats["per_tensor"].values():
        assert tensor["bytes_after"] < 0.7 * tensor["bytes_before"] and tensor["sparsity"] >= 0.45
    x = zoo.model_input(name, x_test)
    y_dense = ort.InferenceSession(dense_bytes, providers=["CPUExecutionProvider"]).run(None, {feed_name: x})[0]
    y_packed = ort.InferenceSession(packed_bytes, providers=["CPUExecutionProvider"]).run(None, {feed_name: x})[0]
    np.testing.assert_array_equal(y_packed, y_dense)
    # Folded when the session loads: the same kernels as the dense model, nothing rebuilt per run.
    assert _optimized_ops(packed_bytes, tmp_path) == _optimized_ops(dense_bytes, tmp_path)


def test_weights_without_zeros_are_left_alone(zoo_models):
    model = load_model(zoo_models("mlp"))
    result = SparseStorage(SparseStorageConfig(), PassContext()).call(model)  # no zeros: nothing saves 10 %
    assert result.stats["tensors_packed"] == 0 and not result.modified


def test_all_zero_tensor_and_old_opset(tmp_path):
    from conftest import tiny_mlp

    proto = tiny_mlp(opset=9)
    for init in proto.graph.initializer:
        if init.name == "w1":
            init.CopyFrom(onnx.numpy_helper.from_array(np.zeros((64, 128), np.float32), "w1"))
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    result = SparseStorage(SparseStorageConfig(min_elements=16), PassContext()).call(load_model(path))
    check_model(result.model)
    assert "w1" in result.stats["per_tensor"] and any("opset upgraded" in n for n in result.stats["notes"])
    x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    after = ort.InferenceSession(to_bytes(result.model), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_array_equal(after, before)
