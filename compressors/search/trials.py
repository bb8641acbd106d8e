"""One trial of the search, wherever it runs: a proxy measurement or a full evaluation.

before: a ``TrialRunner`` (the model, its layer groups, calibration and evaluation data, gates,
benchmark settings, and the original model's outputs on the evaluation data, measured once) and a
task: ``("proxy", group, choice)`` or ``("full", config)``.
after:  a plain dict of the trial's measurements (JSON-ready, what the journal stores), the same
whether the task ran in this process, in a process pool or as a Ray task.

The runner is pickled once per search and shipped to the workers (``ray.put`` or a pool
initializer); everything a worker would otherwise recompute per trial — the original's reference
outputs for the proxies and for the gate, the objective of the unchanged model — is measured here
before it is shipped. A trial is a pure function of the runner and the task, so the search's
decisions do not depend on where or in which order trials finish.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import replace
from typing import Any

from modelpress.compressors import benchmark
from modelpress.compressors.model import to_bytes
from modelpress.compressors.report import Side, evaluate_gates
from modelpress.compressors.search.sensitivity import Config, Workbench
from modelpress.compressors.search.space import QUALITY_GATES

Task = tuple  # ("proxy", group, choice) | ("full", config)


def _no_progress(description: str, completed: int, total: int) -> None:
    """Workers report nothing: a progress display lives in the main process only (and a closure
    over it would not pickle)."""


class TrialRunner:
    def __init__(self, bench: Workbench, space, gates, settings, evaluation, original_size: int):
        self.bench, self.space, self.gates, self.settings = bench, space, gates, settings
        self.evaluation, self.original_size = evaluation, original_size
        self.timed = space.objective == "latency" or gates.max_latency_ratio is not None
        self.reference_outputs = None

    def prepare(self) -> TrialRunner:
        """Measure what every trial needs from the original, once, and drop what cannot travel."""
        _ = self.bench.reference, self.bench.base_cost  # proxies: the original's outputs and objective
        bench = self.bench = copy.copy(self.bench)  # the caller's keeps its progress hook
        if not self.timed:  # with timing, the original runs beside each candidate anyway
            session = benchmark.make_session(bench.original, self.settings.threads)
            self.reference_outputs = benchmark.run_outputs(session, self.evaluation)
        quiet = bench.context = replace(bench.context, progress=_no_progress)
        if bench.encoder is not None:
            bench.encoder = copy.copy(bench.encoder)
            bench.encoder.context = quiet
        return self

    def run(self, task: Task) -> dict[str, Any]:
        if task[0] == "proxy":
            result = self.bench.proxy(task[1], task[2])
            return {"loss": result.loss, "cost": result.cost, "seconds": result.seconds, "error": result.error}
        return self.evaluate(task[1])

    def evaluate(self, config: Config) -> dict[str, Any]:
        """The configuration applied to a fresh copy and measured on the evaluation data exactly as
        the final report measures it; a configuration that fails is a failed trial, not the end."""
        started = time.perf_counter()
        try:
            model, _ = self.bench.apply(config)
            onnx_bytes = to_bytes(model)
            encoder = self.bench.encoder
            shipped = len(encoder.encode(onnx_bytes)[0]) if encoder is not None else len(onnx_bytes)
            settings = self.settings if self.timed else benchmark.BenchSettings(self.settings.threads, 0, 0)
            before, after = benchmark.compare(self.bench.original, onnx_bytes, self.evaluation, settings,
                                              reference_outputs=self.reference_outputs)
        except Exception as exc:  # noqa: BLE001
            return {"passed": False, "miss": None, "objective": None, "error": f"{type(exc).__name__}: {exc}"[:300],
                    "seconds": time.perf_counter() - started}
        original = Side(self.original_size, _latency(before), before.metrics)
        compressed = Side(len(onnx_bytes), _latency(after), after.metrics, shipped_size_bytes=shipped)
        measured = evaluate_gates(self.gates, original, compressed)
        judged = [self._with_margin(g, after.metrics) for g in measured]
        objective = {"size": len(onnx_bytes), "shipped_size": shipped}.get(self.space.objective)
        return {
            "passed": all(g.passed for g in judged),
            "miss": sum(shortfall(g) for g in judged),
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


def shortfall(gate) -> float:
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
