"""A recipe's ``alternatives:`` ladder: whole pipelines tried in order, the first whose gates hold kept.

before: a recipe whose ``alternatives:`` list pipelines (rungs) from the most to the least
compressing, each with its own prune / quantize passes (the encode pass, gates and settings are
shared), the normalized model, the calibration context and the evaluation data.
after:  a ``LadderOutcome``: the chosen rung's model and pass records — the job then encodes, writes,
benchmarks and gates it as for any recipe — and the report's ``alternatives`` section: every rung
with what ran, its size, gate values and seconds, and why it was not kept.

One recipe then fits models that tolerate very different things (a digits MLP loses nothing at 95 %
sparsity after recovery; a sentence transformer loses cosine at 30 %), because the gate decides,
measured on the model at hand, instead of the user picking a recipe per model.

Each rung runs on a fresh copy of the input model and is measured on the evaluation data as the job
measures its gates (the shipped size by the shared encode pass; latency only when a latency gate
is set). Work that cannot help is not spent:
* after a rung's prune stage (pruning and its recovery) a quality gate that already fails ends the
  rung: its quantize stage (k-means, GPTQ, another recovery: the costly part) only adds error;
* a rung that changed nothing (no pass modified the model: every weight out of its reach, as int4
  on a CNN) is not kept while a later rung remains, though its quality gates trivially hold;
* a rung with ``max_seconds`` ends once it has run that long (checked whenever a pass reports
  progress, and between passes), for pipelines hopeless on large models, e.g. per-layer pruning
  sensitivity measured by one inference over the data per weight and level.
Without --data, rungs with a pass that calibrates on real inputs are skipped (``rungs_needing_data``;
status ``skipped``, with those passes as the reason) and the others run on the synthesized inputs;
the job refuses the recipe (exit 2) only when every rung would be skipped.
The last rung run always runs to the end, so something is always written: if no rung meets the gates,
the finished rung closest to them (the search's measure: summed shortfall) is kept, and the job
exits 1 as for any missed gate. Decisions are a function of the measured numbers, so the same
inputs and seed give the same bytes — unless a time budget binds, which depends on the machine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx_ir as ir

from modelpress.compressors import benchmark
from modelpress.compressors.errors import PassFailure
from modelpress.compressors.model import fits_in_protobuf, load_model, normalize, to_bytes
from modelpress.compressors.pipeline import PassRecord, run_passes
from modelpress.compressors.report import GateResult, Side, evaluate_gates
from modelpress.compressors.search.space import QUALITY_GATES
from modelpress.compressors.search.trials import _latency, shortfall

Progress = Callable[[str, int, int], None]


@dataclass
class LadderOutcome:
    model: ir.Model
    records: list[PassRecord]
    summary: dict[str, Any]  # the report's ``alternatives`` section
    notes: list[str]


class _OverBudget(BaseException):
    """Raised by a rung's progress hook past its ``max_seconds``. A BaseException, as
    KeyboardInterrupt is, so that the pass manager lets it through instead of naming a failed pass."""


@dataclass
class _Finished:
    index: int
    model: ir.Model
    records: list[PassRecord]
    passed: bool
    miss: float  # summed gate shortfall, the search's measure of how far from the gates


def run_ladder(model: ir.Model, recipe, context, evaluation, original: Path, original_size: int,
               progress: Progress, skip: dict[int, list[str]] | None = None) -> LadderOutcome:
    """Try ``recipe.alternatives`` in order on ``model`` (the first rung run) and on fresh copies of the
    ``original`` file (the others); keep the first that meets ``recipe.gates``, else the closest finished.
    ``skip``: rung index -> the passes that calibrate on real inputs, for rungs not run without --data
    (``rungs_needing_data``); at least one rung must be left to run."""
    rungs = recipe.alternatives
    skip = skip or {}
    runnable = [index for index in range(len(rungs)) if index not in skip]
    if not runnable:
        raise ValueError("every alternative is skipped: the job refuses such a recipe without --data")
    started = time.monotonic()
    judge = _Judge(recipe, evaluation, original, original_size)
    entries = [_entry(rung) for rung in rungs]
    chosen = closest = None
    failure: PassFailure | None = None
    for index in range(len(rungs)):
        if index in skip:
            verb = "calibrates" if len(skip[index]) == 1 else "calibrate"
            entries[index].update(status="skipped", reason=f"no --data: {', '.join(skip[index])} {verb} on real inputs")
            continue
        working = model if index == runnable[0] else _fresh(original)
        result = _attempt(recipe, index, working, context, judge, entries[index], progress, index == runnable[-1])
        if isinstance(result, PassFailure):
            failure = result
        elif result is not None and result.passed:
            chosen = result
            break
        elif result is not None and (closest is None or result.miss < closest.miss):  # ties: the earlier rung
            closest = result  # only the closest finished model stays in memory
    kept = chosen or closest
    if kept is None:  # every rung run failed (the last runs to the end, so it failed too)
        raise failure
    if chosen is None:
        entries[kept.index]["status"] = "closest"
    summary = {"chosen": rungs[kept.index].name, "index": kept.index, "passed": chosen is not None,
               "seconds": round(time.monotonic() - started, 3), "tried": entries}
    return LadderOutcome(kept.model, kept.records, summary, [_note(rungs, entries, kept.index, chosen is not None)])


def rungs_needing_data(recipe) -> dict[int, list[str]]:
    """Rung index -> its passes (and the recipe's shared ones) that calibrate on real inputs, for the
    rungs that cannot run without --data; the rungs left out run on synthesized inputs."""
    from modelpress.compressors.registry import PASSES

    def calibrating(specs) -> list[str]:
        return [f"{s.stage}/{s.name}" for s in specs if PASSES[s.stage][s.name].calibrates(s.config)]

    shared = calibrating(recipe.passes)
    needing = {index: calibrating(rung.passes) + shared for index, rung in enumerate(recipe.alternatives)}
    return {index: names for index, names in needing.items() if names}


def _attempt(recipe, index: int, model: ir.Model, context, judge: _Judge, entry: dict[str, Any],
             progress: Progress, last: bool) -> _Finished | PassFailure | None:
    """Run rung ``index`` on ``model`` and fill its report ``entry``: the finished, measured rung, or
    None when it was abandoned, or the PassFailure that ended it. ``last``: no rung runs after this
    one, so it runs to the end (no early check, no time budget)."""
    rungs = recipe.alternatives
    rung = rungs[index]
    label = f"alternative {index + 1}/{len(rungs)} {rung.name}"
    progress(label, 0, 1)
    started = time.monotonic()
    deadline = started + rung.max_seconds if rung.max_seconds and not last else math.inf
    ran: list[str] = []
    records: list[PassRecord] = []

    def guarded(description: str, completed: int, total: int) -> None:
        if time.monotonic() > deadline:
            raise _OverBudget()
        progress(f"{label}: {description}", completed, total)

    def run(passes, model: ir.Model) -> ir.Model:
        def on_start(graph_pass) -> None:
            guarded(f"{graph_pass.stage}: {graph_pass.name}", 0, 1)
            ran.append(f"{graph_pass.stage}/{graph_pass.name}")

        model, done = run_passes(model, passes, on_start=on_start)
        records.extend(done)
        return model

    passes, encoder = recipe.alternative(index).build(replace(context, progress=guarded))
    pruning = [p for p in passes if p.stage == "prune"]
    check_early = bool(pruning) and len(pruning) < len(passes) and not last
    try:
        if check_early:  # the cheap check: quantizing will not repair a quality miss
            model = run(pruning, model)
            gates, figures = judge.measure(model, None, quality_only=True)
            missed = [g for g in gates if not g.passed]
            if missed:
                entry.update(figures, status="abandoned", stopped_after=ran[-1],
                             reason=f"after its prune stage already {_misses(missed)}: the quantize stage "
                                    "only adds error, so it was not run")
                return None
        model = run([p for p in passes if p.stage != "prune"] if check_early else passes, model)
        gates, figures = judge.measure(model, encoder, quality_only=False)
    except _OverBudget:
        entry.update(status="abandoned", stopped_after=ran[-1] if ran else None,
                     reason=f"ran past its max_seconds ({rung.max_seconds:g} s) during "
                            f"{ran[-1] if ran else 'its start'}; the next alternative was tried")
        return None
    except PassFailure as failure:
        entry.update(status="failed", stopped_after=failure.pass_name, reason=str(failure))
        return failure
    finally:
        entry.update(ran=list(ran), seconds=round(time.monotonic() - started, 3))
    passed = all(g.passed for g in gates)
    reason = None if passed else f"finished, but {_misses([g for g in gates if not g.passed])}"
    if passed and not last and not any(r.modified for r in records):
        # Its gates hold only because it changed nothing (every weight out of its passes' reach, e.g.
        # int4 on a CNN): a later rung that compresses is what the user asked for.
        passed, reason = False, "changed nothing (no pass modified the model); the next alternative was tried"
    entry.update(figures, status="passed" if passed else "missed", reason=reason)
    return _Finished(index, model, records, passed, sum(shortfall(g) for g in gates))


class _Judge:
    """Measures a rung's model on the evaluation data the way the job measures its gates: against the
    original's outputs (computed once), size of the runnable bytes and of the shipped artifact."""

    def __init__(self, recipe, evaluation, original: Path, original_size: int):
        self.gates, self.evaluation, self.original, self.original_size = recipe.gates, evaluation, original, original_size
        self.timed = recipe.gates.max_latency_ratio is not None
        threads = recipe.benchmark.threads
        self.settings = recipe.benchmark if self.timed else benchmark.BenchSettings(threads, 0, 0)
        self.reference = None if self.timed else benchmark.run_outputs(benchmark.make_session(original, threads), evaluation)
        self.quality_gates = recipe.gates.model_copy(update={
            name: None for name in type(recipe.gates).model_fields if name not in QUALITY_GATES})

    def measure(self, model: ir.Model, encoder, quality_only: bool) -> tuple[list[GateResult], dict[str, Any]]:
        if fits_in_protobuf(model):
            onnx_bytes = to_bytes(model)
            source: Any = onnx_bytes
            size = len(onnx_bytes)
        else:  # > 2 GiB: measured from a file with external data, as the job writes it
            import tempfile

            from modelpress.compressors.model import save_model

            folder = tempfile.TemporaryDirectory(prefix="modelpress-alternative-")
            source = Path(folder.name) / "alternative.onnx"
            save_model(model, source)
            onnx_bytes, size = None, benchmark.model_bytes(source)
        settings = benchmark.BenchSettings(self.settings.threads, 0, 0) if quality_only else self.settings
        before, after = benchmark.compare(self.original, source, self.evaluation, settings,
                                          reference_outputs=None if settings.runs else self.reference)
        shipped = size
        if encoder is not None and onnx_bytes is not None and not quality_only:
            shipped = len(encoder.encode(onnx_bytes)[0])
        original = Side(self.original_size, _latency(before), before.metrics)
        compressed = Side(size, _latency(after), after.metrics, shipped_size_bytes=shipped)
        gates = evaluate_gates(self.quality_gates if quality_only else self.gates, original, compressed)
        figures: dict[str, Any] = {
            "size_bytes": size,
            "shipped_size_bytes": None if quality_only else shipped,
            "size_ratio": None if quality_only else round(self.original_size / shipped, 4) if shipped else None,
            "metrics": {k: round(v, 6) for k, v in after.metrics.items()},
            "gates": [{"name": g.name, "limit": g.limit, "value": g.value, "passed": g.passed} for g in gates],
        }
        return gates, figures


def _fresh(path: Path) -> ir.Model:
    """The input model as the job loaded it (external data stays lazy until a pass touches it)."""
    model = load_model(path)
    normalize(model)
    return model


def _entry(rung) -> dict[str, Any]:
    return {"name": rung.name, "description": rung.description, "status": "not tried",
            "passes": [f"{s.stage}/{s.name}" for s in rung.passes], "ran": [], "stopped_after": None, "reason": None,
            "size_bytes": None, "shipped_size_bytes": None, "size_ratio": None, "metrics": {}, "gates": [],
            "seconds": None}


def _misses(gates: list[GateResult]) -> str:
    return "; ".join(f"{g.name} {'n/a' if g.value is None else f'{g.value:.4g}'} misses its limit {g.limit:g}"
                     for g in gates)


def _note(rungs, entries, kept: int, passed: bool) -> str:
    before = [f"{rungs[i].name} ({entries[i]['status']})" for i in range(len(rungs)) if i != kept
              and entries[i]["status"] not in ("not tried", "skipped")]
    tried = f"; also tried: {', '.join(before)}" if before else ""
    skipped = [rungs[i].name for i in range(len(rungs)) if entries[i]["status"] == "skipped"]
    if skipped:
        tried += f"; skipped without --data (they calibrate on real inputs): {', '.join(skipped)}"
    if passed:
        return (f"alternatives: {rungs[kept].name!r} (alternative {kept + 1} of {len(rungs)}) is the first "
                f"that met the gates{tried}")
    return (f"alternatives: NO alternative met the gates; the closest finished one, {rungs[kept].name!r}, "
            f"is written{tried}")
