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
Every trial is appended to ``<search-dir>/journal.jsonl`` as it finishes; ``--resume`` reads the
finished ones back instead of rerunning them. The steps are a deterministic function of the measured
numbers, so a resumed search takes the same path and reaches the same configuration.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from modelpress.compressors import benchmark
from modelpress.compressors.errors import InputError
from modelpress.compressors.model import to_bytes, write_atomic
from modelpress.compressors.report import Side, _finite, evaluate_gates
from modelpress.compressors.search.allocate import Option, frontier, pareto, probe_index
from modelpress.compressors.search.sensitivity import (
    Config,
    Proxy,
    Workbench,
    group_rows,
)
from modelpress.compressors.search.space import QUALITY_GATES, layer_groups

JOURNAL = "journal.jsonl"
BEST = "best.json"
JOURNAL_VERSION = 1


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
               progress=lambda description, completed, total: None) -> SearchOutcome:
    space = recipe.search
    groups, skipped = layer_groups(model, space)
    original = to_bytes(model)
    bench = Workbench(original, groups, context, calibration, encoder, space.objective, space.proxy_samples)
    fingerprint = _fingerprint(original, space, recipe.gates, context.seed, calibration, evaluation)
    journal = Journal(Path(search_dir) if search_dir else None, fingerprint, resume)
    search = Search(bench, space, recipe.gates, recipe.benchmark, evaluation, original_size, journal, progress)
    search.run()
    config = search.chosen_config()
    notes = [search.note()]
    if "held out" in evaluation.source and search.original_metrics.get("accuracy", 0.0) >= 0.999:
        notes.append("search: the original model is 100 % accurate on the held-out part of --data (training data?); "
                     "the gate may be optimistic for new data: pass --eval-data with samples the model never saw")
    return SearchOutcome(config, bench.passes(config), search.summary(config, skipped), notes)


class Journal:
    """Append-only JSON lines: a header with the fingerprint of model, space, gates, seed and data,
    then one line per finished trial, flushed to disk before the next trial starts."""

    def __init__(self, folder: Path | None, fingerprint: str, resume: bool):
        self.path = folder / JOURNAL if folder else None
        self.folder = folder
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path is None:
            if resume:
                raise InputError("--resume needs --search-dir: the folder of the search's journal")
            return
        if self.path.exists() and self.path.stat().st_size:
            if resume:
                self._load(fingerprint)
                return
            # Not even with --force: that flag replaces outputs, and a journal can hold hours of trials.
            raise InputError(f"{self.path}: a search journal is already there; pass --resume to continue it, "
                             "or choose another --search-dir (or delete it) to start over")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic((json.dumps({"kind": "header", "version": JOURNAL_VERSION, "fingerprint": fingerprint}) + "\n").encode(), self.path)

    def _load(self, fingerprint: str) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            header = json.loads(lines[0])
        except (json.JSONDecodeError, IndexError):
            header = {}
        if header.get("kind") != "header" or header.get("version") != JOURNAL_VERSION:
            raise InputError(f"{self.path}: not a modelpress search journal (version {JOURNAL_VERSION})")
        if header.get("fingerprint") != fingerprint:
            raise InputError(f"{self.path}: the journal was written for another model, search space, gate, seed or "
                             "data; resume with the same inputs, or start over in another --search-dir")
        kept = [lines[0]]
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break  # the line a killed process was writing; that trial is run again
            self.entries[entry["key"]] = entry
            kept.append(line)
        if len(kept) != len(lines):
            write_atomic(("\n".join(kept) + "\n").encode(), self.path)

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def append(self, entry: dict[str, Any]) -> None:
        self.entries[entry["key"]] = entry
        if self.path is not None:
            import os

            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(_finite(entry), sort_keys=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())

    def write_best(self, document: dict[str, Any]) -> None:
        if self.folder is not None:
            write_atomic((json.dumps(_finite(document), indent=2, sort_keys=True) + "\n").encode(), self.folder / BEST)


class Search:
    def __init__(self, bench: Workbench, space, gates, settings, evaluation, original_size: int, journal: Journal,
                 progress):
        self.bench, self.space, self.gates, self.settings = bench, space, gates, settings
        self.evaluation, self.original_size, self.journal = evaluation, original_size, journal
        self.progress = progress
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
        except KeyboardInterrupt:
            self.stopped = "interrupted"

    # ----------------------------------------------------------------------- phases

    def _sensitivity(self) -> None:
        tasks = [(g.name, c.name) for g in self.groups for c in g.choices]
        for done, (group, choice) in enumerate(tasks):
            self.progress("search: sensitivity", done, len(tasks))
            if self.bench.choices[choice].identity:
                self.proxies[(group, choice)] = Proxy(0.0, 0.0, 0.0)
                continue
            key = f"proxy/{group}/{choice}"
            entry = self.journal.get(key)
            if entry is None:
                self._check_time()
                result = self.bench.proxy(group, choice)
                entry = {"key": key, "kind": "proxy", "group": group, "choice": choice, **result.__dict__}
                self.journal.append(entry)
                self.counts["proxy"] += 1
            else:
                self.counts["proxy_reused"] += 1
            self.proxies[(group, choice)] = Proxy(_num(entry["loss"]), _num(entry["cost"]), entry["seconds"], entry["error"])
        self.progress("search: sensitivity", len(tasks), len(tasks))

    def _bisect(self) -> None:
        low, high = -1, len(self.points)
        while high - low > 1:
            index = probe_index(self.points, low, high)
            trial = self._full(dict(zip([g.name for g in self.groups], self.points[index].picks)), "bisection")
            low, high = (index, high) if trial["passed"] else (low, index)

    def _correct(self) -> None:
        failed: set[tuple[str, str]] = set()
        while self.best is not None and self.best["passed"]:
            current = self.best["config"]
            for group, choice in self._moves(current, failed):
                trial = self._full({**current, group: choice}, "correction")
                if trial is self.best:
                    break  # passed and smaller: continue from it
                failed.add((group, choice))
            else:
                return

    def _moves(self, current: Config, failed: set[tuple[str, str]]) -> list[tuple[str, str]]:
        """Moves of one group to a choice predicted cheaper, most saving per predicted loss first."""
        ranked = []
        for gi, group in enumerate(self.groups):
            now = self.proxies[(group.name, current[group.name])]
            for ci, choice in enumerate(group.choices):
                other = self.proxies[(group.name, choice.name)]
                if (group.name, choice.name) in failed or not math.isfinite(other.loss) or other.cost >= now.cost:
                    continue
                ratio = (now.cost - other.cost) / (max(other.loss - now.loss, 0.0) + 1e-12)
                ranked.append((-ratio, gi, ci, group.name, choice.name))
        return [(g, c) for *_, g, c in sorted(ranked)]

    # ----------------------------------------------------------------------- full evaluations

    def _full(self, config: dict[str, str], phase: str) -> dict[str, Any]:
        key = "full/" + json.dumps(config, sort_keys=True)
        if key in self.trials:
            return self.trials[key]
        if len(self.trials) >= self.max_evaluations:
            raise _Stop("evaluation budget")
        self.progress("search: full evaluations", len(self.trials), self.max_evaluations)
        entry = self.journal.get(key)
        if entry is None:
            self._check_time()
            entry = {"key": key, "kind": "full", "phase": phase, "config": config,
                     "predicted_loss": sum(self.proxies[(g, c)].loss for g, c in config.items()), **self._evaluate(config)}
            self.journal.append(entry)
            self.counts["full"] += 1
        else:
            self.counts["full_reused"] += 1
        self.trials[key] = entry
        self.original_metrics = entry.get("original_metrics") or self.original_metrics
        if self.best is None or _rank(entry) < _rank(self.best):
            self.best = entry
            self.journal.write_best(entry)
        return entry

    def _evaluate(self, config: Config) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            model, _ = self.bench.apply(config)
            onnx_bytes = to_bytes(model)
            encoder = self.bench.encoder
            shipped = len(encoder.encode(onnx_bytes)[0]) if encoder is not None else len(onnx_bytes)
            timed = self.space.objective == "latency" or self.gates.max_latency_ratio is not None
            settings = self.settings if timed else benchmark.BenchSettings(self.settings.threads, 0, 0)
            before, after = benchmark.compare(self.bench.original, onnx_bytes, self.evaluation, settings)
        except Exception as exc:  # noqa: BLE001 — a configuration that fails is a failed trial, not the end
            return {"passed": False, "miss": None, "objective": None, "error": f"{type(exc).__name__}: {exc}"[:300],
                    "seconds": time.perf_counter() - started}
        original = Side(self.original_size, _latency(before), before.metrics)
        compressed = Side(len(onnx_bytes), _latency(after), after.metrics, shipped_size_bytes=shipped)
        measured = evaluate_gates(self.gates, original, compressed)
        judged = [self._with_margin(g, after.metrics) for g in measured]
        objective = {"size": len(onnx_bytes), "shipped_size": shipped}.get(self.space.objective)
        return {
            "passed": all(g.passed for g in judged),
            "miss": sum(_shortfall(g) for g in judged),
            "objective": objective if objective is not None else compressed.latency_ms["p50"],
            "quality": _quality(measured),
            "size_bytes": len(onnx_bytes),
            "shipped_size_bytes": shipped,
            "latency_ms": None if compressed.latency_ms is None else compressed.latency_ms["p50"],
            "metrics": {k: round(v, 6) for k, v in after.metrics.items()},
            "original_metrics": before.metrics,
            "gates": [{"name": g.name, "limit": g.limit, "value": m.value, "passed": g.passed, "note": g.note}
                      for g, m in zip(judged, measured)],
            "error": None,
            "seconds": time.perf_counter() - started,
        }

    def _with_margin(self, gate, metrics: dict[str, float]):
        """The gate as the search judges it (``value`` moved by the margin): a count-based gate must hold
        by ``margin`` standard errors.
        The winner of many comparisons on a few hundred samples is otherwise chosen partly by their
        noise, and misses the gate on new data. The standard error of an accuracy drop or an
        agreement, measured on n samples of which d changed prediction, is at most sqrt(d) / n."""
        if gate.name not in ("max_accuracy_drop", "min_agreement") or gate.value is None or not self.space.margin:
            return gate
        samples = self.evaluation.samples
        changed = round((1.0 - metrics.get("agreement", 1.0)) * samples)
        margin = self.space.margin * math.sqrt(changed) / samples
        value = gate.value + margin if gate.name.startswith("max_") else gate.value - margin
        passed = value <= gate.limit if gate.name.startswith("max_") else value >= gate.limit
        note = f"{gate.note + '; ' if gate.note else ''}search margin {margin:.4g} ({self.space.margin:g} standard errors)"
        return replace(gate, value=round(value, 6), passed=passed, note=note)

    def _check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Stop("time budget")

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
            "seconds": round(time.monotonic() - self.started, 3),
            "journal": None if self.journal.path is None else str(self.journal.path),
            "chosen": None if best is None else {k: best.get(k) for k in (
                "config", "passed", "miss", "objective", "predicted_loss", "quality", "size_bytes",
                "shipped_size_bytes", "latency_ms", "metrics", "gates")},
            "groups": group_rows(self.groups, self.proxies, config),
            "trials": [{k: t.get(k) for k in ("phase", "config", "predicted_loss", "objective", "quality", "passed", "miss", "error")}
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


def _shortfall(gate) -> float:
    """How far a gate was missed: in its own units, relative to the limit for the ratio gates."""
    if gate.passed:
        return 0.0
    if gate.value is None:
        return math.inf
    gap = gate.value - gate.limit if gate.name.startswith("max_") else gate.limit - gate.value
    return gap / abs(gate.limit) if gate.name.endswith("_ratio") and gate.limit else gap


def _quality(gates) -> float | None:
    """The quality loss of the first quality gate: accuracy drop, 1 - cosine or 1 - agreement."""
    for gate in gates:
        if gate.name in QUALITY_GATES and gate.value is not None:
            return gate.value if gate.name == "max_accuracy_drop" else 1.0 - gate.value
    return None


def _latency(measurement) -> dict[str, float] | None:
    latency = measurement.latency
    return None if latency is None else {"p50": latency.p50, "p90": latency.p90, "p99": latency.p99, "mean": latency.mean}


def _num(value) -> float:
    return math.inf if value is None else float(value)


def _fingerprint(original: bytes, space, gates, seed: int, *datasets) -> str:
    digest = hashlib.sha256(original)
    settings = {"space": space.model_dump(mode="json"), "gates": gates.model_dump(mode="json"), "seed": seed}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for dataset in datasets:
        for feed in dataset.feeds:
            for name in sorted(feed):
                digest.update(name.encode())
                digest.update(feed[name].tobytes())
        if dataset.labels is not None:
            digest.update(dataset.labels.tobytes())
    return digest.hexdigest()
