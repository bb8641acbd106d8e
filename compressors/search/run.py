"""The accuracy-budget search: sensitivity -> allocation -> full evaluations, best so far always kept.

before: a recipe with a ``search:`` block (its quality gates are the constraint), the normalized model,
calibration data and held-out evaluation data.
after:  a ``SearchOutcome``: the passes of the best configuration that met every gate (the smallest
objective), or if none did the closest one, plus the ``search`` section of the report.

1. Sensitivity: every choice on every group alone, scored by the proxy (``sensitivity.py``).
2. Allocation: the frontier of configurations by predicted loss and cost (``allocate.py``).
3. Full evaluations (a configuration applied to a fresh copy, measured on the held-out data exactly as
   the final report measures it): bisection on the predicted-loss budget along the frontier, then
   corrections from the best passing configuration — one group moved to a cheaper choice, most saving
   per predicted loss first, kept when it passes and is smaller — until no move is left or a budget
   runs out (full evaluations, default groups + 10; wall time). Ctrl-C stops the same way.
Every trial is appended to ``<search-dir>/journal.jsonl`` as it finishes (``journal.py``); ``--resume``
reads the finished ones back instead of rerunning them. Trials run through an executor
(``executors.py``: in process, a process pool, or Ray tasks) in batches — all proxies at once, up to
``parallel_evaluations`` correction moves at once — and each batch is decided only when all of it is
in, in task order. The steps are a deterministic function of the measured numbers, so a resumed
search, or one run on another executor, takes the same path and reaches the same configuration.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from modelpress.compressors.errors import InputError
from modelpress.compressors.model import to_bytes
from modelpress.compressors.search.allocate import Option, frontier, pareto, probe_index
from modelpress.compressors.search.executors import (
    ExecutorFailure,
    check_executor,
    make_executor,
)
from modelpress.compressors.search.journal import Journal, fingerprint
from modelpress.compressors.search.sensitivity import (
    Config,
    Proxy,
    Workbench,
    group_rows,
)
from modelpress.compressors.search.space import QUALITY_GATES, layer_groups
from modelpress.compressors.search.trials import TrialRunner

# A correction move must be predicted to save at least this share of the group's cost change: a
# full evaluation is not spent on a choice that differs by a few bytes (sparsity on a Gather table,
# which pruning skips, leaves it as the same k-means).
MIN_MOVE_SAVING = 0.01


class _Stop(Exception):
    def __init__(self, reason: str):
        self.reason = reason


@dataclass
class SearchOutcome:
    config: dict[str, str]
    passes: list
    summary: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def prepare(recipe, request, calibration, evaluation, seed: int):
    """The gate's data and the constraint: without --eval-data a held-out share of --data (never the
    samples that calibrate); without a quality gate the search's default one."""
    space = recipe.search
    check_executor(request.executor, request.workers, request.ray_address)
    if request.data is None:
        raise InputError(f"{recipe.source}: the search scores choices and checks its gate on real inputs; pass --data")
    notes = []
    if request.eval_data is None:
        split_seed = space.seed if space.seed is not None and request.seed is None else seed
        calibration, evaluation = calibration.split(space.holdout, seed=split_seed)
        notes.append(f"search: the gate was measured on {evaluation.samples} samples held out of --data; "
                     f"the other {calibration.samples} calibrated and scored sensitivity")
    gates = recipe.gates
    if all(getattr(gates, name) is None for name in QUALITY_GATES):
        name, value = (("max_accuracy_drop", space.default_max_accuracy_drop) if evaluation.labels is not None
                       else ("min_cosine", space.default_min_cosine))
        gates = gates.model_copy(update={name: value})
        notes.append(f"search: no quality gate was set; the search's default {name} {value} was used")
    return replace(recipe, gates=gates), calibration, evaluation, notes


def run_search(model, recipe, context, calibration, evaluation, encoder, original_size: int,
               search_dir: Path | None = None, resume: bool = False,
               progress=lambda description, completed, total: None,
               executor: str | None = None, workers: int | None = None, ray_address: str | None = None) -> SearchOutcome:
    space = recipe.search
    groups, skipped = layer_groups(model, space)
    original = to_bytes(model)
    bench = Workbench(original, groups, context, calibration, encoder, space.objective, space.proxy_samples,
                      space.proxy_trim_padding, space.proxy_calibration)
    key = fingerprint(original, space, recipe.gates, context.seed, calibration, evaluation)
    journal = Journal(Path(search_dir) if search_dir else None, key, resume)
    pool = make_executor(check_executor(executor, workers, ray_address), workers, ray_address)
    try:
        progress("search: measuring the original", 0, 1)
        runner = TrialRunner(bench, space, recipe.gates, recipe.benchmark, evaluation, original_size).prepare()
        pool.start(runner)
        search = Search(bench, space, recipe.gates, evaluation, journal, progress, pool)
        search.run()
    finally:
        pool.close()
    config = search.chosen_config()
    notes = [search.note()]
    if "held out" in evaluation.source and search.original_metrics.get("accuracy", 0.0) >= 0.999:
        notes.append("search: the original model is 100 % accurate on the held-out part of --data (training data?); "
                     "the gate may be optimistic for new data: pass --eval-data with samples the model never saw")
    return SearchOutcome(config, bench.passes(config), search.summary(config, skipped), notes)


class Search:
    def __init__(self, bench: Workbench, space, gates, evaluation, journal: Journal, progress, executor):
        self.bench, self.space, self.gates, self.evaluation = bench, space, gates, evaluation
        self.journal, self.progress, self.executor = journal, progress, executor
        self.groups = bench.groups
        self.max_evaluations = space.max_evaluations or len(self.groups) + 10
        self.started = time.monotonic()
        self.deadline = self.started + space.max_seconds if space.max_seconds else math.inf
        self.proxies: dict[tuple[str, str], Proxy] = {}
        self.points: list = []
        self.trials: dict[str, dict[str, Any]] = {}  # full evaluations on the search's path, in order
        self.counts = {"proxy": 0, "proxy_reused": 0, "full": 0, "full_reused": 0}
        self.best: dict[str, Any] | None = None
        self.stopped = "converged"
        self.original_metrics: dict[str, float] = {}

    def run(self) -> None:
        try:
            self._sensitivity()
            proxies = self.proxies
            self.points = frontier([[Option(c.name, proxies[(g.name, c.name)].loss, proxies[(g.name, c.name)].cost)
                                     for c in g.choices] for g in self.groups])
            self._bisect()
            self._correct()
        except _Stop as stop:
            self.stopped = stop.reason
        except ExecutorFailure as failure:
            self.stopped = f"executor failed: {failure}"
        except KeyboardInterrupt:
            self.stopped = "interrupted"
        self._show_best()

    # ----------------------------------------------------------------------- phases

    def _sensitivity(self) -> None:
        pairs = [(g.name, c.name) for g in self.groups for c in g.choices if not self.bench.choices[c.name].identity]
        todo = [pair for pair in pairs if self.journal.get(_proxy_key(*pair)) is None]
        self.counts["proxy_reused"] = len(pairs) - len(todo)
        total = len(pairs)

        def record(task, result) -> None:
            self.journal.append({"key": _proxy_key(task[1], task[2]), "kind": "proxy", "group": task[1],
                                 "choice": task[2], **result})
            self.counts["proxy"] += 1
            self.progress("search: sensitivity", self.counts["proxy"] + self.counts["proxy_reused"], total)

        self.progress("search: sensitivity", self.counts["proxy_reused"], total)
        self._run_batch([("proxy", g, c) for g, c in todo], record)
        for group in self.groups:
            for choice in group.choices:
                entry = self.journal.get(_proxy_key(group.name, choice.name))
                self.proxies[(group.name, choice.name)] = (
                    Proxy(0.0, 0.0, 0.0) if entry is None  # fp32: nothing changes
                    else Proxy(_num(entry["loss"]), _num(entry["cost"]), entry["seconds"], entry["error"]))

    def _bisect(self) -> None:
        low, high = -1, len(self.points)
        while high - low > 1:
            index = probe_index(self.points, low, high)
            [trial] = self._full([dict(zip([g.name for g in self.groups], self.points[index].picks))], "bisection")
            low, high = (index, high) if trial["passed"] else (low, index)

    def _correct(self) -> None:
        """From the best passing configuration, moves of one group to a cheaper choice, up to
        ``parallel_evaluations`` at once; the best trial of a batch that improves on the best
        becomes the new start. Moves ranked before it, or that failed, are not tried again."""
        failed: set[tuple[str, str]] = set()
        width = self.space.parallel_evaluations
        while self.best is not None and self.best["passed"]:
            current = self.best["config"]
            moves = self._moves(current, failed)
            for start in range(0, len(moves), width):
                batch = moves[start:start + width]
                trials = self._full([{**current, group: choice} for group, choice in batch], "correction")
                winner = next((i for i, trial in enumerate(trials) if trial is self.best), None)
                failed.update(move for i, (move, trial) in enumerate(zip(batch, trials))
                              if i != winner and (winner is None or i < winner or not trial["passed"]))
                if winner is not None:
                    break  # passed and smaller: continue from it
            else:
                return

    def _moves(self, current: Config, failed: set[tuple[str, str]]) -> list[tuple[str, str]]:
        """Moves of one group to a choice predicted cheaper, most saving per predicted loss first."""
        ranked = []
        for gi, group in enumerate(self.groups):
            now = self.proxies[(group.name, current[group.name])]
            for ci, choice in enumerate(group.choices):
                other = self.proxies[(group.name, choice.name)]
                if (group.name, choice.name) in failed or not math.isfinite(other.loss):
                    continue
                if now.cost - other.cost <= MIN_MOVE_SAVING * max(abs(now.cost), abs(other.cost)):
                    continue
                ratio = (now.cost - other.cost) / (max(other.loss - now.loss, 0.0) + 1e-12)
                ranked.append((-ratio, gi, ci, group.name, choice.name))
        return [(g, c) for *_, g, c in sorted(ranked)]

    # ----------------------------------------------------------------------- full evaluations

    def _full(self, configs: list[dict[str, str]], phase: str) -> list[dict[str, Any]]:
        """Full evaluations of ``configs`` (as one batch), in their order. Each new one counts against
        the budget; when the budget cannot hold them all, those that fit run and the search stops."""
        keys = ["full/" + json.dumps(config, sort_keys=True) for config in configs]
        new = list(dict.fromkeys(k for k in keys if k not in self.trials))
        room = self.max_evaluations - len(self.trials)
        over = len(new) > room
        new = new[:max(room, 0)]
        todo = [k for k in new if self.journal.get(k) is None]
        by_key = dict(zip(keys, configs))
        for k in new:
            if k not in todo:
                self.counts["full_reused"] += 1

        def record(task, result) -> None:
            k = "full/" + json.dumps(task[1], sort_keys=True)
            predicted = sum(self.proxies[(g, c)].loss for g, c in task[1].items())
            self.journal.append({"key": k, "kind": "full", "phase": phase, "config": task[1],
                                 "predicted_loss": predicted, **result})
            self.counts["full"] += 1

        self.progress("search: full evaluations", len(self.trials), self.max_evaluations)
        try:
            self._run_batch([("full", by_key[k]) for k in todo], record)
        finally:  # also when interrupted: the trials that finished count
            self._file([k for k in new if self.journal.get(k) is not None])
        self._show_best()
        if over:
            raise _Stop("evaluation budget")
        return [self.trials[k] for k in keys]

    def _file(self, keys: list[str]) -> None:
        for k in keys:  # in the batch's order, whatever order they finished in
            entry = self.journal.get(k)
            self.trials[k] = entry
            self.original_metrics = entry.get("original_metrics") or self.original_metrics
            if self.best is None or _rank(entry) < _rank(self.best):
                self.best = entry
                self.journal.write_best(entry)
        self.progress("search: full evaluations", len(self.trials), self.max_evaluations)

    def _run_batch(self, tasks: list, record) -> None:
        """Run ``tasks`` on the executor, journaling each result as it arrives (so an interrupted
        batch keeps its finished trials); the wall-time budget is checked before and between them."""
        if not tasks:
            return
        self._check_time()
        results = self.executor.run(tasks)
        try:
            for index, result in results:
                record(tasks[index], result)
                if len(tasks) > 1:
                    self._check_time()
        finally:
            results.close()

    def _check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Stop("time budget")

    def _show_best(self) -> None:
        """The live best-so-far line of the progress display (the text after the tab changes)."""
        best = self.best
        if best is None:
            return
        size = best.get("shipped_size_bytes" if self.space.objective == "shipped_size" else "size_bytes")
        quality = "n/a" if best.get("quality") is None else f"{best['quality']:.4g}"
        verdict = "meets the gate" if best["passed"] else f"closest, miss {best['miss']:.3g}"
        text = f"{size / 1024:.1f} KB, quality loss {quality}, {verdict}" if size else verdict
        self.progress(f"search: best so far\t{text}", len(self.trials), self.max_evaluations)

    # ----------------------------------------------------------------------- results

    def chosen_config(self) -> dict[str, str]:
        """The best trial's configuration; with no full evaluation at all, the model unchanged."""
        return dict(self.best["config"]) if self.best is not None else {}

    def note(self) -> str:
        best = self.best
        how = (f"{len(self.trials)} full evaluations (budget {self.max_evaluations}), "
               f"{self.counts['proxy'] + self.counts['proxy_reused']} proxy evaluations; stopped: {self.stopped}")
        if best is None:
            return f"search: no configuration was evaluated ({how}); the model is written without search passes"
        chosen = ", ".join(f"{g}={c}" for g, c in best["config"].items())
        verdict = "met the gate" if best["passed"] else f"NO configuration met the gate; the closest (miss {best['miss']:.4g}) is written"
        return f"search: {verdict}: {chosen} ({how})"

    def summary(self, config: dict[str, str], skipped: list[dict[str, str]]) -> dict[str, Any]:
        best = self.best
        return {
            "objective": self.space.objective,
            "constraint": self.gates.model_dump(exclude_none=True),
            "passed": bool(best and best["passed"]),
            "stopped": self.stopped,
            "layer_groups": len(self.groups),
            "evaluations": len(self.trials),
            "max_evaluations": self.max_evaluations,
            "evaluations_resumed": self.counts["full_reused"],
            "proxy_evaluations": self.counts["proxy"] + self.counts["proxy_reused"],
            "proxy_evaluations_resumed": self.counts["proxy_reused"],
            "frontier_points": len(self.points),
            "executor": {"name": self.executor.name, "workers": self.executor.workers,
                         "parallel_evaluations": self.space.parallel_evaluations},
            "seconds": round(time.monotonic() - self.started, 3),
            "journal": None if self.journal.path is None else str(self.journal.path),
            "chosen": None if best is None else {k: best.get(k) for k in (
                "config", "passed", "miss", "objective", "predicted_loss", "quality", "size_bytes",
                "shipped_size_bytes", "latency_ms", "metrics", "gates")},
            "groups": group_rows(self.groups, self.proxies, config),
            "trials": [{k: t.get(k) for k in ("phase", "config", "predicted_loss", "objective", "quality", "size_bytes",
                                              "shipped_size_bytes", "latency_ms", "passed", "miss", "error", "seconds")}
                       for t in self.trials.values()],
            "pareto": pareto(list(self.trials.values()), self.space.objective),
            "not_searched": skipped,
        }


# --------------------------------------------------------------------------- helpers


def _rank(entry: dict[str, Any]) -> tuple:
    """Passing first and smallest objective; else the closest to the gate; ties by configuration."""
    objective = _num(entry.get("objective"))
    if entry["passed"]:
        return (0, objective, 0.0, entry["key"])
    return (1, _num(entry.get("miss")), objective, entry["key"])


def _num(value) -> float:
    return math.inf if value is None else float(value)


def _proxy_key(group: str, choice: str) -> str:
    return f"proxy/{group}/{choice}"
