"""Everything the terminal shows: rich tables, progress, Markdown reports, error lines."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator

from rich.console import Console
from rich.table import Table

out = Console(highlight=False, soft_wrap=False)
err = Console(stderr=True, highlight=False)


def error(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", markup=True, highlight=False) if err.is_terminal else print(f"error: {message}", file=sys.stderr)


def _interactive(quiet: bool) -> bool:
    return not quiet and err.is_terminal and not os.environ.get("CI")


@contextlib.contextmanager
def progress(quiet: bool) -> Iterator:
    """A progress callback (description, completed, total): a live bar on a terminal, silent otherwise."""
    if not _interactive(quiet):
        yield lambda description, completed, total: None
        return
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=True) as bar:
        tasks: dict[str, int] = {}

        def update(description: str, completed: int, total: int) -> None:
            # "key\ttext": one line per key whose text changes (the search's live best-so-far line).
            key, _, text = description.partition("\t")
            shown = f"{key}: {text}" if text else key
            if key not in tasks:
                tasks[key] = bar.add_task(shown, total=max(total, 1))
            bar.update(tasks[key], completed=completed, total=max(total, 1), description=shown)

        yield update


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _rows(report) -> list[tuple[str, str, str, str]]:
    """(metric, original, compressed, change) rows shared by the terminal and Markdown views."""
    o, c = report.original, report.compressed
    rows = [("size (runnable .onnx)", _size(o.size_bytes), _size(c.size_bytes), f"{o.size_bytes / c.size_bytes:.2f}x smaller")]
    if report.artifacts.get("packed"):
        rows.append(("size (shipped .mpk)", _size(o.size_bytes), _size(c.shipped_size_bytes),
                     f"{o.size_bytes / c.shipped_size_bytes:.2f}x smaller"))
    if o.latency_ms and c.latency_ms:
        for key in ("p50", "p90", "p99"):
            rows.append((f"latency {key}", f"{o.latency_ms[key]:.3f} ms", f"{c.latency_ms[key]:.3f} ms",
                         f"{c.latency_ms[key] / o.latency_ms[key]:.2f}x"))
    if o.peak_memory_mb is not None and c.peak_memory_mb is not None:
        rows.append(("session memory", f"{o.peak_memory_mb:.1f} MB", f"{c.peak_memory_mb:.1f} MB", ""))
    if "accuracy" in o.metrics:
        rows.append(("accuracy", f"{o.metrics['accuracy']:.4f}", f"{c.metrics.get('accuracy', float('nan')):.4f}",
                     f"{(c.metrics.get('accuracy', 0) - o.metrics['accuracy']) * 100:+.2f} pp"))
    for key in ("agreement", "cosine", "max_abs_error"):
        if key in c.metrics:
            rows.append((key, "", f"{c.metrics[key]:.4f}" if key != "max_abs_error" else f"{c.metrics[key]:.3g}", "vs original"))
    return rows


def compress_report(report, quiet: bool = False) -> None:
    table = Table(title=f"modelpress: {report.model} → {report.artifacts['onnx']}", title_justify="left")
    for col in ("", "original", "compressed", "change"):
        table.add_column(col, justify="left" if not col else "right")
    for row in _rows(report):
        table.add_row(*row)
    out.print(table)
    if not quiet:
        passes = Table(title="passes", title_justify="left")
        for col in ("stage", "pass", "seconds", "summary"):
            passes.add_column(col)
        for record in report.passes:
            passes.add_row(record["stage"], record["name"], f"{record['seconds']:.2f}", _stats_line(record["stats"]))
        out.print(passes)
        if getattr(report, "search", None):
            _search_tables(report.search)
        if getattr(report, "alternatives", None):
            _alternatives_table(report.alternatives)
        tensors = _tensor_rows(report)
        if tensors:
            table = Table(title="weights (shipped: ~ = share of the compressed graph skeleton)", title_justify="left")
            for col in TENSOR_COLUMNS:
                table.add_column(col, justify="left" if col == "tensor" else "right")
            for row in tensors:
                table.add_row(*row)
            out.print(table)
        for record in report.passes:
            for line in _pass_notes(record):
                out.print(f"{record['name']}: {line}")
        for note in report.notes:
            out.print(f"note: {note}")
    for gate in report.gates:
        mark = "PASS" if gate.passed else "MISS"
        value = "n/a" if gate.value is None else f"{gate.value:.4g}"
        out.print(f"gate {gate.name}: {value} (limit {gate.limit:g}) {mark}{'  — ' + gate.note if gate.note else ''}")


def _search_tables(search: dict) -> None:
    """The search's trials in the order they ran, then each layer group's choice and why."""
    size_key = "shipped_size_bytes" if search.get("objective") == "shipped_size" else "size_bytes"
    chosen = (search.get("chosen") or {}).get("config")
    trials = Table(title=f"search trials ({search['evaluations']} full evaluations of {search['max_evaluations']}, "
                   f"{search['proxy_evaluations']} proxy; stopped: {search['stopped']})", title_justify="left")
    for col in ("#", "phase", "configuration", "size", "quality loss", "result", "seconds"):
        trials.add_column(col, justify="right" if col in ("#", "size", "quality loss", "seconds") else "left")
    for i, trial in enumerate(search.get("trials", []), 1):
        config = ", ".join(f"{g}={c}" for g, c in trial["config"].items())
        verdict = "error" if trial.get("error") else ("pass" if trial["passed"] else "miss")
        quality = "-" if trial.get("quality") is None else f"{trial['quality']:.4g}"
        trials.add_row(str(i), trial["phase"], config[:70] + ("*" if trial["config"] == chosen else ""),
                       _size(trial.get(size_key)), quality, verdict,
                       "-" if trial.get("seconds") is None else f"{trial['seconds']:.1f}")
    out.print(trials)
    groups = Table(title="search: layer groups (* = chosen configuration above)", title_justify="left")
    for col in ("group", "elements", "choice", "why"):
        groups.add_column(col, justify="right" if col == "elements" else "left")
    for row in search.get("groups", []):
        groups.add_row(row["name"], f"{row['elements']:,}", str(row["choice"]), row["why"])
    out.print(groups)


ALTERNATIVE_COLUMNS = ("#", "alternative", "result", "shipped", "x smaller", "gates", "seconds", "why not kept")


def _alternative_rows(ladder: dict) -> list[tuple[str, ...]]:
    """The recipe's alternatives in the order tried: result, size, gate values, time, and the reason."""
    rows = []
    for i, rung in enumerate(ladder.get("tried", []), 1):
        gates = ", ".join(f"{g['name']} " + ("n/a" if g["value"] is None else f"{g['value']:.4g}")
                          for g in rung.get("gates", []))
        rows.append((str(i), rung["name"], rung["status"], _size(rung.get("shipped_size_bytes")),
                     "-" if rung.get("size_ratio") is None else f"{rung['size_ratio']:.2f}x", gates or "-",
                     "-" if rung.get("seconds") is None else f"{rung['seconds']:.1f}", rung.get("reason") or ""))
    return rows


def _alternatives_table(ladder: dict) -> None:
    verdict = "kept: the first that met the gates" if ladder.get("passed") else "NONE met the gates: the closest is kept"
    table = Table(title=f"alternatives, tried in order ({verdict}: {ladder.get('chosen')})", title_justify="left")
    for col in ALTERNATIVE_COLUMNS:
        table.add_column(col, justify="right" if col in ("#", "shipped", "x smaller", "seconds") else "left")
    for row in _alternative_rows(ladder):
        table.add_row(*row)
    out.print(table)


TENSOR_COLUMNS = ("tensor", "original", "runnable", "shipped", "sparsity", "codebook bits", "bits/weight")


def _tensor_rows(report) -> list[tuple[str, ...]]:
    """The per-tensor bit-width / sparsity table, as text cells."""
    table = report.tensor_table() if hasattr(report, "tensor_table") else []

    def cell(value, fmt="{}"):
        return "-" if value is None else fmt.format(value)

    return [(row["tensor"], _size(row["original_bytes"]), _size(row["runnable_bytes"]),
             ("~" if row.get("in_skeleton") else "") + _size(row["shipped_bytes"]),
             cell(row["sparsity"], "{:.1%}"), cell(row["codebook_bits"]), cell(row["bits_per_weight"], "{:.3f}"))
            for row in table]


def _pass_notes(record: dict) -> list[str]:
    """What a pass left undone and why: tensors left as they were (grouped by reason), int8
    kernels given back, and the pass's own notes."""
    stats = record.get("stats") or {}
    lines = [str(n) for n in stats.get("notes", [])]
    verification = stats.get("verification") or {}
    lines += [f"reverted {r}" for r in verification.get("reverted", [])]
    reduce_range = stats.get("reduce_range") or {}
    if reduce_range.get("used"):
        lines.append(f"7-bit kernel weights (reduce range): {reduce_range.get('why')}")
    by_reason: dict[str, list[str]] = {}
    for item in stats.get("skipped") or []:
        if isinstance(item, dict):
            by_reason.setdefault(str(item.get("reason", "")), []).append(str(item.get("tensor", item.get("group", "?"))))
    for reason, names in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        lines.append(f"left as is: {shown} — {reason}")
    return lines


def _stats_line(stats: dict) -> str:
    parts = [f"{k}={v}" for k, v in stats.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    skipped = stats.get("skipped")
    if skipped:
        parts.append(f"skipped={len(skipped)}")
    return ", ".join(parts)[:160]


def report_markdown(report) -> str:
    lines = [f"### modelpress: `{report.model}` → `{report.artifacts['onnx']}`", "",
             f"Recipe: `{report.recipe}`", "", "| | original | compressed | change |", "|---|---:|---:|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in _rows(report)]
    lines += ["", "| stage | pass | seconds | summary |", "|---|---|---:|---|"]
    lines += [f"| {r['stage']} | {r['name']} | {r['seconds']:.2f} | {_stats_line(r['stats'])} |" for r in report.passes]
    if getattr(report, "alternatives", None):
        lines += ["", "| " + " | ".join(ALTERNATIVE_COLUMNS) + " |", "|---" * len(ALTERNATIVE_COLUMNS) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in _alternative_rows(report.alternatives)]
    tensors = _tensor_rows(report)
    if tensors:
        lines += ["", "| " + " | ".join(TENSOR_COLUMNS) + " |", "|---" + "|---:" * (len(TENSOR_COLUMNS) - 1) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in tensors]
    if report.gates:
        lines += ["", "| gate | limit | value | result |", "|---|---:|---:|---|"]
        lines += [f"| {g.name} | {g.limit:g} | {'n/a' if g.value is None else f'{g.value:.4g}'} | {'✅ pass' if g.passed else '❌ miss'} |" for g in report.gates]
    pass_notes = [f"- {r['name']}: {line}" for r in report.passes for line in _pass_notes(r)]
    if report.notes or pass_notes:
        lines += [""] + pass_notes + [f"- {n}" for n in report.notes]
    env = report.environment
    lines += ["", f"<sub>onnxruntime {env.get('onnxruntime')} · {env.get('cpu')} · {env.get('threads')} threads</sub>", ""]
    return "\n".join(lines)


def bench_result(model, dataset, measurement, environment) -> dict:
    latency = measurement.latency
    result = {
        "model": str(model),
        "size_bytes": measurement.size_bytes,
        "latency_ms": {"p50": latency.p50, "p90": latency.p90, "p99": latency.p99, "mean": latency.mean},
        "throughput": latency.throughput,
        "peak_memory_mb": measurement.peak_memory_mb,
        "metrics": measurement.metrics,
        "samples": dataset.samples,
        "environment": environment,
    }
    table = Table(title=f"modelpress bench: {model}", title_justify="left")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("size", _size(measurement.size_bytes))
    for key in ("p50", "p90", "p99"):
        table.add_row(f"latency {key}", f"{getattr(latency, key):.3f} ms")
    table.add_row("throughput", f"{latency.throughput:.1f} samples/s")
    if measurement.peak_memory_mb is not None:
        table.add_row("session memory", f"{measurement.peak_memory_mb:.1f} MB")
    for key, value in measurement.metrics.items():
        table.add_row(key, f"{value:.4f}")
    if "accuracy" not in measurement.metrics:
        table.add_row("accuracy", "not measured (no labels)")
    out.print(table)
    return result


def model_summary(summary: dict, top: int, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(summary))
        return
    out.print(f"[bold]{summary['model']}[/]: opset {summary['opset']}, producer {summary['producer']}, "
              f"{summary['parameters']:,} parameters, weights {_size(summary['weight_bytes'])} of {_size(summary['file_bytes'])} file, "
              f"compressible {_size(summary['compressible_bytes'])}, {summary['subgraphs']} subgraph(s)")
    by_op = Table(title="weights by consuming op", title_justify="left")
    for col in ("op", "tensors", "parameters", "bytes"):
        by_op.add_column(col, justify="right" if col != "op" else "left")
    for op, row in summary["by_consumer_op"].items():
        by_op.add_row(op, str(row["tensors"]), f"{row['parameters']:,}", _size(row["bytes"]))
    out.print(by_op)
    tensors = Table(title=f"largest {min(top, len(summary['tensors']))} tensors", title_justify="left")
    for col in ("tensor", "dtype", "shape", "bytes", "used by", "compressible"):
        tensors.add_column(col)
    for entry in summary["tensors"][:top]:
        verdict = "yes" if entry["compressible"] else f"no: {entry.get('left_alone_because', '')}"
        tensors.add_row(entry["name"] + (" (subgraph)" if entry["subgraph"] else ""), entry["dtype"], "x".join(map(str, entry["shape"])) or "scalar",
                        _size(entry["bytes"]), ",".join(entry["consumers"]), verdict)
    out.print(tensors)
    for quirk in summary["quirks"]:
        out.print(f"quirk: {quirk}")


def artifact_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        out.print_json(json.dumps(summary, default=str))
        return
    scalars = {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}
    out.print(", ".join(f"{k}: {v}" for k, v in scalars.items()))
    for key, value in summary.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            table = Table(title=key, title_justify="left")
            columns = list(value[0])
            for col in columns:
                table.add_column(col)
            for row in value:
                table.add_row(*(f"{row.get(c):.3f}" if isinstance(row.get(c), float) else str(row.get(c)) for c in columns))
            out.print(table)


def recipe_list(descriptions: dict[str, str]) -> None:
    table = Table(title="shipped recipes (modelpress recipes show NAME)", title_justify="left")
    table.add_column("name")
    table.add_column("what it does")
    for name, description in descriptions.items():
        table.add_row(name, description)
    out.print(table)


def recipe_ok(recipe) -> None:
    stages = ", ".join(f"{p.stage}/{p.name}" for p in recipe.passes) or "no passes"
    if getattr(recipe, "alternatives", ()):
        rungs = " | ".join(f"{a.name}: {', '.join(f'{p.stage}/{p.name}' for p in a.passes)}" for a in recipe.alternatives)
        stages = f"alternatives tried in order ({rungs}), then {stages}"
    gates = ", ".join(f"{k}={v}" for k, v in recipe.gates.model_dump().items() if v is not None) or "none"
    out.print(f"{recipe.source}: ok — passes: {stages}; gates: {gates}")


def decoded(artifact, output, size: int) -> None:
    out.print(f"{artifact} → {output} ({_size(size)})")


def pass_table(passes_by_stage: dict) -> None:
    table = Table(title="passes (recipe `type:` per stage)", title_justify="left")
    for col in ("stage", "type", "what it does", "keys (default)"):
        table.add_column(col)
    for stage, passes in passes_by_stage.items():
        for name, cls in passes.items():
            keys = ", ".join(f"{key}={field.default!r}" for key, field in cls.config_cls.model_fields.items())
            table.add_row(stage, name, cls.summary, keys or "-")
    out.print(table)
