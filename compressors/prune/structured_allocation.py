"""Per-group ratios by measured sensitivity for structured pruning (``allocation: sensitivity``).

before: the prunable channel groups, each with its channels ranked (``scores``, lowest first to
go), the captured consumer statistics (channel means, for compensation) and calibration feeds.
after:  per group the fraction of its channels to remove, leaving no more estimated time (multiply-adds
plus memory traffic; or multiply-adds, or parameters: ``allocation_cost``) than the uniform ratio
would, at the least summed output change.

How: each group alone is pruned to each of LEVELS in one onnxruntime session, without rebuilding
the graph: removing channel ``c`` is the same, for every computation after it, as zeroing the
input slices of the layers that read ``c`` (the walk ends every path at such a consumer) and adding
c's mean contribution to their biases (compensation). So the consumers' weights and biases are
session inputs, overridden per run; a consumer without a bias gets a zero one in the measured copy
only. The relative change of the first output (real positions only, with a padding mask) per level
is a curve; ``allocate_levels`` walks the curves' lower convex hulls, spending the cost where it
changes the output least, as for unstructured sparsity.

Why: a uniform ratio treats a detector's stem and its 256-channel neck alike. On PP-OCRv4's
text detector removing 1 of the stem's 16 channels already moved its probability map (cosine
0.74 on a synthetic page), while whole backbone stages lose half their channels at cosine > 0.99.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir
from modelpress.compressors.model import output_channel_axis
from modelpress.compressors.prune.allocation import MAX_CURVE_RUNS, allocate_levels, relative_change
from modelpress.compressors.prune.structured_bias import bias_input, mean_delta
from modelpress.compressors.prune.structured_place import Consumer, constant

# Fractions of a group's channels each group is measured at. 0.75 is the most any group loses:
# beyond it the curves are steep everywhere and a layer of 8 channels would keep 2.
LEVELS = (0.0, 0.25, 0.5, 0.75)
# ``latency`` cost: multiply-adds, plus this many per element of every value whose channels are cut
# (memory traffic: a depthwise conv or an activation at high resolution costs time, few multiply-adds).
# Counted by multiply-adds alone, the allocation kept PP-LCNet's high-resolution layers wide and ran
# at 0.54x of the original against uniform's 0.29x; with 8 per element 0.24x (32: 0.38x, a tie),
# YOLOv8n 0.51x either way (stop 18, paired timings; benchmarks/RESULTS.md thirdparty).
ACTIVATION_COST = 8
Feed = dict[str, np.ndarray]


def element_weight(model: ir.Model, cost: str, feed: Feed):
    """(weight, activation): ``weight(node, input index)``, how many times one element of a constant
    counts: 1 for ``parameters``; for ``flops`` and ``latency`` a layer weight counts once per output
    position it is applied at (a Conv's output pixels, the rows of a Gemm; shapes inferred for
    ``feed``'s input shapes, per sample; dims still unknown count 1), other constants (biases,
    BatchNorm) once. ``activation(value, axis)``, for ``latency`` only: ACTIVATION_COST per element
    of the value per position along ``axis``."""
    if cost == "parameters":
        return (lambda node, index: 1), None
    from modelpress.compressors.prune.structured_groups import static_shapes

    shapes = static_shapes(model, {name: (1, *np.shape(array)[1:]) for name, array in feed.items()})

    def activation(name: str, axis: int) -> int:
        dims = [d if isinstance(d, int) and d > 0 else 1 for d in shapes.get(name) or []]
        return ACTIVATION_COST * int(np.prod(dims)) // max(dims[axis], 1) if len(dims) > axis else 0

    def weight(node: ir.Node, index: int) -> int:
        dims = shapes.get(node.outputs[0].name)
        if index != 1 or not dims or node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            return 1
        spread = dims[2:] if node.op_type in ("Conv", "ConvTranspose") else dims[:-1]
        return int(np.prod([d if isinstance(d, int) and d > 0 else 1 for d in spread]))

    return weight, (activation if cost == "latency" else None)


def allocate_ratios(model: ir.Model, groups: list, scores: dict[int, np.ndarray], consumers: Callable[[object], list[Consumer]],
                    captured: dict, compensate: bool, keep: Callable[[object, float | None], int], cost: str,
                    feeds: Sequence[Feed], threads: int, mask_name: str | None,
                    progress: Callable[[str, int, int], None]) -> tuple[dict[int, float], dict]:
    """(id(group) -> fraction of its channels to remove, stats of the measurement). ``keep(group,
    ratio)``: the units a group keeps at a ratio (None: the configured uniform one), rounding included;
    the allocation leaves no more ``cost`` (estimated time, multiply-adds or parameters) than the
    uniform ratio would."""
    from modelpress.compressors.benchmark import make_session  # onnxruntime: loaded only when used

    runs_per_feed = max(1, len(groups) * (len(LEVELS) - 1))
    affordable = max(1, MAX_CURVE_RUNS // runs_per_feed)
    if len(feeds) > affordable:
        feeds = [feeds[i] for i in np.unique(np.linspace(0, len(feeds) - 1, affordable).round().astype(int))]
    reading = {id(g): consumers(g) for g in groups}
    proto, weights, biases = _measured_copy(model, [c for cs in reading.values() for c in cs])
    session = make_session(proto.SerializeToString(), threads)
    output = session.get_outputs()[0].name
    masks = [feed.get(mask_name) if mask_name else None for feed in feeds]
    base = {**weights, **{name: array for name, array, _ in biases.values()}}

    def run(overrides: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(session.run([output], {**feed, **base, **overrides})[0], np.float64) for feed in feeds]

    reference = run({})
    curves: dict[str, list[float]] = {}
    for index, group in enumerate(groups):
        curve = [0.0]
        for step, level in enumerate(LEVELS[1:]):
            progress("structured sensitivity", index * (len(LEVELS) - 1) + step, len(groups) * (len(LEVELS) - 1))
            gone = int(np.floor(level * group.count + 1e-9))  # as kept_count, before rounding to round_to
            if gone == 0:  # a group of 3 channels at 25 %: nothing goes, nothing changes
                curve.append(0.0)
                continue
            removed = np.sort(np.argsort(scores[id(group)], kind="stable")[:gone])
            overrides = _removal(reading[id(group)], removed, weights, biases, captured if compensate else None)
            curve.append(relative_change(reference, run(overrides), masks))
        curves[str(id(group))] = curve
    left = _Left(groups, scores, *element_weight(model, cost, feeds[0]))
    whole = {id(g): g.count for g in groups}
    full = left(whole)
    # What each group holds: what cutting all of its channels alone would take away.
    sizes = {str(id(g)): full - left({**whole, id(g): 0}) for g in groups}
    target = left({id(g): keep(g, None) for g in groups})

    def allocated(wanted: float) -> dict[int, float]:
        levels = allocate_levels(curves, sizes, LEVELS, wanted)
        return {id(g): float(levels[str(id(g))]) for g in groups}

    # A group's cost counts each weight it slices, as if the others kept theirs; two neighbours cut
    # together remove less than the sum. So the budget is searched: the least spent that leaves no
    # more of the cost than the uniform ratio does (after rounding to round_to).
    low, high = 0.0, float(sum(sizes.values()))
    for _ in range(30):
        middle = (low + high) / 2
        ratios = allocated(middle)
        if left({id(g): keep(g, ratios[id(g)]) for g in groups}) <= target:
            high = middle
        else:
            low = middle
    ratios = allocated(high)
    stats = {"levels": list(LEVELS), "feeds_measured": len(feeds), "runs": 1 + len(groups) * (len(LEVELS) - 1),
             "cost": cost, "left": left({id(g): keep(g, ratios[id(g)]) for g in groups}), "left_uniform": target,
             "curves": {g.label: [round(c, 6) for c in curves[str(id(g))]] for g in groups}}
    return ratios, stats


class _Left:
    """The cost left when each group keeps a number of units (its lowest-scored go), every group's
    cuts together (a Concat consumer is cut by several): the elements of the sliced constants, each
    times ``weight``, less ``activation`` per removed position of the values the channels pass through."""

    def __init__(self, groups: list, scores: dict[int, np.ndarray], weight: Callable[[ir.Node, int], int],
                 activation: Callable[[str, int], int] | None):
        self.activation = activation
        self.groups, self.order = groups, {id(g): np.argsort(scores[id(g)], kind="stable") for g in groups}
        self.shapes: dict[tuple[int, int], tuple[tuple[int, ...], int]] = {}
        for group in groups:
            for source in group.sources:
                for edit in source.edits:
                    key = (id(edit.node), edit.index)
                    if key not in self.shapes:
                        self.shapes[key] = (constant(edit.value).shape, weight(edit.node, edit.index))

    def __call__(self, kept: dict[int, int]) -> int:
        cut: dict[tuple[int, int], dict[int, set[int]]] = {}  # constant -> axis -> removed positions
        values: dict[tuple[str, int], set[int]] = {}  # (value, axis) -> removed positions
        for group in self.groups:
            gone = np.sort(self.order[id(group)][: group.count - kept[id(group)]])
            for source in group.sources:
                for edit in source.edits:
                    axes = cut.setdefault((id(edit.node), edit.index), {})
                    axes.setdefault(edit.place.axis, set()).update(edit.place.positions(gone).tolist())
                if self.activation is not None:
                    for name, place in source.placements:
                        values.setdefault((name, place.axis), set()).update(place.positions(gone).tolist())
        total = sum(int(np.prod([n - len(cut.get(key, {}).get(a, ())) for a, n in enumerate(shape)])) * times
                    for key, (shape, times) in self.shapes.items())
        return total - sum(self.activation(name, axis) * len(removed) for (name, axis), removed in values.items())


def _measured_copy(model: ir.Model, consumers: list[Consumer]):
    """The model as a proto whose consumer weights and biases are graph inputs (a zero bias added
    where a Conv consumer has none): (proto, weight name -> array, id(consumer node) -> (bias name,
    array, factor on a delta))."""
    from onnx import helper, numpy_helper

    proto = ir.to_proto(model)
    position = {id(node): i for i, node in enumerate(model.graph)}
    weights: dict[str, np.ndarray] = {}
    biases: dict[int, tuple[str, np.ndarray, float]] = {}
    for consumer in consumers:
        value, node = consumer.weight.value, consumer.weight.node
        if value.name not in weights and value.is_initializer():
            weights[value.name] = value.const_value.numpy()
        if id(node) in biases:
            continue
        array = constant(value)
        outputs = array.shape[output_channel_axis(node, array.ndim)]
        target = bias_input(None, node, outputs)
        if target is not None:
            owner, index, scale = target
            bias = owner.inputs[index]
            if bias.is_initializer():
                biases[id(node)] = (bias.name, bias.const_value.numpy(), scale)
        elif node.op_type in ("Conv", "ConvTranspose") and len(node.inputs) < 3:
            name = f"__modelpress_measured_bias_{position[id(node)]}"
            zeros = np.zeros(outputs, array.dtype)
            proto.graph.node[position[id(node)]].input.append(name)
            proto.graph.initializer.append(numpy_helper.from_array(zeros, name))
            biases[id(node)] = (name, zeros, 1.0)
    inputs = {**weights, **{name: array for name, array, _ in biases.values()}}
    for name, array in inputs.items():
        proto.graph.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype),
                                                               list(array.shape)))
    return proto, weights, biases


def _removal(consumers: list[Consumer], removed: np.ndarray, weights: dict, biases: dict, captured: dict | None) -> dict:
    """Overrides that make the session compute the model with ``removed`` channels gone."""
    overrides: dict[str, np.ndarray] = {}
    for consumer in consumers:
        edit = consumer.weight
        if edit.value.name not in weights:
            continue
        array = overrides.setdefault(edit.value.name, weights[edit.value.name].copy())
        index = [slice(None)] * array.ndim
        index[edit.place.axis] = edit.place.positions(removed)
        array[tuple(index)] = 0
        if captured is None or id(edit.node) not in biases:
            continue
        name, values, scale = biases[id(edit.node)]
        delta = mean_delta(consumer, removed, captured[(consumer.value.name, consumer.place)]) * scale
        current = overrides.setdefault(name, values.copy())
        if current.shape[-1] == len(delta):
            overrides[name] = (current.astype(np.float64) + delta).astype(current.dtype)
    return overrides
