"""--data: every mistake in a data file is one InputError naming the file, the tensor and the fix."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelpress.compressors.data import Dataset, load_data
from modelpress.compressors.errors import InputError
from modelpress.compressors.model_inputs import InputSpec, model_inputs
from modelpress.compressors.synthetic import parse_shape_flags, synthesize

VOCAB = 50


def softmax_model(batch="N", features=4, classes=3, seed=0, weight_as_input=False) -> onnx.ModelProto:
    """x[batch, features] -> MatMul -> Add -> Softmax -> probs[batch, classes]."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(features, classes)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(size=(classes,)).astype(np.float32), "b")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, features])]
    if weight_as_input:  # IR < 4 exporters list initializers among the graph inputs
        inputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [features, classes]))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probs"], axis=-1),
        ],
        "softmax",
        inputs,
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, classes])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def token_model(dim=4, seed=0) -> onnx.ModelProto:
    """input_ids, attention_mask int64 [batch, seq] -> Gather embedding * mask -> hidden[batch, seq, dim]."""
    rng = np.random.default_rng(seed)
    table = numpy_helper.from_array(rng.normal(size=(VOCAB, dim)).astype(np.float32), "table")
    axes = numpy_helper.from_array(np.array([2], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
            helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
            helper.make_node("Mul", ["emb", "m3"], ["hidden"]),
        ],
        "tokens",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", dim])],
        initializer=[table, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def softmax_inputs():
    return model_inputs(softmax_model().SerializeToString())


# --------------------------------------------------------------------------- model_inputs


def test_model_inputs_reads_names_dtypes_shapes_and_skips_initializers(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(softmax_model(weight_as_input=True), path)
    assert model_inputs(path) == [InputSpec("x", np.dtype(np.float32), ("N", 4))]
    tokens = model_inputs(token_model())
    assert [(s.name, s.dtype, s.shape) for s in tokens] == [
        ("input_ids", np.int64, ("batch", "seq")),
        ("attention_mask", np.int64, ("batch", "seq")),
    ]
    assert tokens[0].index_bound == VOCAB and tokens[1].index_bound is None


def test_model_inputs_of_a_broken_file_names_it(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x07not a model" * 10)
    with pytest.raises(InputError, match="junk.onnx"):
        model_inputs(path)


# --------------------------------------------------------------------------- one .npz


def test_npz_is_cast_chunked_and_labelled(tmp_path, softmax_inputs):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 4))  # float64: a same-kind cast to the model's float32 is fine
    labels = rng.integers(0, 3, 10)
    np.savez(tmp_path / "d.npz", x=x, labels=labels)
    data = load_data(tmp_path / "d.npz", softmax_inputs, batch_size=4)
    assert data.samples == 10 and data.feed_samples == [4, 4, 2]
    assert [f["x"].shape for f in data.feeds] == [(4, 4), (4, 4), (2, 4)]
    assert all(f["x"].dtype == np.float32 for f in data.feeds)
    np.testing.assert_allclose(np.concatenate([f["x"] for f in data.feeds]), x.astype(np.float32))
    np.testing.assert_array_equal(data.labels, labels)
    assert data.first_sample_feed()["x"].shape == (1, 4)
    assert data.source.endswith("d.npz")


def test_wrong_names_list_what_the_model_expects(tmp_path, softmax_inputs):
    np.savez(tmp_path / "d.npz", X=np.zeros((2, 4), np.float32), extra=np.zeros(2))
    with pytest.raises(InputError) as err:
        load_data(tmp_path / "d.npz", softmax_inputs)
    message = str(err.value)
    assert "d.npz" in message
    assert "missing model input(s) 'x' (did you mean 'X'?)" in message
    assert "'extra'" in message and "match no model input" in message
    assert "x float32 [N, 4]" in message  # what the model expects, with shape and dtype
    assert "The file holds: X, extra" in message


def test_unknown_array_beside_the_inputs_is_an_error(tmp_path, softmax_inputs):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 4), np.float32), lables=np.zeros(2))
    with pytest.raises(InputError, match=r"'lables' .*match no model input"):
        load_data(tmp_path / "d.npz", softmax_inputs)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((3, 4), np.int64), r"input 'x': the model expects float32 \[N, 4\], the file holds int64"),
        (np.zeros((3, 5), np.float32), r"input 'x' has shape \[3, 5\] but the model fixes dim 1 to 4"),
        (np.zeros((3, 2, 4), np.float32), r"input 'x' has rank 3 \[3, 2, 4\] but the model expects rank 2"),
        (np.zeros(4, np.float32), r"input 'x' has rank 1 .* add the leading axis"),
    ],
)
def test_wrong_dtype_rank_or_dim_names_the_tensor(tmp_path, softmax_inputs, array, message):
    np.savez(tmp_path / "d.npz", x=array)
    with pytest.raises(InputError, match=message):
        load_data(tmp_path / "d.npz", softmax_inputs)


def test_float_token_ids_are_refused_not_truncated(tmp_path):
    inputs = model_inputs(token_model())
    np.savez(tmp_path / "d.npz", input_ids=np.full((2, 3), 1.5), attention_mask=np.ones((2, 3), np.int32))
    with pytest.raises(InputError, match="input 'input_ids'.*must be stored as integers"):
        load_data(tmp_path / "d.npz", inputs)
    np.savez(tmp_path / "ok.npz", input_ids=np.ones((2, 3), np.int32), attention_mask=np.ones((2, 3), np.int32))
    assert load_data(tmp_path / "ok.npz", inputs).feeds[0]["input_ids"].dtype == np.int64


def test_sample_counts_and_labels_must_agree(tmp_path, softmax_inputs):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 4), np.float32), labels=np.zeros(3, np.int64))
    with pytest.raises(InputError, match="'labels' holds 3 entries but the inputs hold 4 samples"):
        load_data(tmp_path / "d.npz", softmax_inputs)
    inputs = model_inputs(token_model())
    np.savez(tmp_path / "t.npz", input_ids=np.zeros((4, 3), np.int64), attention_mask=np.ones((5, 3), np.int64))
    with pytest.raises(InputError, match="different numbers of samples.*input_ids: 4, attention_mask: 5"):
        load_data(tmp_path / "t.npz", inputs)


def test_fixed_batch_dim_chunks_by_it_and_needs_a_multiple(tmp_path):
    one = model_inputs(softmax_model(batch=1))
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 4), np.float32))
    data = load_data(tmp_path / "d.npz", one)
    assert len(data.feeds) == 5 and all(f["x"].shape == (1, 4) for f in data.feeds)
    assert not data.sliceable and data.latency_feed()[1] == 1
    two = model_inputs(softmax_model(batch=2))
    with pytest.raises(InputError, match="fixed batch dim of 2.*holds 5: drop the last 1 or pad to 6"):
        load_data(tmp_path / "d.npz", two)


def test_bad_npz_files_are_named(tmp_path, softmax_inputs):
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(InputError, match="text.npz: not a readable .npz"):
        load_data(tmp_path / "text.npz", softmax_inputs)
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(InputError, match="obj.npz: holds an object"):
        load_data(tmp_path / "obj.npz", softmax_inputs)
    good = tmp_path / "cut.npz"
    np.savez(good, x=np.zeros((100, 4), np.float32))
    good.write_bytes(good.read_bytes()[:300])
    with pytest.raises(InputError, match="cut.npz"):
        load_data(good, softmax_inputs)
    with pytest.raises(InputError, match="absent.npz: no such data file"):
        load_data(tmp_path / "absent.npz", softmax_inputs)
    np.save(tmp_path / "x.npy", np.zeros((2, 4)))
    with pytest.raises(InputError, match="x.npy: --data takes an .npz"):
        load_data(tmp_path / "x.npy", softmax_inputs)


# --------------------------------------------------------------------------- a folder of feeds


def test_folder_feeds_are_used_as_is_in_name_order(tmp_path):
    inputs = model_inputs(token_model())
    folder = tmp_path / "feeds"
    folder.mkdir()
    for name, seq, batch in (("b", 5, 2), ("a", 3, 1), ("c", 7, 3)):
        np.savez(folder / f"{name}.npz", input_ids=np.full((batch, seq), seq), attention_mask=np.ones((batch, seq)).astype(np.int64),
                 labels=np.arange(batch))
    (folder / "README.txt").write_text("ignored")
    data = load_data(folder, inputs)
    assert [f["input_ids"].shape for f in data.feeds] == [(1, 3), (2, 5), (3, 7)]
    assert data.feed_samples == [1, 2, 3] and data.samples == 6
    np.testing.assert_array_equal(data.labels, [0, 0, 1, 0, 1, 2])
    assert data.first_sample_feed()["input_ids"].shape == (1, 3)


def test_folder_errors_name_the_file(tmp_path):
    inputs = model_inputs(token_model())
    folder = tmp_path / "feeds"
    folder.mkdir()
    ok = dict(input_ids=np.zeros((1, 3), np.int64), attention_mask=np.ones((1, 3), np.int64))
    np.savez(folder / "0.npz", **ok, labels=np.zeros(1))
    np.savez(folder / "1.npz", **ok)
    with pytest.raises(InputError, match=r"some feeds have 'labels' and some do not \(without: 1.npz\)"):
        load_data(folder, inputs)
    np.savez(folder / "1.npz", input_ids=np.zeros(3, np.int64), attention_mask=np.ones((1, 3), np.int64), labels=np.zeros(1))
    with pytest.raises(InputError, match=r"1.npz: input 'input_ids' has rank 1 \[3\] but the model expects rank 2"):
        load_data(folder, inputs)
    np.savez(folder / "1.npz", input_id=np.zeros((1, 3), np.int64), attention_mask=np.ones((1, 3), np.int64))
    with pytest.raises(InputError, match="1.npz: missing model input.*did you mean 'input_id'"):
        load_data(folder, inputs)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no .npz files"):
        load_data(empty, inputs)


# --------------------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_complete(tmp_path, softmax_inputs):
    x = np.arange(20 * 4, dtype=np.float32).reshape(20, 4)
    np.savez(tmp_path / "d.npz", x=x, labels=np.arange(20))
    data = load_data(tmp_path / "d.npz", softmax_inputs, batch_size=8)
    kept, held = data.split(0.25, seed=3)
    again_kept, again_held = data.split(0.25, seed=3)
    assert held.samples == 5 and kept.samples == 15
    np.testing.assert_array_equal(held.labels, again_held.labels)
    assert sorted(np.concatenate([kept.labels, held.labels]).tolist()) == list(range(20))
    # Inputs moved with their labels.
    rows = np.concatenate([f["x"] for f in held.feeds])
    np.testing.assert_array_equal(rows[:, 0] / 4, held.labels)
    assert kept.feed_samples == [8, 7]


def test_split_of_a_fixed_batch_moves_whole_feeds_with_their_labels(tmp_path):
    x = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    np.savez(tmp_path / "d.npz", x=x, labels=np.arange(6))
    data = load_data(tmp_path / "d.npz", model_inputs(softmax_model(batch=2)))
    kept, held = data.split(0.4, seed=0)
    assert (len(kept.feeds), len(held.feeds)) == (2, 1) and held.feed_samples == [2]
    np.testing.assert_array_equal(held.feeds[0]["x"][:, 0] / 4, held.labels)


# --------------------------------------------------------------------------- synthetic data


def test_synthesize_is_deterministic_and_fills_a_dynamic_batch_with_one(softmax_inputs):
    first, second = synthesize(softmax_inputs, None, samples=3, seed=5), synthesize(softmax_inputs, None, samples=3, seed=5)
    assert len(first.feeds) == 3 and first.feeds[0]["x"].shape == (1, 4) and first.feeds[0]["x"].dtype == np.float32
    for a, b in zip(first.feeds, second.feeds):
        np.testing.assert_array_equal(a["x"], b["x"])
    other = synthesize(softmax_inputs, None, samples=3, seed=6)
    assert not np.array_equal(first.feeds[0]["x"], other.feeds[0]["x"])
    assert first.labels is None and first.samples == 3


def test_synthesize_needs_shape_flags_for_other_dynamic_dims():
    inputs = model_inputs(token_model())
    with pytest.raises(InputError, match=r"input 'input_ids' \[batch, seq\]: dim 1 \('seq'\) is dynamic.*--shape input_ids=NxN"):
        synthesize(inputs, None)
    data = synthesize(inputs, parse_shape_flags(["input_ids=2x16", "attention_mask=2x16"]), samples=4)
    feed = data.feeds[0]
    assert len(data.feeds) == 2 and feed["input_ids"].shape == (2, 16) and feed["input_ids"].dtype == np.int64
    assert feed["input_ids"].min() >= 0 and feed["input_ids"].max() < VOCAB  # within the embedding table
    assert (feed["attention_mask"] == 1).all()
    with pytest.raises(InputError, match="no input 'input_id' \\(did you mean 'input_ids'\\?\\)"):
        synthesize(inputs, {"input_id": (1, 4), "attention_mask": (1, 4)})
    with pytest.raises(InputError, match="dim 1 is fixed to 4"):
        synthesize(model_inputs(softmax_model()), {"x": (1, 5)})


@pytest.mark.parametrize("flag", ["input_ids", "input_ids=", "=1x2", "input_ids=1x", "input_ids=1,128", "x=0x3"])
def test_bad_shape_flags(flag):
    with pytest.raises(InputError, match="--shape"):
        parse_shape_flags([flag])


def test_shape_flags_parse():
    assert parse_shape_flags(["input_ids=1x128", " pixel = 1X3x8x8 ", "v=7"]) == {
        "input_ids": (1, 128), "pixel": (1, 3, 8, 8), "v": (7,),
    }
    with pytest.raises(InputError, match="given twice"):
        parse_shape_flags(["a=1", "a=2"])


def test_dataset_defaults_one_sample_per_feed():
    data = Dataset([{"x": np.zeros((2, 4), np.float32)}], None, 1, "test")
    assert data.feed_samples == [1] and data.latency_feed()[1] == 1
