"""A recipe's `alternatives:` ladder: parsing, and the job keeping the first rung whose gates hold."""

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from modelpress.compressors.errors import InputError, RecipeError
from modelpress.compressors.job import CompressRequest, compress
from modelpress.compressors.recipe import load_recipe, parse_recipe
from modelpress.compressors.report import dumps

PRUNED = "  - name: pruned\n    prune:\n      - {type: magnitude, sparsity: 0.9}\n    quantize:\n      - {type: kmeans, bits: 2}\n"
FP16 = "  - name: half\n    quantize:\n      - {type: fp16}\n"
INT8 = "  - name: int8\n    quantize:\n      - {type: int8}\n"
KMEANS = "  - name: kmeans2\n    quantize:\n      - {type: kmeans, bits: 2}\n"


def _ladder(*rungs: str, gates: str = "max_accuracy_drop: 0.005") -> str:
    return "alternatives:\n" + "".join(rungs) + f"encode:\n  - type: entropy\ngates: {{{gates}}}\n"


def _run(tmp_path, model, data, text: str, name: str = "out"):
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(text)
    output = tmp_path / f"{name}.onnx"
    request = CompressRequest(model=model, recipe=str(recipe), output=output, data=data, force=True,
                              bench_overrides={"runs": 1, "warmup": 0})
    return compress(request), output


def _accuracy(path, data) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    arrays = np.load(data)
    name = session.get_inputs()[0].name
    return float(np.mean(session.run(None, {name: arrays[name]})[0].argmax(1) == arrays["labels"]))


# --------------------------------------------------------------------------- parsing


def test_shipped_deep_compression_is_a_ladder_from_pruning_to_grids():
    recipe = load_recipe("deep-compression")
    names = [rung.name for rung in recipe.alternatives]
    assert names[0] == "prune-kmeans" and "grid" in names and len(names) >= 3
    first = recipe.alternative(0)
    assert [(p.stage, p.name) for p in first.passes] == [
        ("prune", "magnitude"), ("prune", "recover"), ("quantize", "kmeans"), ("quantize", "recover"), ("encode", "entropy")]
    assert first.alternatives == () and recipe.needs_calibration and recipe.needs_original
    # The grid rung is today's deep-compression-transformer, pass for pass.
    transformer = load_recipe("deep-compression-transformer")
    grid = recipe.alternative(names.index("grid"))
    assert [p.config for p in grid.passes] == [p.config for p in transformer.passes]


@pytest.mark.parametrize("text, expected", [
    (_ladder("  - name: a\n    quantize: [{type: fp16}]\n    encode: [{type: entropy}]\n"),
     ["r.yaml:4: alternatives[0].encode: unknown key 'encode'", "shared: set them at the top level"]),
    (_ladder("  - name: a\n    quantise: [{type: fp16}]\n"),
     ["alternatives[0].quantise: unknown key", "did you mean 'quantize'", "valid keys: name"]),
    (_ladder(FP16, "  - name: b\n    description: nothing\n"), ["r.yaml:5: alternatives[1]: has no passes"]),
    (_ladder(FP16, "  - name: half\n    quantize: [{type: int8}]\n"), ["alternatives[1].name: duplicate alternative name 'half'"]),
    (_ladder("  - quantize: [{type: fp16}]\n"), ["alternatives[0].name: each alternative needs a `name`"]),
    (_ladder("  - name: a\n    quantize: [{type: kmeans, bitz: 3}]\n"),
     ["r.yaml:3: alternatives[0].quantize[0].bitz: unknown key 'bitz'", "did you mean 'bits'"]),
    (_ladder("  - name: a\n    max_seconds: -1\n    quantize: [{type: fp16}]\n"), ["alternatives[0].max_seconds: -1 is not valid"]),
    (_ladder(FP16) + "quantize:\n  - type: int8\n", ["quantize: a recipe with `alternatives:` holds its quantize passes inside"]),
    (_ladder(FP16) + "search:\n  objective: size\n", ["alternatives: `alternatives:` and `search:` cannot be combined"]),
    ("alternatives: []\n", ["r.yaml:1: alternatives: must be a non-empty list"]),
    ("alternatives:\n  - fp16\n", ["alternatives[0]: each alternative must be a mapping of keys"]),
])
def test_bad_alternatives_name_the_key(text, expected):
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "r.yaml")
    for fragment in expected:
        assert fragment in str(info.value), str(info.value)


# --------------------------------------------------------------------------- the job


def test_first_passing_alternative_is_kept_and_equals_running_it_alone(tmp_path, zoo_models, digits_npz):
    model, data = zoo_models("mlp"), digits_npz("mlp")
    report, output = _run(tmp_path, model, data, _ladder(PRUNED, FP16, INT8))
    assert report.gates_passed
    ladder = report.alternatives
    assert ladder["chosen"] == "half" and ladder["passed"] and ladder["index"] == 1
    pruned, half, int8 = ladder["tried"]
    # 90 % pruning without recovery loses far more than 0.5 pp: abandoned before its k-means step.
    assert pruned["status"] == "abandoned" and pruned["stopped_after"] == "prune/magnitude" and pruned["ran"] == ["prune/magnitude"]
    assert pruned["gates"][0]["value"] > 0.05 and "quantize stage only adds error" in pruned["reason"]
    assert half["status"] == "passed" and half["ran"] == ["quantize/fp16"] and half["gates"][0]["passed"]
    assert int8 == {**int8, "status": "not tried", "ran": [], "seconds": None}
    # The figures are the written model's: runnable size, shipped size and the gate on the eval data.
    assert half["size_bytes"] == output.stat().st_size == report.compressed.size_bytes
    assert half["shipped_size_bytes"] == report.compressed.shipped_size_bytes == output.with_suffix(".mpk").stat().st_size
    original = _accuracy(model, data)
    assert half["gates"][0]["value"] == pytest.approx(original - _accuracy(output, data), abs=1e-6)
    assert [p["name"] for p in report.passes] == ["fp16", "entropy"]
    assert any("'half' (alternative 2 of 3) is the first that met the gates" in n for n in report.notes)
    # The same bytes as the rung's passes given as a plain recipe.
    alone = "quantize:\n  - {type: fp16}\nencode:\n  - type: entropy\ngates: {max_accuracy_drop: 0.005}\n"
    _, single = _run(tmp_path, model, data, alone, name="alone")
    assert single.read_bytes() == output.read_bytes()
    assert single.with_suffix(".mpk").read_bytes() == output.with_suffix(".mpk").read_bytes()
    assert json.loads(dumps(report.to_json()))["alternatives"]["tried"][0]["name"] == "pruned"


def test_no_alternative_passes_keeps_the_closest_and_the_last_runs_to_the_end(tmp_path, zoo_models, digits_npz):
    model, data = zoo_models("mlp"), digits_npz("mlp")
    report, output = _run(tmp_path, model, data, _ladder(FP16, KMEANS, gates="min_size_ratio: 1000"))
    assert not report.gates_passed
    ladder = report.alternatives
    half, kmeans = ladder["tried"]
    assert not ladder["passed"]
    assert half["status"] == "missed" and "min_size_ratio" in half["reason"]
    # The last rung is finished even though it misses; it is the closest (its size ratio is largest).
    assert kmeans["ran"] == ["quantize/kmeans"] and kmeans["status"] == "closest" and ladder["chosen"] == "kmeans2"
    assert kmeans["size_ratio"] > half["size_ratio"] > 1
    assert report.compressed.size_bytes == kmeans["size_bytes"] == output.stat().st_size
    assert any("NO alternative met the gates" in n and "'kmeans2'" in n for n in report.notes)


def test_a_rung_over_its_time_budget_is_abandoned(tmp_path, zoo_models, digits_npz):
    model, data = zoo_models("mlp"), digits_npz("mlp")
    slow = ("  - name: slow\n    max_seconds: 0.001\n    prune:\n      - {type: magnitude, sparsity: 0.5, allocation: sensitivity}\n")
    report, _ = _run(tmp_path, model, data, _ladder(slow, FP16))
    slow_entry, half = report.alternatives["tried"]
    assert slow_entry["status"] == "abandoned" and "ran past its max_seconds (0.001 s)" in slow_entry["reason"]
    assert half["status"] == "passed" and report.gates_passed


def test_the_last_rung_ignores_the_early_check(tmp_path, zoo_models, digits_npz):
    model, data = zoo_models("mlp"), digits_npz("mlp")
    report, output = _run(tmp_path, model, data, _ladder(PRUNED, PRUNED.replace("pruned", "pruned-too")))
    first, last = report.alternatives["tried"]
    assert first["ran"] == ["prune/magnitude"] and first["status"] == "abandoned"
    assert last["ran"] == ["prune/magnitude", "quantize/kmeans"] and last["status"] == "closest"
    assert hashlib.sha256(output.read_bytes()).hexdigest()  # written although no rung passed


# --------------------------------------------------------------------------- without --data

INT4_GPTQ = "  - name: int4-gptq\n    quantize:\n      - {type: int4, method: gptq}\n"


def _run_without_data(tmp_path, model, recipe: str, name: str):
    output = tmp_path / f"{name}.onnx"
    request = CompressRequest(model=model, recipe=recipe, output=output, force=True,
                              bench_overrides={"runs": 1, "warmup": 0})
    return compress(request), output


def test_deep_compression_without_data_skips_the_calibrating_rungs_and_runs_int8(tmp_path, zoo_models, digits):
    model = zoo_models("mlp")
    report, output = _run_without_data(tmp_path, model, "deep-compression", "deep")
    ladder = report.alternatives
    assert report.gates_passed and ladder["passed"] and ladder["chosen"] == "int8" and ladder["index"] == 3
    prune_kmeans, grid, int4, int8 = ladder["tried"]
    assert [r["status"] for r in ladder["tried"]] == ["skipped", "skipped", "skipped", "passed"]
    assert prune_kmeans["reason"] == "no --data: prune/recover, quantize/recover calibrate on real inputs"
    assert grid["reason"] == "no --data: quantize/kmeans calibrates on real inputs"
    assert int4["reason"] == "no --data: quantize/int4 calibrates on real inputs"
    assert all(r["ran"] == [] and r["seconds"] is None and r["size_bytes"] is None for r in ladder["tried"][:3])
    assert int8["ran"] == ["quantize/int8"] and int8["size_ratio"] > 3.5
    assert [p["name"] for p in report.passes] == ["int8", "entropy"]
    assert any("skipped without --data (they calibrate on real inputs): prune-kmeans, grid, int4" in n
               for n in report.notes)
    # What is written is the int8 recipe's model, byte for byte, and it keeps the digits predictions.
    _, plain = _run_without_data(tmp_path, model, "int8", "plain")
    assert output.read_bytes() == plain.read_bytes()
    assert output.with_suffix(".mpk").stat().st_size == report.compressed.shipped_size_bytes < output.stat().st_size
    onnx.checker.check_model(onnx.load(output))
    _, _, x_test, _ = digits
    original, compressed = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x_test})[0]
                            for p in (model, output))
    assert np.mean(original.argmax(1) == compressed.argmax(1)) > 0.99


def test_without_data_the_last_rung_that_runs_goes_to_the_end(tmp_path, zoo_models):
    # The pruned rung is the last one run (the int4 rung after it is skipped), so a quality miss after
    # its prune stage does not abandon it: something is always written.
    text = _ladder(PRUNED, INT4_GPTQ, gates="max_accuracy_drop: 0.0001")
    recipe = tmp_path / "ladder.yaml"
    recipe.write_text(text)
    report, output = _run_without_data(tmp_path, zoo_models("mlp"), str(recipe), "ladder")
    pruned, int4 = report.alternatives["tried"]
    assert pruned["ran"] == ["prune/magnitude", "quantize/kmeans"] and pruned["status"] == "closest"
    assert int4["status"] == "skipped" and int4["reason"] == "no --data: quantize/int4 calibrates on real inputs"
    assert not report.gates_passed and output.stat().st_size == report.compressed.size_bytes == pruned["size_bytes"]


def test_without_data_a_ladder_of_calibrating_rungs_is_refused(tmp_path, zoo_models):
    recipe = tmp_path / "all.yaml"
    recipe.write_text(_ladder(INT4_GPTQ, "  - name: grid\n    quantize:\n      - {type: kmeans, method: gptq, codebook: uniform}\n"))
    with pytest.raises(InputError, match=r"quantize/int4, quantize/kmeans calibrate on real inputs; pass --data"):
        _run_without_data(tmp_path, zoo_models("mlp"), str(recipe), "all")
    assert not (tmp_path / "all.onnx").exists()


def test_a_rung_that_changes_nothing_is_not_kept(tmp_path, zoo_models, digits_npz):
    """int4 only reaches MatMul / Gemm weights, so on a CNN whose layers are all below its min_elements
    it changes nothing and trivially meets a quality gate: the ladder goes on to a rung that compresses."""
    model, data = zoo_models("cnn"), digits_npz("cnn")
    nothing = "  - name: nothing\n    quantize:\n      - {type: int4, min_elements: 100000000}\n"
    report, output = _run(tmp_path, model, data, _ladder(nothing, INT8, gates="max_accuracy_drop: 0.02"))
    first, int8 = report.alternatives["tried"]
    assert first["status"] == "missed" and "changed nothing" in first["reason"]
    assert report.alternatives["chosen"] == "int8" and int8["status"] == "passed"
    assert report.compressed.size_bytes < 0.5 * report.original.size_bytes
