"""The accuracy-budget search: recipe block, allocator, budgets, best-so-far, journal and resume."""

from __future__ import annotations

import itertools
import json
import random

import numpy as np
import onnx
import pytest
from conftest import tiny_mlp
from modelpress.compressors.errors import InputError, RecipeError
from modelpress.compressors.job import CompressRequest, compress
from modelpress.compressors.recipe import load_recipe, parse_recipe
from modelpress.compressors.search import trials as search_trials
from modelpress.compressors.search.allocate import (
    Option,
    Point,
    cheapest_within,
    frontier,
    pareto,
    probe_index,
)
from modelpress.compressors.search.space import resolve_choice

FAST = {"runs": 2, "warmup": 0}
CHOICES = "fp32, int8, kmeans4, kmeans2, sparse50+kmeans4"
RECIPE = """\
description: test search
search:
  choices: [{choices}]
  objective: size
  proxy_samples: 64
{extra}
gates:
  min_cosine: {cosine}
"""


@pytest.fixture
def wide_mlp(tmp_path):
    """The tiny MLP (64x128, 128x10) and 200 random samples: two layer groups, fast to search."""
    path = tmp_path / "m.onnx"
    onnx.save(tiny_mlp(seed=3), path)
    data = tmp_path / "d.npz"
    np.savez(data, input=np.random.default_rng(0).random((200, 64), dtype=np.float32))
    return path, data


def _search(tmp_path, model_data, cosine=0.999, extra="", name="out", choices=CHOICES, **request):
    model, data = model_data
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(RECIPE.format(extra=extra, cosine=cosine, choices=choices))
    report = compress(CompressRequest(model=model, recipe=str(recipe), output=tmp_path / f"{name}.onnx", data=data,
                                      bench_overrides=FAST, force=True, **request))
    return report, report.to_json()["search"]


# --------------------------------------------------------------------------- the allocator


def test_frontier_solves_small_knapsacks_exactly():
    rng = random.Random(0)
    for _ in range(40):
        groups = [[Option(f"c{j}", rng.choice([0.0, rng.random()]), rng.uniform(-10, 0)) for j in range(rng.randint(1, 4))]
                  for _ in range(rng.randint(1, 4))]
        points = frontier(groups)
        assert [p.loss for p in points] == sorted(p.loss for p in points)
        assert all(a.cost > b.cost for a, b in itertools.pairwise(points))
        combos = list(itertools.product(*groups))
        for budget in [rng.random() * len(groups) for _ in range(5)] + [0.0, 1e9]:
            feasible = [sum(o.cost for o in c) for c in combos if sum(o.loss for o in c) <= budget + 1e-12]
            best = cheapest_within(points, budget + 1e-12)
            assert (best is None) == (not feasible)
            if feasible:
                assert best.cost == pytest.approx(min(feasible))
                chosen = [next(o for o in g if o.choice == pick) for g, pick in zip(groups, best.picks)]
                assert sum(o.cost for o in chosen) == pytest.approx(best.cost)


def test_failed_choices_are_never_picked_and_probes_stay_inside():
    groups = [[Option("a", 0.0, 0.0), Option("b", float("inf"), float("inf")), Option("c", 0.1, -5.0)]]
    points = frontier(groups)
    assert [p.picks for p in points] == [("a",), ("c",)]
    points = [Point(10.0 ** -k, float(k), ()) for k in range(8, 0, -1)]
    assert 0 < probe_index(points, 0, len(points)) < len(points)
    assert probe_index(points, 2, 4) == 3


def test_pareto_keeps_only_non_dominated_trials():
    trials = [{"config": {}, "size_bytes": s, "quality": q, "latency_ms": None, "passed": True}
              for s, q in [(10, 0.1), (20, 0.0), (15, 0.2), (10, 0.3)]]
    assert [(p["size_bytes"], p["quality"]) for p in pareto(trials, "size")] == [(10, 0.1), (20, 0.0)]


# --------------------------------------------------------------------------- the recipe block


def test_shipped_auto_recipe_has_a_search():
    recipe = load_recipe("auto")
    assert recipe.search is not None and recipe.search.objective == "shipped_size"
    assert [p.name for p in recipe.passes] == ["entropy"]
    assert resolve_choice("sparse50+kmeans4").steps[0].config.sparsity == 0.5
    admm = resolve_choice("admm60+int8").steps[0]
    assert admm.name == "admm" and admm.config.sparsity == 0.6


@pytest.mark.parametrize("block, fragment", [
    ("search:\n  choices: [fp32, kmeans9]\n", "r.yaml:2: search.choices[1]: 'kmeans9' is not valid"),
    ("search:\n  objectiv: size\n", "r.yaml:2: search.objectiv: unknown key 'objectiv' (did you mean 'objective'?)"),
    ("search:\n  choices:\n    - {name: x, passes: [{type: int8, include: ['a']}]}\n", "`include` is set by the search"),
    ("search:\n  choices: [int8+kmeans4]\n", "two quantize passes"),
    ("search:\n  groups: [{name: a, include: ['*']}, {name: a, include: ['b']}]\n", "group 'a' is listed twice"),
    ("search: {}\nquantize: [{type: int8}]\n", "r.yaml:1: search: with a search the prune and quantize passes are chosen"),
    ("search:\n  max_evaluations: 0\n", "r.yaml:2: search.max_evaluations: 0 is not valid"),
])
def test_bad_search_blocks_name_file_line_and_fix(block, fragment):
    with pytest.raises(RecipeError) as info:
        parse_recipe(block, "r.yaml")
    assert fragment in str(info.value), str(info.value)


# --------------------------------------------------------------------------- the search


def test_search_meets_the_gate_within_budget_on_held_out_data(tmp_path, wide_mlp):
    report, search = _search(tmp_path, wide_mlp)
    assert report.gates_passed and search["passed"] and search["stopped"] == "converged"
    assert search["layer_groups"] == 2
    assert search["evaluations"] <= search["layer_groups"] + 10
    assert search["proxy_evaluations"] == 2 * 4  # every non-fp32 choice on every group, once
    assert {g["name"]: g["choice"] for g in search["groups"]} == search["chosen"]["config"]
    assert all(g["why"] and len(g["sensitivity"]) == 5 for g in search["groups"])
    assert search["pareto"] and report.compressed.size_bytes < report.original.size_bytes
    assert "held out" in report.data["evaluation"] and "kept" in report.data["calibration"]
    # What the search measured is what was written.
    assert search["chosen"]["size_bytes"] == report.compressed.size_bytes


def test_evaluation_budget_holds(tmp_path, wide_mlp):
    _, search = _search(tmp_path, wide_mlp, extra="  max_evaluations: 2")
    assert search["evaluations"] == 2 and search["stopped"] == "evaluation budget"
    assert search["chosen"] is not None


def test_unreachable_gate_writes_the_closest_and_reports_the_miss(tmp_path, wide_mlp):
    report, search = _search(tmp_path, wide_mlp, choices="kmeans2, sparse50+kmeans4", cosine=0.99999)
    assert not search["passed"] and not report.gates_passed
    assert (tmp_path / "out.onnx").exists()
    assert search["chosen"]["miss"] > 0
    assert search["chosen"]["miss"] == min(t["miss"] for t in search["trials"])
    assert any("NO configuration met the gate" in note for note in report.notes)


def test_ctrl_c_returns_the_best_so_far(tmp_path, wide_mlp, monkeypatch):
    original = search_trials.TrialRunner.evaluate
    calls = []

    def interrupted(self, config):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(config)
        return original(self, config)

    monkeypatch.setattr(search_trials.TrialRunner, "evaluate", interrupted)
    _, search = _search(tmp_path, wide_mlp)
    assert search["stopped"] == "interrupted" and search["evaluations"] == 2
    assert search["chosen"]["config"] in calls and (tmp_path / "out.onnx").exists()


def test_killed_search_resumes_to_the_same_configuration(tmp_path, wide_mlp, monkeypatch):
    _, whole = _search(tmp_path, wide_mlp, name="whole", search_dir=tmp_path / "whole")
    original = search_trials.TrialRunner.evaluate
    done = []

    def killed(self, config):
        if len(done) == 3:
            raise RuntimeError("killed")
        done.append(config)
        return original(self, config)

    monkeypatch.setattr(search_trials.TrialRunner, "evaluate", killed)
    with pytest.raises(RuntimeError, match="killed"):
        _search(tmp_path, wide_mlp, name="part", search_dir=tmp_path / "part")
    journal = (tmp_path / "part" / "journal.jsonl").read_text().splitlines()
    assert sum(json.loads(line)["kind"] == "full" for line in journal) == 3
    monkeypatch.setattr(search_trials.TrialRunner, "evaluate", original)
    with pytest.raises(InputError, match="--resume"):
        _search(tmp_path, wide_mlp, name="part", search_dir=tmp_path / "part")
    _, resumed = _search(tmp_path, wide_mlp, name="part", search_dir=tmp_path / "part", resume=True)
    assert resumed["chosen"]["config"] == whole["chosen"]["config"]
    assert (tmp_path / "part.onnx").read_bytes() == (tmp_path / "whole.onnx").read_bytes()
    assert resumed["evaluations"] == whole["evaluations"] and resumed["evaluations_resumed"] == 3
    assert resumed["proxy_evaluations_resumed"] == whole["proxy_evaluations"]
    # Another gate is another search: the journal is not reused for it.
    with pytest.raises(InputError, match="another model, search space, gate"):
        _search(tmp_path, wide_mlp, cosine=0.99, name="part", search_dir=tmp_path / "part", resume=True)


def test_search_needs_data_and_search_dir_needs_a_search(tmp_path, wide_mlp):
    model, data = wide_mlp
    with pytest.raises(InputError, match="pass --data"):
        compress(CompressRequest(model=model, recipe="auto", output=tmp_path / "o.onnx"))
    with pytest.raises(InputError, match="need a recipe with a search"):
        compress(CompressRequest(model=model, recipe="int8", output=tmp_path / "o.onnx", data=data, search_dir=tmp_path))


def test_auto_on_the_digits_mlp_beats_uniform_int8(tmp_path, zoo_models, digits_npz):
    model, data = zoo_models("mlp"), digits_npz("mlp")
    int8 = compress(CompressRequest(model=model, recipe="int8", output=tmp_path / "i.onnx", data=data, bench_overrides=FAST))
    auto = compress(CompressRequest(model=model, recipe="auto", output=tmp_path / "a.onnx", data=data, bench_overrides=FAST))
    search = auto.to_json()["search"]
    assert auto.gates_passed and search["evaluations"] <= search["layer_groups"] + 10
    assert int8.compressed.shipped_size_bytes / auto.compressed.shipped_size_bytes >= 1.5
    assert int8.compressed.size_bytes / auto.compressed.size_bytes >= 1.5


def test_cli_search_dir_and_resume(tmp_path, wide_mlp):
    from modelpress.cli.main import app
    from typer.testing import CliRunner

    model, data = wide_mlp
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(extra="", cosine=0.999, choices=CHOICES))

    def run(*extra):
        args = ["compress", model, "--recipe", recipe, "--data", data, "-o", tmp_path / "o.onnx", "--runs", 2,
                "--warmup", 0, "--quiet", "--force", "--report-json", tmp_path / "r.json", "--search-dir", tmp_path / "s", *extra]
        return CliRunner().invoke(app, [str(a) for a in args])

    first = run()
    assert first.exit_code == 0, first.output
    written = (tmp_path / "o.onnx").read_bytes()
    assert json.loads((tmp_path / "s" / "best.json").read_text())["passed"] is True
    again = run()
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = run("--resume")
    assert resumed.exit_code == 0, resumed.output
    assert (tmp_path / "o.onnx").read_bytes() == written
    search = json.loads((tmp_path / "r.json").read_text())["search"]
    assert search["evaluations_resumed"] == search["evaluations"] and search["layer_groups"] == 2
