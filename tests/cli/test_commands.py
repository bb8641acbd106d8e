"""The smaller commands: inspect, bench, recipes, recipe check, --help examples."""

import json

import pytest
from typer.testing import CliRunner

from modelpress.cli.main import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("command", ["compress", "bench", "inspect", "decode", "recipes", "recipe", "passes"])
def test_help_shows_an_example(command):
    result = _run(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.output


def test_recipes_list_and_show():
    listed = _run("recipes")
    assert listed.exit_code == 0 and "int8" in listed.output and "lossless" in listed.output
    shown = _run("recipes", "show", "int8")
    assert shown.exit_code == 0 and "type: int8" in shown.output


def test_inspect_counts_parameters(tiny_model_path):
    result = _run("inspect", tiny_model_path, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["parameters"] == 64 * 128 + 128 + 128 * 10
    assert {t["name"]: t["compressible"] for t in summary["tensors"]} == {"w1": True, "w2": True, "b1": False}


def test_bench_reports_accuracy(tmp_path, tiny_model_path, tiny_data_path):
    out = tmp_path / "b.json"
    result = _run("bench", tiny_model_path, "--data", tiny_data_path, "--runs", 5, "--json", out)
    assert result.exit_code == 0, result.output
    measured = json.loads(out.read_text())
    assert 0 <= measured["metrics"]["accuracy"] <= 1
    assert measured["latency_ms"]["p50"] > 0
