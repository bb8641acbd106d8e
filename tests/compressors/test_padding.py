"""Calibration feeds compacted: padding cut only where the model's real positions do not see it."""

import numpy as np
import onnx
from modelpress.compressors.padding import compact_feeds
from onnx import TensorProto, helper, numpy_helper


def _model(mix_positions: bool) -> bytes:
    """[B, T, 8] x [B, T] mask -> per-position MatMul; with ``mix_positions`` the mean over all T
    positions (padding included) is added to every position, so cutting padding changes real outputs."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y" if not mix_positions else "h"])]
    if mix_positions:
        nodes += [helper.make_node("ReduceMean", ["h"], ["m"], axes=[1], keepdims=1),
                  helper.make_node("Add", ["h", "m"], ["y"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", 8]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", 4])],
        [numpy_helper.from_array(rng.normal(size=(8, 4)).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _feeds(lengths, batch=4, seq=16):
    rng = np.random.default_rng(1)
    lengths = np.asarray(lengths)
    mask = (np.arange(seq) < lengths[:, None]).astype(np.int64)
    x = (rng.normal(size=(len(lengths), seq, 8)) * mask[..., None]).astype(np.float32)
    return [{"x": x[i : i + batch], "attention_mask": mask[i : i + batch]} for i in range(0, len(lengths), batch)]


def _real_rows(feeds):
    return np.concatenate([f["x"][f["attention_mask"] != 0] for f in feeds])


def test_samples_regrouped_by_length_and_cut_keeping_every_real_row():
    lengths = [3, 16, 1, 5, 2, 9, 4, 2, 6, 3]
    feeds = _feeds(lengths)
    compacted, note = compact_feeds(_model(False), feeds, "attention_mask")
    assert note is None
    assert [len(f["x"]) for f in compacted] == [4, 4, 2]  # the same batch size
    # Sorted by length (1 2 2 3 | 3 4 5 6 | 9 16): each feed is cut at its longest sample.
    assert [f["x"].shape[1] for f in compacted] == [3, 6, 16]
    assert sum(f["x"].size for f in compacted) < 0.6 * sum(f["x"].size for f in feeds)
    before, after = _real_rows(feeds), _real_rows(compacted)
    order = lambda rows: rows[np.lexsort(rows.T[::-1])]  # noqa: E731 — the same rows as multisets
    np.testing.assert_array_equal(order(before), order(after))
    again, _ = compact_feeds(_model(False), feeds, "attention_mask")
    assert all(np.array_equal(a["x"], b["x"]) for a, b in zip(again, compacted))


def test_padding_the_model_reads_is_kept():
    feeds = _feeds([3, 16, 1, 5, 2, 9, 4, 2])
    compacted, note = compact_feeds(_model(True), feeds, "attention_mask")
    assert compacted == feeds and "change when the padding after them is cut" in note


def test_nothing_to_do_without_a_mask_or_padding():
    feeds = _feeds([16] * 8)
    assert compact_feeds(_model(False), feeds, "attention_mask") == (feeds, None)
    assert compact_feeds(_model(False), feeds, None) == (feeds, None)
    assert compact_feeds(_model(False), feeds, "nope") == (feeds, None)
    bad = [{"x": f["x"], "attention_mask": f["attention_mask"] * 2} for f in _feeds([3, 4, 5, 6])]
    kept, note = compact_feeds(_model(False), bad, "attention_mask")
    assert kept == bad and "0/1 mask" in note
