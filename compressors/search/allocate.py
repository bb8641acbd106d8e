"""Allocation: one choice per layer group minimising the summed cost under a summed predicted loss.

before: for every group, its options ``(choice, predicted loss, cost)`` from the sensitivity step —
cost is the objective's change when only that group takes the choice (bytes or ms; negative saves),
loss the proxy's output error, both assumed additive over groups (the usual assumption of
mixed-precision allocation, HAWQ-V3 / "Optimal Brain Compression"-style budgets).
after:  the Pareto frontier of whole configurations: every configuration no other one beats on both
summed loss and summed cost, sorted by loss (ascending; cost descending). The cheapest
configuration within a loss budget ``B`` is the last frontier point with loss <= B, so the full
evaluations can bisect on ``B`` by bisecting on the frontier's index.

Why a frontier by dynamic programming instead of a Lagrangian relaxation (min cost + λ·loss per
group, λ bisected): the Lagrangian only reaches the lower convex hull of the frontier and can miss
the best configuration for a budget by a whole step of one group; the DP is exact (a small
multiple-choice knapsack, checked against brute force in the tests). Dominated partial sums are
dropped after every group, so the frontier stays small; above ``cap`` points it is thinned evenly
(then it is exact only at the points it keeps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

FRONTIER_CAP = 4096


@dataclass(frozen=True)
class Option:
    choice: str
    loss: float
    cost: float


@dataclass(frozen=True)
class Point:
    loss: float
    cost: float
    picks: tuple[str, ...]  # one choice per group, in group order


def frontier(options: Sequence[Sequence[Option]], cap: int = FRONTIER_CAP) -> list[Point]:
    """Non-dominated configurations by (summed loss, summed cost), loss ascending.

    Options with a non-finite loss or cost (a choice that failed on that group) are never picked;
    a group with no usable option leaves the frontier empty."""
    points = [Point(0.0, 0.0, ())]
    for group in options:
        usable = [o for o in group if math.isfinite(o.loss) and math.isfinite(o.cost)]
        merged = [Point(p.loss + o.loss, p.cost + o.cost, p.picks + (o.choice,)) for p in points for o in usable]
        points = _non_dominated(merged)
        if len(points) > cap:
            points = _thin(points, cap)
    return points


def _non_dominated(points: list[Point]) -> list[Point]:
    # Ties broken by the picks, so that the same inputs always give the same frontier.
    points.sort(key=lambda p: (p.loss, p.cost, p.picks))
    kept: list[Point] = []
    for point in points:
        if not kept or point.cost < kept[-1].cost:
            kept.append(point)
    return kept


def _thin(points: list[Point], cap: int) -> list[Point]:
    step = (len(points) - 1) / (cap - 1)
    return [points[round(i * step)] for i in range(cap)]


def cheapest_within(points: Sequence[Point], budget: float) -> Point | None:
    """The frontier point of least cost whose loss is at most ``budget`` (None if none is)."""
    best = None
    for point in points:
        if point.loss <= budget:
            best = point
        else:
            break
    return best


def probe_index(points: Sequence[Point], low: int, high: int) -> int:
    """The frontier index strictly between ``low`` (known to pass, -1: none) and ``high`` (known to
    fail, ``len(points)``: none) whose loss is nearest the geometric middle of their losses:
    predicted losses span orders of magnitude, so the bisection on the budget is on its log."""
    first, last = low + 1, high - 1
    floor = min((p.loss for p in points if p.loss > 0), default=1.0) / 10

    def log(i: int) -> float:
        return math.log(max(points[i].loss, floor))

    a = log(low) if low >= 0 else log(first)
    b = log(high) if high < len(points) else log(last)
    target = (a + b) / 2
    return min(range(first, last + 1), key=lambda i: (abs(log(i) - target), i))


def pareto(trials: Sequence[dict], objective: str) -> list[dict]:
    """The non-dominated full evaluations by (size, quality loss, latency), smallest first; size is
    the shipped artifact when that is the objective, else the runnable .onnx."""
    size = "shipped_size_bytes" if objective == "shipped_size" else "size_bytes"
    measured = [t for t in trials if t.get(size) is not None and t.get("quality") is not None]

    def dims(t: dict) -> tuple[float, float, float]:
        return (t[size], t["quality"], t["latency_ms"] if t.get("latency_ms") is not None else 0.0)

    def dominates(a: tuple, b: tuple) -> bool:
        return all(x <= y for x, y in zip(a, b)) and a != b

    front = [t for t in measured if not any(dominates(dims(o), dims(t)) for o in measured)]
    return [{"config": t["config"], "size_bytes": t[size], "quality": t["quality"], "latency_ms": t.get("latency_ms"),
             "passed": t["passed"]} for t in sorted(front, key=dims)]
