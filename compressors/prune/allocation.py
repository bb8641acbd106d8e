"""Per-tensor sparsity by measured sensitivity, shared by the magnitude and the calibrated passes.

before: a model, the weights to prune, a list of sparsity levels, calibration feeds and a way to
prune one weight to a level (by magnitude, or by Wanda's |w|·‖x‖ score for the calibrated passes).
after:  per weight, the relative change of the model's first output when that weight alone is pruned
to each level (a curve); and per weight the sparsity that reaches a mean target at the least summed
change (a greedy walk on each curve's lower convex hull).

Why measure: uniform sparsity treats a 10-class head like a 1536-wide hidden layer; the output change
each tensor causes says where zeros cost least. The change is measured on real positions only when
the feeds carry a padding mask (``attention_mask``), as the pruning statistics are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

Feed = dict[str, np.ndarray]
# At most this many model runs for all the curves together (weights x nonzero levels x feeds):
# DenseNet-121 at batch 1 has 120 weights and 6 levels, so 32 images would take 23,040 runs (0.1-0.2 s
# each on 2 cores). Past the bound the feeds are thinned, evenly over the data, down to one;
# all-MiniLM-L6-v2's 36 weights x 6 levels x 4 feeds (864) stay as they are.
MAX_CURVE_RUNS = 1200
PruneOne = Callable[[ir.Value, np.ndarray, float], np.ndarray]  # (weight, values, level) -> pruned values


def measure_curves(model: ir.Model, values: list[ir.Value], levels: Sequence[float], feeds: Sequence[Feed],
                   prune: PruneOne, threads: int, mask_name: str | None = None,
                   progress: Callable[[str, int, int], None] = lambda d, c, t: None) -> dict[str, list[float]]:
    """Relative squared change of the first output with one weight pruned to each level, the rest
    untouched: every weight becomes an overridable graph input of one session. Feeds are thinned to
    keep the runs under ``MAX_CURVE_RUNS``."""
    from modelpress.compressors.benchmark import make_session  # onnxruntime: loaded only when used

    affordable = max(1, MAX_CURVE_RUNS // max(1, len(values) * sum(1 for level in levels if level > 0)))
    if len(feeds) > affordable:
        feeds = [feeds[i] for i in np.unique(np.linspace(0, len(feeds) - 1, affordable).round().astype(int))]

    proto = ir.to_proto(model)
    for value in values:  # an input named like an initializer overrides it at run time
        proto.graph.input.append(_value_info(value))
    session = make_session(proto.SerializeToString(), threads)
    output = session.get_outputs()[0].name
    originals = {v.name: v.const_value.numpy() for v in values}
    masks = [feed.get(mask_name) if mask_name else None for feed in feeds]

    def run(overrides: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(session.run([output], {**feed, **originals, **overrides})[0], np.float64) for feed in feeds]

    reference = run({})
    curves: dict[str, list[float]] = {}
    for index, value in enumerate(values):
        weights = originals[value.name]
        curve = []
        for step, level in enumerate(levels):  # progress per run: a large model takes seconds each
            progress("pruning sensitivity", index * len(levels) + step, len(values) * len(levels))
            if level == 0:  # nothing pruned: the output is the reference itself
                curve.append(0.0)
                continue
            curve.append(relative_change(reference, run({value.name: prune(value, weights, level).astype(weights.dtype)}),
                                         masks))
        curves[value.name] = curve
    return curves


def relative_change(reference: list[np.ndarray], outputs: list[np.ndarray],
                    masks: Sequence[np.ndarray | None] | None = None) -> float:
    """Squared change of the output over its squared norm (embeddings, regressions, any shape); with a
    [batch, seq] mask per feed whose shape leads the output's, over the real positions only."""
    change = scale = 0.0
    for out, ref, mask in zip(outputs, reference, masks or [None] * len(reference)):
        if mask is not None and ref.ndim >= 2 and ref.shape[:2] == np.shape(mask):
            keep = np.asarray(mask) != 0
            out, ref = out[keep], ref[keep]
        change += float(np.sum((out - ref) ** 2))
        scale += float(np.sum(ref**2))
    return change / (scale or 1.0)


def _value_info(value: ir.Value):
    from onnx import helper

    tensor = value.const_value
    return helper.make_tensor_value_info(value.name, int(tensor.dtype), list(tensor.shape.numpy()))


def allocate_levels(curves: dict[str, list[float]], sizes: dict[str, int], levels: Sequence[float],
                    wanted: float) -> dict[str, float]:
    """Greedy on each curve's lower convex hull: always take the step that zeroes weights at the
    smallest output change per zeroed weight, until ``wanted`` weights are zero; the last step is
    interpolated so the total is exact (or every tensor ends at its top level)."""
    position = {name: 0 for name in curves}
    sparsity = {name: levels[0] for name in curves}
    zeros = sum(sizes[n] * levels[0] for n in curves)
    while zeros < wanted:
        best = None
        for name, curve in curves.items():
            here = position[name]
            for ahead in range(here + 1, len(levels)):
                gain = sizes[name] * (levels[ahead] - levels[here])
                slope = (curve[ahead] - curve[here]) / gain
                if best is None or slope < best[0]:
                    best = (slope, name, ahead, gain)
        if best is None:
            break
        _, name, ahead, gain = best
        if zeros + gain > wanted:  # part of the step reaches the target exactly
            sparsity[name] = sparsity[name] + (wanted - zeros) / sizes[name]
            break
        position[name], sparsity[name] = ahead, levels[ahead]
        zeros += gain
    return sparsity
