"""The search on transformer-like models: groups by role, node-name globs, padding-aware proxies,
the shipped-size estimate, int4 presets — on a tiny 2-block token model built here."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from modelpress.compressors.data import load_data
from modelpress.compressors.model_inputs import model_inputs
from modelpress.compressors.encode.entropy import EntropyConfig, EntropyEncode
from modelpress.compressors.errors import InputError, RecipeError
from modelpress.compressors.job import CompressRequest, compress
from modelpress.compressors.model import to_bytes
from modelpress.compressors.pipeline import PassContext
from modelpress.compressors.recipe import parse_recipe
from modelpress.compressors.search.sensitivity import (
    Workbench,
    relative_error,
    trim_padding,
)
from modelpress.compressors.search.space import (
    SearchSpace,
    layer_groups,
    resolve_choice,
)
from onnx import TensorProto, helper, numpy_helper

VOCAB, WIDTH, HIDDEN, SEQ = 64, 32, 64, 12


def token_model(seed: int = 0) -> onnx.ModelProto:
    """input_ids [N, T] -> Gather(table) -> 2 blocks of (a = x + x Wq; a + relu(a Wup) Wdown) -> [N, T, D].
    Every position is computed on its own (no attention), so cutting padding changes no real output.
    The block matrices are anonymous initializers (``onnx::MatMul_<k>``) used by nodes named after
    the block, as torch exports them."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 1, (VOCAB, WIDTH)).astype(np.float32), "embeddings.weight")]
    nodes = [helper.make_node("Gather", ["embeddings.weight", "input_ids"], ["h0"], name="/embeddings/Gather")]
    x, k = "h0", 0
    for block in range(2):
        for role, shape in (("query", (WIDTH, WIDTH)), ("up", (WIDTH, HIDDEN)), ("down", (HIDDEN, WIDTH))):
            k += 1
            inits.append(numpy_helper.from_array(rng.normal(0, shape[0] ** -0.5, shape).astype(np.float32),
                                                 f"onnx::MatMul_{k}"))
        prefix = f"/encoder/layer.{block}"
        nodes += [
            helper.make_node("MatMul", [x, f"onnx::MatMul_{k - 2}"], [f"q{block}"], name=f"{prefix}/query/MatMul"),
            helper.make_node("Add", [x, f"q{block}"], [f"a{block}"], name=f"{prefix}/Add"),
            helper.make_node("MatMul", [f"a{block}", f"onnx::MatMul_{k - 1}"], [f"u{block}"], name=f"{prefix}/up/MatMul"),
            helper.make_node("Relu", [f"u{block}"], [f"r{block}"], name=f"{prefix}/Relu"),
            helper.make_node("MatMul", [f"r{block}", f"onnx::MatMul_{k}"], [f"d{block}"], name=f"{prefix}/down/MatMul"),
            helper.make_node("Add", [f"a{block}", f"d{block}"], [f"h{block + 1}"], name=f"{prefix}/Add_1"),
        ]
        x = f"h{block + 1}"
    nodes.append(helper.make_node("Identity", [x], ["features"], name="/out"))
    graph = helper.make_graph(
        nodes, "tokens",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "T"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "T"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", "T", WIDTH])],
        initializer=inits,
    )
    # attention_mask is a graph input the model does not read (as in exports that fold it away).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def token_data(samples: int = 96, seed: int = 1) -> dict[str, np.ndarray]:
    """Ids padded to SEQ with 0; real lengths 2..7, so the last 5 columns are padding everywhere."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 8, samples)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, rng.integers(1, VOCAB, (samples, SEQ)), 0).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def token_files(tmp_path):
    model = tmp_path / "tokens.onnx"
    onnx.save(token_model(), model)
    data = tmp_path / "tokens.npz"
    np.savez(data, **token_data())
    return model, data


def _groups(space: SearchSpace):
    return layer_groups(ir.from_proto(token_model()), space)


# --------------------------------------------------------------------------- groups


def test_per_role_groups_the_same_matrix_of_every_block():
    groups, skipped = _groups(SearchSpace(groups="per_role", min_elements=64))
    by_name = {g.name: g.tensors for g in groups}
    assert by_name == {
        "embeddings.weight": ("embeddings.weight",),
        "/encoder/layer.*/query/MatMul": ("onnx::MatMul_1", "onnx::MatMul_4"),
        "/encoder/layer.*/up/MatMul": ("onnx::MatMul_2", "onnx::MatMul_5"),
        "/encoder/layer.*/down/MatMul": ("onnx::MatMul_3", "onnx::MatMul_6"),
    }
    assert groups[1].elements == 2 * WIDTH * WIDTH and skipped == []
    assert len(_groups(SearchSpace(min_elements=64))[0]) == 7  # per_tensor, the default


def test_glob_groups_match_the_names_of_the_nodes_using_a_weight():
    space = SearchSpace(groups=[{"name": "ffn", "include": ["*/up/*", "*/down/*"], "exclude": ["*layer.1*"]},
                                {"name": "table", "include": ["embeddings.*"]}], min_elements=64)
    groups, skipped = _groups(space)
    assert [(g.name, g.tensors) for g in groups] == [("ffn", ("onnx::MatMul_2", "onnx::MatMul_3")),
                                                     ("table", ("embeddings.weight",))]
    assert {s["tensor"] for s in skipped} == {"onnx::MatMul_1", "onnx::MatMul_4", "onnx::MatMul_5", "onnx::MatMul_6"}
    with pytest.raises(InputError, match="'typo'.*name of a node using it"):
        _groups(SearchSpace(groups=[{"name": "typo", "include": ["*/upp/*"]}], min_elements=64))


def test_grouping_names_are_validated_with_file_and_line():
    with pytest.raises(RecipeError, match=r"r.yaml:2: search.groups: .*`per_tensor`, `per_role`"):
        parse_recipe("search:\n  groups: per_block\n", "r.yaml")
    assert parse_recipe("search:\n  groups: per_role\n", "r.yaml").search.groups == "per_role"
    assert parse_recipe("search:\n  groups: []\n", "r.yaml").search.groups == "per_tensor"


def test_int4_presets_quantize_tables_to_four_bits_too():
    gptq, rtn = resolve_choice("int4").steps[0].config, resolve_choice("int4-rtn").steps[0].config
    assert (gptq.method, gptq.embeddings) == ("gptq", "int4")
    assert (rtn.method, rtn.embeddings) == ("rtn", "int4")


# --------------------------------------------------------------------------- padding-aware proxies


def test_trim_padding_cuts_columns_that_are_padding_in_every_sample():
    feed = token_data(8)
    cut = trim_padding(feed)
    length = int(np.flatnonzero(feed["attention_mask"].any(axis=0))[-1]) + 1
    assert length < SEQ and cut["input_ids"].shape == cut["attention_mask"].shape == (8, length)
    np.testing.assert_array_equal(cut["input_ids"], feed["input_ids"][:, :length])
    plain = {"input": np.ones((4, 64), np.float32)}
    assert trim_padding(plain) is plain


def test_relative_error_leaves_padded_positions_out():
    reference = [np.ones((2, 3, 4), np.float32)]
    candidate = [reference[0].copy()]
    candidate[0][:, 2] += 10.0  # only the padded position differs
    mask = [np.array([[1, 1, 0], [1, 1, 0]], bool)]
    assert relative_error(reference, candidate) > 1.0
    assert relative_error(reference, candidate, mask) == 0.0


def _bench(model_path, data_path, trim: bool, objective="size", encoder=None, samples=40):
    model = onnx.load(model_path)
    dataset = load_data(data_path, model_inputs(model_path))
    groups, _ = layer_groups(ir.from_proto(model), SearchSpace(groups="per_role", min_elements=64,
                                                               choices=["fp32", "int4-rtn", "kmeans3"]))
    context = PassContext(calibration=dataset.feeds, threads=1)
    return Workbench(model.SerializeToString(), groups, context, dataset, encoder, objective, samples, trim), groups


def test_cut_proxy_feeds_score_like_the_uncut_ones(token_files):
    cut, groups = _bench(*token_files, trim=True)
    uncut, _ = _bench(*token_files, trim=False)
    assert sum(len(f["input_ids"]) for f in cut.proxy_feeds) == 40  # the first 40 samples exactly
    for group in groups:
        for choice in ("int4-rtn", "kmeans3"):
            a, b = cut.proxy(group.name, choice), uncut.proxy(group.name, choice)
            assert a.error is None and a.loss > 0 and a.cost < 0
            assert a.loss == pytest.approx(b.loss, rel=1e-4) and a.cost == b.cost
    assert cut.proxy_feeds[0]["input_ids"].shape[1] < SEQ == uncut.proxy_feeds[0]["input_ids"].shape[1]


def test_shipped_size_estimate_matches_the_artifact_but_its_table(token_files):
    encoder = EntropyEncode(EntropyConfig(), PassContext())
    bench, groups = _bench(*token_files, trim=True, objective="shipped_size", encoder=encoder)
    model, _ = bench.apply({g.name: "kmeans3" for g in groups})
    onnx_bytes = to_bytes(model)
    exact = len(encoder.encode(onnx_bytes)[0])
    estimate = bench._shipped_estimate(onnx_bytes)
    assert 0 < exact - estimate < 400 + 100 * len(bench._coded)  # header, trailer and ~one table entry per tensor
    assert bench._shipped_estimate(onnx_bytes) == estimate  # cached payloads give the same figure


# --------------------------------------------------------------------------- end to end


def test_per_role_search_on_a_token_model_meets_a_cosine_gate(tmp_path, token_files):
    model, data = token_files
    recipe = tmp_path / "r.yaml"
    recipe.write_text("search:\n  groups: per_role\n  choices: [fp32, int8-weight-only, int4, kmeans4, kmeans2]\n"
                      "  objective: shipped_size\n  min_elements: 64\n  proxy_samples: 24\n  proxy_calibration: proxy\n"
                      "encode:\n  - type: entropy\ngates:\n  min_cosine: 0.995\n")
    report = compress(CompressRequest(model=model, recipe=str(recipe), output=tmp_path / "o.onnx", data=data,
                                      bench_overrides={"runs": 2, "warmup": 0}, force=True))
    search = report.to_json()["search"]
    assert search["layer_groups"] == 4 and search["evaluations"] <= 4 + 10
    assert search["proxy_evaluations"] == 4 * 4 and report.gates_passed
    assert report.compressed.metrics["cosine"] >= 0.995
    assert report.original.size_bytes / report.compressed.shipped_size_bytes >= 2.0
    chosen = search["chosen"]["config"]
    assert set(chosen) == {g["name"] for g in search["groups"]} and "fp32" not in set(chosen.values())
