"""Search executors: in process, a process pool and Ray choose the same configuration; batches of
correction moves; the wall-time budget; the journal's contents."""

from __future__ import annotations

import json
import time

import pytest
from modelpress.compressors.errors import InputError
from modelpress.compressors.job import CompressRequest, compress
from modelpress.compressors.search import run as search_run
from modelpress.compressors.search import trials as search_trials
from modelpress.compressors.search.executors import check_executor

# The same tiny two-group MLP search as test_search.py (its fixture and recipe template).
from test_search import CHOICES, FAST, RECIPE, wide_mlp  # noqa: F401 — wide_mlp is a fixture


def _search(tmp_path, model_data, name, extra="", **request):
    model, data = model_data
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(RECIPE.format(extra=extra, cosine=0.999, choices=CHOICES))
    output = tmp_path / f"{name}.onnx"
    report = compress(CompressRequest(model=model, recipe=str(recipe), output=output, data=data,
                                      bench_overrides=FAST, force=True, **request))
    return report.to_json()["search"], output.read_bytes()


def _path(search):
    """What the search did, without timings: the same on every executor."""
    return [(t["phase"], t["config"], t["passed"], t["objective"]) for t in search["trials"]]


def test_process_pool_takes_the_same_path_with_batched_corrections(tmp_path, wide_mlp):
    extra = "  parallel_evaluations: 3"
    alone, alone_bytes = _search(tmp_path, wide_mlp, "alone", extra)
    pooled, pooled_bytes = _search(tmp_path, wide_mlp, "pooled", extra, workers=2)
    assert pooled["executor"] == {"name": "local", "workers": 2, "parallel_evaluations": 3}
    assert alone["executor"]["workers"] == 1
    assert _path(pooled) == _path(alone) and pooled_bytes == alone_bytes, (pooled["groups"], alone["groups"])
    assert pooled["chosen"]["config"] == alone["chosen"]["config"] and pooled["passed"]
    assert pooled["evaluations"] <= pooled["max_evaluations"] == pooled["layer_groups"] + 10
    assert pooled["proxy_evaluations"] == 2 * 4
    assert any(t["phase"] == "correction" for t in pooled["trials"])


def test_ray_executor_chooses_the_same_configuration_as_local(tmp_path, wide_mlp):
    pytest.importorskip("ray")
    local, local_bytes = _search(tmp_path, wide_mlp, "local")
    remote, remote_bytes = _search(tmp_path, wide_mlp, "ray", executor="ray", workers=2)
    assert remote["executor"]["name"] == "ray" and remote["executor"]["workers"] == 2
    assert remote["chosen"]["config"] == local["chosen"]["config"]
    assert _path(remote) == _path(local) and remote_bytes == local_bytes
    assert remote["proxy_evaluations"] == local["proxy_evaluations"] == 8


def test_wall_time_budget_writes_the_best_so_far(tmp_path, wide_mlp, monkeypatch):
    """A clock that jumps by an hour once the first full evaluation is in: the search stops there."""
    jump = [0.0]

    class Clock:
        @staticmethod
        def monotonic():
            return time.monotonic() + jump[0]

    evaluate = search_trials.TrialRunner.evaluate

    def evaluate_then_jump(self, config):
        result = evaluate(self, config)
        jump[0] = 3600.0
        return result

    monkeypatch.setattr(search_run, "time", Clock)
    monkeypatch.setattr(search_trials.TrialRunner, "evaluate", evaluate_then_jump)
    search, written = _search(tmp_path, wide_mlp, "timed", "  max_seconds: 600", search_dir=tmp_path / "s")
    assert search["stopped"] == "time budget" and search["evaluations"] == 1
    assert search["chosen"]["config"] == search["trials"][0]["config"]
    assert search["chosen"]["size_bytes"] == len(written)
    best = json.loads((tmp_path / "s" / "best.json").read_text())
    assert best["config"] == search["chosen"]["config"]


def test_journal_lines_hold_configuration_metrics_and_seconds(tmp_path, wide_mlp):
    search, _ = _search(tmp_path, wide_mlp, "journaled", search_dir=tmp_path / "s")
    lines = [json.loads(line) for line in (tmp_path / "s" / "journal.jsonl").read_text().splitlines()]
    assert lines[0]["kind"] == "header" and len(lines[0]["fingerprint"]) == 64
    proxies = [e for e in lines[1:] if e["kind"] == "proxy"]
    fulls = [e for e in lines[1:] if e["kind"] == "full"]
    assert len(proxies) == search["proxy_evaluations"] and len(fulls) == search["evaluations"]
    for entry in proxies:
        assert {"group", "choice", "loss", "cost", "seconds"} <= set(entry) and entry["seconds"] > 0
    for entry in fulls:
        assert set(entry["config"]) == {"w1", "w2"} and entry["seconds"] > 0
        assert 0 < entry["metrics"]["cosine"] <= 1 + 1e-6 and entry["size_bytes"] > 0
        assert entry["gates"][0]["name"] == "min_cosine"


def test_executor_choices_are_checked_before_anything_runs(monkeypatch):
    assert check_executor(None, None, None) == "local"
    with pytest.raises(InputError, match="choose one of local, ray"):
        check_executor("dask", None, None)
    with pytest.raises(InputError, match="needs --executor ray"):
        check_executor("local", None, "auto")
    with pytest.raises(InputError, match="at least 1"):
        check_executor("local", 0, None)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(InputError, match=r"pip install 'modelpress\[ray\]'"):
        check_executor("ray", None, None)
