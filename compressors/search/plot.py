"""The search's trials as a PNG: size against quality loss, the Pareto front joined, the chosen one marked.

before: the ``search`` section of a report (``trials``, ``pareto``, ``chosen``, the gate).
after:  PNG bytes (the CLI writes them to ``--plot``). matplotlib is an optional extra,
``pip install 'modelpress[plot]'``, imported only here; ``check_plotting`` says so before a search runs.
"""

from __future__ import annotations

import importlib.util
import io

from modelpress.compressors.errors import InputError

PLOT_MISSING = "--plot needs matplotlib, an optional extra: pip install 'modelpress[plot]'"


def check_plotting() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise InputError(PLOT_MISSING)


def pareto_png(search: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    from matplotlib.figure import Figure

    size_key = "shipped_size_bytes" if search.get("objective") == "shipped_size" else "size_bytes"
    measured = [t for t in search.get("trials", []) if t.get(size_key) is not None and t.get("quality") is not None]
    figure = Figure(figsize=(6.4, 4.2), dpi=110)
    axes = figure.add_subplot()
    for passed, color, label in ((True, "tab:green", "meets the gate"), (False, "tab:red", "misses the gate")):
        points = [t for t in measured if bool(t["passed"]) == passed]
        axes.scatter([t[size_key] / 1024 for t in points], [max(t["quality"], 1e-9) for t in points],
                     c=color, s=22, label=label, alpha=0.8)
    front = search.get("pareto", [])
    if front:
        axes.plot([p["size_bytes"] / 1024 for p in front], [max(p["quality"], 1e-9) for p in front],
                  color="0.4", lw=1, ls="--", label="Pareto front")
    chosen = search.get("chosen") or {}
    if chosen.get(size_key) is not None and chosen.get("quality") is not None:
        axes.scatter([chosen[size_key] / 1024], [max(chosen["quality"], 1e-9)], s=160, facecolors="none",
                     edgecolors="black", lw=1.5, label="chosen")
    limit = _quality_limit(search.get("constraint", {}))
    if limit is not None:
        axes.axhline(limit, color="tab:orange", lw=1, label="gate")
    axes.set_yscale("log")
    axes.set_xlabel(f"{'shipped' if size_key == 'shipped_size_bytes' else 'runnable'} size (KB)")
    axes.set_ylabel("quality loss (accuracy drop, 1 - cosine or 1 - agreement)")
    axes.set_title(f"search: {search.get('evaluations')} full evaluations, {search.get('proxy_evaluations')} proxy",
                   fontsize=10)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    # No timestamps or software tags in the file: same trials, same bytes.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _quality_limit(constraint: dict) -> float | None:
    if constraint.get("max_accuracy_drop") is not None:
        return max(constraint["max_accuracy_drop"], 1e-9)
    for name in ("min_cosine", "min_agreement"):
        if constraint.get(name) is not None:
            return max(1.0 - constraint[name], 1e-9)
    return None
