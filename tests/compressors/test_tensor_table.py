"""The report's per-tensor table: original, runnable and shipped bytes, sparsity and bits per weight,
built from the stats of real prune, kmeans and encode passes."""

import onnx_ir as ir
import pytest
from conftest import tiny_mlp
from modelpress.compressors.encode.entropy import EntropyConfig, EntropyEncode
from modelpress.compressors.model import normalize, to_bytes
from modelpress.compressors.pipeline import PassContext
from modelpress.compressors.prune.magnitude import MagnitudeConfig, MagnitudePrune
from modelpress.compressors.quantize.kmeans import KMeansConfig, KMeansQuantize
from modelpress.compressors.summary import tensor_table


def _records():
    model = ir.from_proto(tiny_mlp())
    normalize(model)
    context = PassContext(seed=0)
    records = []
    for stage, graph_pass in (("prune", MagnitudePrune(MagnitudeConfig(sparsity=0.8, min_elements=100), context)),
                              ("quantize", KMeansQuantize(KMeansConfig(bits=3, min_elements=100, vectors=True), context))):
        result = graph_pass.call(model)
        model = result.model
        records.append({"stage": stage, "name": graph_pass.name, "stats": result.stats})
    artifact, stats = EntropyEncode(EntropyConfig(), context).encode(to_bytes(model))
    records.append({"stage": "encode", "name": "entropy", "stats": stats})
    return records, stats, len(artifact)


def test_rows_for_every_weight_with_consistent_sizes():
    records, encode_stats, _ = _records()
    rows = {row["tensor"]: row for row in tensor_table(records)}
    assert set(rows) == {"w1", "w2", "b1"}
    w1 = rows["w1"]
    assert w1["original_bytes"] == 64 * 128 * 4
    assert w1["sparsity"] == pytest.approx(0.8, abs=1e-3) and w1["codebook_bits"] == 3
    # 8192 uint4 indices + an 8-entry fp32 codebook
    assert w1["runnable_bytes"] == 64 * 128 // 2 + 8 * 4
    coded = encode_stats["per_tensor"]["w1_kmeans_idx"]["coded_bytes"]
    assert coded < w1["shipped_bytes"] < w1["runnable_bytes"]  # the index stream + the codebook's share
    assert w1["in_skeleton"]  # the codebook is too small to be coded on its own
    assert w1["bits_per_weight"] == pytest.approx(8 * w1["shipped_bytes"] / (64 * 128), abs=1e-3)
    assert rows["b1"]["sparsity"] == 0.0 and rows["b1"]["original_bytes"] == 128 * 4


def test_shipped_bytes_add_up_to_about_the_artifact():
    records, _, artifact_bytes = _records()
    rows = tensor_table(records)
    assert sum(row["shipped_bytes"] for row in rows) < artifact_bytes  # the graph's structure is the rest


def test_no_passes_no_rows_and_unchanged_tensors_are_listed():
    assert tensor_table([]) == []
    records, _, _ = _records()
    rows = tensor_table([records[-1]])  # the encode pass alone (a lossless recipe)
    assert {row["tensor"] for row in rows} == set(records[-1]["stats"]["per_tensor"])
    assert all(row["original_bytes"] is None and row["bits_per_weight"] is not None for row in rows)


def test_a_weight_stored_twice_keeps_one_row():
    """int8 then sparse_storage: the int8 initializer is re-stored as bitmap + nonzero values; the
    row of the original weight follows it (runnable bytes = what the file holds now)."""
    import numpy as np
    from modelpress.compressors.quantize.int8 import Int8Config, Int8Quantize
    from modelpress.compressors.quantize.sparse_storage import SparseStorage, SparseStorageConfig

    model = ir.from_proto(tiny_mlp())
    normalize(model)
    x = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    context = PassContext(seed=0, calibration=[{"input": x}])
    records = []
    for stage, graph_pass in (("prune", MagnitudePrune(MagnitudeConfig(sparsity=0.5, min_elements=100), context)),
                              ("quantize", Int8Quantize(Int8Config(min_elements=100), context)),
                              ("quantize", SparseStorage(SparseStorageConfig(min_elements=100), context))):
        result = graph_pass.call(model)
        model = result.model
        records.append({"stage": stage, "name": graph_pass.name, "stats": result.stats})
    rows = {row["tensor"]: row for row in tensor_table(records)}
    assert {"w1", "w2"} <= set(rows) and not any(name.startswith("w1_") for name in rows)
    w1 = rows["w1"]
    packed = records[2]["stats"]["per_tensor"]
    stored = next(info for name, info in packed.items() if name.startswith("w1"))
    int8 = records[1]["stats"]["per_tensor"]["w1"]
    assert w1["runnable_bytes"] == int8["bytes_after"] - stored["bytes_before"] + stored["bytes_after"]
    assert w1["runnable_bytes"] < 0.7 * int8["bytes_after"] and w1["sparsity"] == pytest.approx(0.5, abs=0.01)
