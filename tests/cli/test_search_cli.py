"""`compress` with a search recipe from the command line: exit codes of the search's contract."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from conftest import tiny_mlp
from modelpress.cli.main import app
from typer.testing import CliRunner

RECIPE = """\
description: test search
search:
  choices: [{choices}]
  objective: size
  proxy_samples: 64
gates:
  min_cosine: {cosine}
"""


@pytest.fixture
def setup(tmp_path):
    onnx.save(tiny_mlp(seed=3), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", input=np.random.default_rng(0).random((200, 64), dtype=np.float32))
    return tmp_path


def _run(folder, *extra, choices="fp32, int8, kmeans4", cosine=0.999):
    (folder / "r.yaml").write_text(RECIPE.format(choices=choices, cosine=cosine))
    args = ["compress", folder / "m.onnx", "--recipe", folder / "r.yaml", "--data", folder / "d.npz", "-o",
            folder / "o.onnx", "--runs", 2, "--warmup", 0, "--quiet", "--force", "--report-json", folder / "r.json", *extra]
    return CliRunner().invoke(app, [str(a) for a in args])


def test_unreachable_gate_exits_1_with_the_closest_written(setup):
    result = _run(setup, choices="kmeans2, sparse50+kmeans4", cosine=0.99999)
    assert result.exit_code == 1, result.output
    search = json.loads((setup / "r.json").read_text())["search"]
    assert not search["passed"] and search["chosen"]["miss"] > 0
    assert (setup / "o.onnx").stat().st_size == search["chosen"]["size_bytes"]
    assert "MISS" in result.output


def test_ray_without_ray_installed_is_a_usage_error(setup, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    result = _run(setup, "--executor", "ray")
    assert result.exit_code == 2 and "pip install 'modelpress[ray]'" in result.output
    assert not (setup / "o.onnx").exists()


@pytest.mark.parametrize("flags, fragment", [
    (["--executor", "dask"], "choose one of local, ray"),
    (["--executor", "local", "--ray-address", "auto"], "needs --executor ray"),
    (["--workers", "0"], "at least 1"),
])
def test_bad_executor_flags_exit_2_before_anything_runs(setup, flags, fragment):
    result = _run(setup, *flags)
    assert result.exit_code == 2 and fragment in result.output, result.output
    assert not (setup / "o.onnx").exists()


def test_executor_flags_need_a_search_recipe(setup):
    args = ["compress", setup / "m.onnx", "--recipe", "int8", "--data", setup / "d.npz", "-o", setup / "o.onnx",
            "--executor", "ray"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2 and "need a recipe with a search" in result.output


def test_plot_writes_a_png_of_the_trials(setup):
    pytest.importorskip("matplotlib")
    result = _run(setup, "--plot", setup / "front.png")
    assert result.exit_code == 0, result.output
    assert (setup / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
