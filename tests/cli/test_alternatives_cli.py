"""`alternatives:` recipes through the CLI: exit codes, what the terminal and the JSON report show,
byte-identical reruns, and bad ladders rejected before anything is written."""

import json

import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from modelpress.cli.main import app

runner = CliRunner()

LADDER = """description: two rungs
alternatives:
  - name: pruned
    prune:
      - {type: magnitude, sparsity: 0.9}
    quantize:
      - {type: kmeans, bits: 2}
  - name: kmeans4
    quantize:
      - {type: kmeans, bits: 4}
encode:
  - type: entropy
gates: {max_accuracy_drop: 0.02}
"""


def _compress(tmp_path, model, data, recipe_text, name="out", *extra):
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(recipe_text)
    out, report = tmp_path / f"{name}.onnx", tmp_path / f"{name}.json"
    result = runner.invoke(app, [str(a) for a in ("compress", model, "--recipe", recipe, "--data", data, "-o", out,
                                                  "--report-json", report, "--runs", 2, "--warmup", 0, *extra)])
    return result, out, report


def test_ladder_reruns_are_byte_identical_and_the_terminal_lists_the_rungs(tmp_path, zoo_models, digits_npz):
    model, data = zoo_models("mlp"), digits_npz("mlp")
    first, out1, report1 = _compress(tmp_path, model, data, LADDER, "a")
    second, out2, _ = _compress(tmp_path, model, data, LADDER, "b", "--quiet")
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert out1.read_bytes() == out2.read_bytes()
    assert out1.with_suffix(".mpk").read_bytes() == out2.with_suffix(".mpk").read_bytes()
    onnx.checker.check_model(onnx.load(out1))
    ort.InferenceSession(str(out1), providers=["CPUExecutionProvider"])
    ladder = json.loads(report1.read_text())["alternatives"]
    assert [(r["name"], r["status"]) for r in ladder["tried"]] == [("pruned", "abandoned"), ("kmeans4", "passed")]
    kept = ladder["tried"][1]
    assert kept["size_ratio"] > 4 and kept["metrics"]["agreement"] > 0.95 and kept["seconds"] >= 0
    text = " ".join(first.output.split())
    assert "alternatives, tried in order" in text and "kmeans4" in text and "abandoned" in text
    assert ladder["tried"][0]["reason"].startswith("after its prune stage already max_accuracy_drop")
    assert "'kmeans4' (alternative 2 of 2) is the first that met the gates" in text


def test_no_rung_meets_the_gate_exits_1_with_the_closest_written(tmp_path, zoo_models, digits_npz):
    model, data = zoo_models("mlp"), digits_npz("mlp")
    result, out, report = _compress(tmp_path, model, data, LADDER.replace("max_accuracy_drop: 0.02", "min_size_ratio: 500"),
                                    "c", "--quiet")
    assert result.exit_code == 1, result.output
    document = json.loads(report.read_text())
    tried = document["alternatives"]["tried"]
    # No quality gate: the pruned rung runs to its end and, the smallest, is the closest to 500x.
    assert [r["status"] for r in tried] == ["closest", "missed"] and document["alternatives"]["chosen"] == "pruned"
    assert tried[0]["size_ratio"] > tried[1]["size_ratio"]
    assert document["compressed"]["shipped_size_bytes"] == tried[0]["shipped_size_bytes"] == out.with_suffix(".mpk").stat().st_size
    assert [g["passed"] for g in document["gates"]] == [False] and "gate min_size_ratio" in result.output


@pytest.mark.parametrize("body, key", [
    ("alternatives:\n  - name: a\n    quantize: [{type: kmeans, bitz: 3}]\n", "alternatives[0].quantize[0].bitz"),
    ("alternatives:\n  - name: a\n", "alternatives[0]: has no passes"),
    ("alternatives:\n  - name: a\n    quantize: [{type: fp16}]\nsearch: {objective: size}\n", "`alternatives:` and `search:` cannot be combined"),
    ("alternatives:\n  - name: a\n    quantize: [{type: fp16}]\n    gates: {min_cosine: 0.9}\n", "alternatives[0].gates: unknown key"),
])
def test_bad_ladders_exit_2_naming_the_key_and_write_nothing(tmp_path, zoo_models, digits_npz, body, key):
    result, out, report = _compress(tmp_path, zoo_models("mlp"), digits_npz("mlp"), body)
    assert result.exit_code == 2 and key in " ".join(result.output.split()), result.output
    assert not out.exists() and not report.exists()


def test_recipe_check_shows_the_rungs(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(LADDER)
    result = runner.invoke(app, ["recipe", "check", str(recipe)])
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and "pruned: prune/magnitude, quantize/kmeans | kmeans4: quantize/kmeans" in text


def test_deep_compression_without_data_exits_0_with_the_int8_rung(tmp_path, zoo_models):
    out, report = tmp_path / "deep.onnx", tmp_path / "deep.json"
    result = runner.invoke(app, [str(a) for a in ("compress", zoo_models("mlp"), "--recipe", "deep-compression", "-o", out,
                                                  "--report-json", report, "--runs", 2, "--warmup", 0)])
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(onnx.load(out))
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    document = json.loads(report.read_text())
    ladder = document["alternatives"]
    assert [(r["name"], r["status"]) for r in ladder["tried"]] == [
        ("prune-kmeans", "skipped"), ("grid", "skipped"), ("int4", "skipped"), ("int8", "passed")]
    assert ladder["chosen"] == "int8" and document["artifacts"]["packed"] == str(out.with_suffix(".mpk"))
    assert document["compressed"]["shipped_size_bytes"] == out.with_suffix(".mpk").stat().st_size
    text = " ".join(result.output.split())
    assert "skipped without --data (they calibrate on real inputs): prune-kmeans, grid, int4" in text


def test_a_ladder_that_cannot_run_without_data_exits_2_and_writes_nothing(tmp_path, zoo_models):
    recipe, out = tmp_path / "r.yaml", tmp_path / "r.onnx"
    recipe.write_text("alternatives:\n  - name: gptq\n    quantize: [{type: int4, method: gptq}]\n")
    result = runner.invoke(app, ["compress", str(zoo_models("mlp")), "--recipe", str(recipe), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "quantize/int4 calibrate on real inputs; pass --data" in " ".join(result.output.split())
    assert not out.exists()
