"""k-means weight sharing: the rewritten model computes exactly with codebook[indices], runs in stock
ORT, handles subgraphs, embeddings and pruned zeros, shrinks, and is deterministic."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import tiny_mlp
from onnx import TensorProto, helper, numpy_helper
from pydantic import ValidationError

from modelpress.compressors.model import check_model, load_model, normalize, opset_version, to_bytes
from modelpress.compressors.pipeline import PassContext
from modelpress.compressors.quantize.kmeans import KMeansConfig, KMeansQuantize
from modelpress.compressors.registry import PASSES


def _model(rng, opset=17):
    """ids -> Gather(emb 50x32) -> MatMul(w1 32x64) -> Relu -> Gemm(w2 64x32 as 32x64, transB) -> out.
    w1 is 80% zeros (pruned); a Conv-free graph keeps the ORT run fast."""
    w1 = rng.normal(0, 0.2, (32, 64)).astype(np.float32)
    w1[rng.random(w1.shape) < 0.8] = 0.0
    inits = [
        numpy_helper.from_array(rng.normal(0, 1, (50, 32)).astype(np.float32), "emb"),
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(rng.normal(0, 0.2, (32, 64)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.1, (32,)).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["e"]),
        helper.make_node("MatMul", ["e", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["out"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 32])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _if_model(rng):
    """Weights in both If branches, plus a main-graph weight read from inside a branch."""
    def branch(prefix):
        w = numpy_helper.from_array(rng.normal(0, 0.3, (16, 40)).astype(np.float32), f"{prefix}_w")
        nodes = [helper.make_node("MatMul", ["x", f"{prefix}_w"], [f"{prefix}_h"]),
                 helper.make_node("MatMul", [f"{prefix}_h", "shared"], [f"{prefix}_y"])]
        out = helper.make_tensor_value_info(f"{prefix}_y", TensorProto.FLOAT, ["N", 8])
        return helper.make_graph(nodes, prefix, [], [out], initializer=[w])

    shared = numpy_helper.from_array(rng.normal(0, 0.3, (40, 8)).astype(np.float32), "shared")
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
         helper.make_node("Greater", ["s", "zero"], ["c"]),
         helper.make_node("If", ["c"], ["y"], then_branch=branch("then"), else_branch=branch("else"))],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        initializer=[shared, numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _run(model_proto, min_elements=16, **config):
    model = _load(model_proto)
    result = KMeansQuantize(KMeansConfig(min_elements=min_elements, **config), PassContext(seed=0)).call(model)
    check_model(result.model)
    return result


def _load(proto):
    model = ir.from_proto(proto)
    normalize(model)
    return model


def _reference(original: onnx.ModelProto, rewritten: onnx.ModelProto) -> onnx.ModelProto:
    """The original model with each clustered weight replaced by codebook[indices] (+ group offsets)."""
    def arrays(graph, found):
        for t in graph.initializer:
            found[t.name] = numpy_helper.to_array(t)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    arrays(attr.g, found)
        return found

    new = arrays(rewritten.graph, {})
    reference = onnx.ModelProto()
    reference.CopyFrom(original)

    def replace(graph):
        for t in graph.initializer:
            if f"{t.name}_kmeans_idx" in new:
                idx = new[f"{t.name}_kmeans_idx"].astype(np.int64)
                idx = idx + new.get(f"{t.name}_kmeans_offsets", 0)
                t.CopyFrom(numpy_helper.from_array(new[f"{t.name}_kmeans_codebook"][idx], t.name))
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    replace(attr.g)

    replace(reference.graph)
    return reference


def _outputs(proto, feed):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


@pytest.mark.parametrize("bits,groups", [(8, 1), (5, 1), (4, 1), (3, 4)])
def test_output_equals_codebook_lookup_exactly(bits, groups):
    original = _model(np.random.default_rng(0))
    result = _run(original, bits=bits, per_channel_groups=groups)
    rewritten = onnx.load_from_string(to_bytes(result.model))
    assert result.stats["tensors_clustered"] == 3  # emb, w1, w2; the bias b2 is not a weight matrix
    feed = {"ids": np.arange(50, dtype=np.int64)}
    got = _outputs(rewritten, feed)[0]
    expected = _outputs(_reference(original, rewritten), feed)[0]
    assert np.array_equal(got, expected)
    assert not np.array_equal(got, _outputs(original, feed)[0])  # it really was clustered


def test_pruned_zeros_stay_exact_and_each_codebook_is_small():
    original = _model(np.random.default_rng(1))
    result = _run(original, bits=4, per_channel_groups=4)
    reference = _reference(original, onnx.load_from_string(to_bytes(result.model)))
    before = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in reference.graph.initializer}
    assert np.array_equal(after["w1"] == 0, before["w1"] == 0)
    assert result.stats["per_tensor"]["w1"]["zeros_kept"] == int((before["w1"] == 0).sum())
    for group in np.split(after["w2"], 4, axis=0):  # Gemm transB: output channels on axis 0
        assert np.unique(group).size <= 16
    assert np.array_equal(after["b2"], before["b2"])


def test_weights_inside_if_branches_and_outer_scope():
    original = _if_model(np.random.default_rng(2))
    result = _run(original, bits=5)
    assert result.stats["tensors_clustered"] == 3
    rewritten = onnx.load_from_string(to_bytes(result.model))
    onnx.checker.check_model(rewritten, full_check=True)
    then_branch = next(a.g for a in rewritten.graph.node[-1].attribute if a.name == "then_branch")
    assert {t.name for t in then_branch.initializer} == {"then_w_kmeans_idx", "then_w_kmeans_codebook"}
    feed = {"x": np.random.default_rng(3).random((4, 16), dtype=np.float32)}
    assert np.array_equal(_outputs(rewritten, feed)[0], _outputs(_reference(original, rewritten), feed)[0])


def _wide_mlp(rng):
    """x[N,256] -> MatMul 256x256 -> MatMul 256x128: large enough that codebooks are overhead."""
    inits = [numpy_helper.from_array(rng.normal(0, 0.1, shape).astype(np.float32), name)
             for name, shape in (("w1", (256, 256)), ("w2", (256, 128)))]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 128])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_runnable_size_shrinks():
    original = _wide_mlp(np.random.default_rng(4))
    size = original.ByteSize()
    at8 = _run(original, bits=8)
    assert size / len(to_bytes(at8.model)) >= 3.5
    assert at8.stats["index_dtype"] == "uint8" and opset_version(at8.model) == 17
    at4 = _run(original, bits=4)
    assert at4.stats["index_dtype"] == "uint4" and opset_version(at4.model) == 21
    assert size / len(to_bytes(at4.model)) >= 7.0
    kept = _run(original, bits=4, index_dtype="uint8")  # old runtimes: no opset upgrade
    assert kept.stats["index_dtype"] == "uint8" and opset_version(kept.model) == 17


def test_deterministic_bytes():
    original = _model(np.random.default_rng(5))
    assert to_bytes(_run(original, bits=5).model) == to_bytes(_run(original, bits=5).model)
    assert to_bytes(_run(original, bits=3).model) == to_bytes(_run(original, bits=3).model)


def test_skipped_tensors_are_reported():
    proto = tiny_mlp()
    proto.graph.node.append(helper.make_node("Add", ["w2", "w2"], ["w2_twice"]))
    proto.graph.output.append(helper.make_tensor_value_info("w2_twice", TensorProto.FLOAT, [128, 10]))
    result = _run(proto, min_elements=16, bits=5, exclude=("w1",))
    reasons = {s["tensor"]: s["reason"] for s in result.stats["skipped"]}
    assert "include/exclude" in reasons["w1"] and "Add input" in reasons["w2"]
    assert not result.modified and result.stats["tensors_clustered"] == 0
    small = _run(tiny_mlp(), min_elements=10_000, bits=5)
    assert {s["tensor"] for s in small.stats["skipped"]} == {"w1", "w2"}


def test_mlp_from_file_and_stats(tiny_model_path):
    model = load_model(tiny_model_path)
    normalize(model)
    result = KMeansQuantize(KMeansConfig(bits=6, min_elements=100)).call(model)
    check_model(result.model)
    stats = result.stats
    assert stats["tensors_clustered"] == 2 and stats["bits"] == 6
    assert stats["bytes_before"] == (64 * 128 + 128 * 10) * 4
    assert stats["bytes_after"] == 64 * 128 + 128 * 10 + 2 * 64 * 4
    assert all(0 < t["mse"] < 1e-3 for t in stats["per_tensor"].values())


def test_config_validation_and_registry():
    with pytest.raises(ValidationError):
        KMeansConfig(bits=9)
    with pytest.raises(ValidationError):
        KMeansConfig(bits=5, index_dtype="uint4")
    with pytest.raises(ValidationError):
        KMeansConfig(bits=5, nonsense=1)
    assert PASSES["quantize"]["kmeans"] is KMeansQuantize


def test_vectors_are_shared_and_the_output_is_exact():
    """vectors: true also clusters the Gemm bias (32 elements: a 3-bit codebook at most, 8 << 32)."""
    original = _model(np.random.default_rng(3))
    result = _run(original, bits=5, vectors=True)
    rewritten = onnx.load_from_string(to_bytes(result.model))
    assert result.stats["tensors_clustered"] == 4
    info = result.stats["per_tensor"]["b2"]
    assert info["bits"] == 3 and info["elements"] == 32 and info["stored_as"] == ["b2_kmeans_idx", "b2_kmeans_codebook"]
    assert "b2" not in {t.name for t in rewritten.graph.initializer}
    feed = {"ids": np.arange(50, dtype=np.int64)}
    assert np.array_equal(_outputs(rewritten, feed)[0], _outputs(_reference(original, rewritten), feed)[0])
    small = _run(original, bits=5, vectors=True, min_vector_elements=64)
    assert {"tensor": "b2", "reason": "vector of fewer than min_vector_elements=64 elements"} in small.stats["skipped"]


def test_min_bits_picks_the_fewest_bits_meeting_the_error_bound():
    rng = np.random.default_rng(4)
    original = _model(rng)
    loose = _run(original, bits=8, min_bits=2, max_relative_error=0.2)
    tight = _run(original, bits=8, min_bits=2, max_relative_error=1e-4)
    for name in ("emb", "w1", "w2"):
        lo, hi = loose.stats["per_tensor"][name], tight.stats["per_tensor"][name]
        assert lo["bits"] < hi["bits"] <= 8
        weights = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}[name]
        scale = np.mean(weights[weights != 0].astype(np.float64) ** 2)
        assert lo["mse"] <= 0.2 * scale
        assert hi["mse"] <= 1e-4 * scale or hi["bits"] == 8
    # Indices of tensors at 4 bits or fewer are uint4, the rest uint8, after one opset upgrade.
    dtypes = {info["index_dtype"] for info in loose.stats["per_tensor"].values()}
    assert dtypes == {"uint4"} and loose.stats["bits_per_tensor"] == {n: i["bits"] for n, i in loose.stats["per_tensor"].items()}
    with pytest.raises(ValidationError, match="min_bits"):
        KMeansConfig(bits=3, min_bits=4)


def test_product_quantization_runs_in_ort_and_matches_its_codebook():
    original = _model(np.random.default_rng(5))
    result = _run(original, bits=6, vector_size=4)
    rewritten = onnx.load_from_string(to_bytes(result.model))
    arrays = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    reference = onnx.ModelProto()
    reference.CopyFrom(original)
    for t in reference.graph.initializer:
        if f"{t.name}_kmeans_idx" in arrays:
            book, idx = arrays[f"{t.name}_kmeans_codebook"], arrays[f"{t.name}_kmeans_idx"].astype(np.int64)
            assert book.shape == (64, 4) and idx.shape == tuple(t.dims[:-1]) + (t.dims[-1] // 4,)
            t.CopyFrom(numpy_helper.from_array(book[idx].reshape(tuple(t.dims)), t.name))
    feed = {"ids": np.arange(50, dtype=np.int64)}
    assert np.array_equal(_outputs(rewritten, feed)[0], _outputs(reference, feed)[0])
    info = result.stats["per_tensor"]["w1"]
    # 512 uint8 indices + a 64 x 4 fp32 codebook + the shape, for 2048 fp32 weights
    assert info["vector_size"] == 4 and info["bytes_after"] == 512 + 64 * 4 * 4 + 2 * 8
    # All-zero sub-vectors (w1 is 80 % pruned) map to the exact zero entry 0.
    assert not arrays["w1_kmeans_codebook"][0].any()


def test_product_quantization_falls_back_when_the_last_axis_does_not_divide():
    original = _model(np.random.default_rng(6))
    result = _run(original, bits=4, vector_size=5)  # 32 and 64 are not multiples of 5
    assert all(info["vector_size"] == 1 for info in result.stats["per_tensor"].values())
    assert any("not a multiple of vector_size 5" in note for note in result.stats["notes"])
    with pytest.raises(ValidationError, match="per_channel_groups"):
        KMeansConfig(vector_size=4, per_channel_groups=2)


def test_batchnorm_statistics_are_shared_but_frozen_for_recovery():
    """Running mean/variance get codebooks read through an Identity, so `recover` (which trains
    Gather tables) leaves them alone, while the BN scale/bias codebooks stay trainable."""
    from modelpress.compressors.prune.recover import RecoverConfig, trainable_weights

    rng = np.random.default_rng(7)
    c = 32
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (c, 1, 3, 3)).astype(np.float32), "conv_w"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "bn_scale"),
             numpy_helper.from_array(rng.normal(0, 0.1, c).astype(np.float32), "bn_bias"),
             numpy_helper.from_array(rng.normal(0, 0.5, c).astype(np.float32), "bn_mean"),
             numpy_helper.from_array(rng.uniform(0.2, 2.0, c).astype(np.float32), "bn_var")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "conv_w"], ["h"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["h", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 8, 8])], initializer=inits)
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    original.ir_version = 8
    result = _run(original, bits=3, vectors=True)
    assert set(result.stats["per_tensor"]) == {"conv_w", "bn_scale", "bn_bias", "bn_mean", "bn_var"}
    trainable = {v.name for v in trainable_weights(result.model, RecoverConfig())[0]}
    assert {"bn_scale_kmeans_codebook", "bn_bias_kmeans_codebook", "conv_w_kmeans_codebook"} <= trainable
    assert not trainable & {"bn_mean_kmeans_codebook", "bn_var_kmeans_codebook"}
    rewritten = onnx.load_from_string(to_bytes(result.model))
    feed = {"x": rng.random((2, 1, 8, 8)).astype(np.float32)}
    expected = _outputs(_reference(original, rewritten), feed)[0]
    assert np.allclose(_outputs(rewritten, feed)[0], expected, atol=1e-5)


def test_recurrent_weights_share_per_gate_unit_grids(tmp_path):
    """LSTM / GRU W and R: one scale per gate unit (axis 1), looked up and folded by ORT at load."""
    from collections import Counter

    from test_quantize_int8 import _optimized_ops, _recurrent

    path = _recurrent(tmp_path)
    model = load_model(path)
    normalize(model)
    config = KMeansConfig(op_types=("LSTM", "GRU"), codebook="uniform", step=0.05, scale="channel", bits=8)
    result = KMeansQuantize(config, PassContext(seed=0)).call(model)
    check_model(result.model)
    assert result.stats["tensors_clustered"] == 4  # lw, lr, gw, gr; the gate biases are vectors
    scales = {v.name: v.const_value.shape for v in result.model.graph.initializers.values() if "scale" in v.name}
    # [directions, gates * hidden, inputs]: a scale per gate unit, shared by the two directions
    assert sorted(tuple(s) for s in scales.values()) == [(1, 36, 1), (1, 36, 1), (1, 64, 1), (1, 64, 1)]
    assert _optimized_ops(result.model) == Counter({"LSTM": 1, "GRU": 1})
    feed = {"x": np.random.default_rng(8).normal(size=(6, 4, 8)).astype(np.float32)}
    before, after = _outputs(onnx.load(path), feed), _outputs(onnx.load_from_string(to_bytes(result.model)), feed)
    for a, b in zip(before, after):
        assert float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b)) > 0.999
