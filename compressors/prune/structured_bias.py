"""Bias compensation for structured pruning: what a removed channel contributed on average stays.

before: a consumer (Conv / Gemm / MatMul) that loses input channels, and the per-position means of
those inputs over the calibration data (``ChannelStats``).
after:  the consumer's bias — created when it has none; for a MatMul, the constant operand of the
``Add`` that follows it — also holds ``W[:, removed] · mean(x[removed])``, so a removed channel whose
output was nearly constant (a dead ReLU's 0, a saturated unit, a BatchNorm shift) costs nothing and
only its variation is lost. For a Conv the mean is per channel over the image and the kernel taps are
summed, which is exact away from the zero-padded border.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from modelpress.compressors.prune.structured_place import (
    Consumer,
    Place,
    attr_value,
    constant,
)


class ChannelStats:
    """Per channel: sum of squares (importance); per position: the mean (compensation)."""

    def __init__(self, place: Place):
        self.place = place
        self.energy = np.zeros(place.count)
        self.sums = np.zeros(place.count * place.block)
        self.rows = 0

    def update(self, batch: np.ndarray) -> None:
        place = self.place
        x = np.moveaxis(np.asarray(batch, dtype=np.float64), place.axis, 0)
        x = x[place.offset: place.offset + place.count * place.block]
        x = x.reshape(x.shape[0], -1)
        self.energy += np.einsum("ij,ij->i", x, x).reshape(place.count, place.block).sum(axis=1)
        self.sums += x.sum(axis=1)
        self.rows += x.shape[1]

    @property
    def means(self) -> np.ndarray:
        return self.sums / max(self.rows, 1)

    @property
    def centered_energy(self) -> np.ndarray:
        """Per channel, the sum of squares around the per-position means: what compensation cannot keep."""
        place = self.place
        mean_part = (self.sums * self.sums / max(self.rows, 1)).reshape(place.count, place.block).sum(axis=1)
        return np.maximum(self.energy - mean_part, 0.0)


def mean_delta(consumer: Consumer, removed: np.ndarray, stats: ChannelStats) -> np.ndarray:
    """What the removed channels' mean outputs add to each output of the consumer (its bias change)."""
    node = consumer.weight.node
    place = consumer.weight.place
    relative = Place(0, 0, place.block, place.count).positions(removed)
    weights = np.take(constant(consumer.weight.value).astype(np.float64), place.offset + relative, axis=place.axis)
    weights = np.moveaxis(weights, place.axis, -1)
    per_output = weights.reshape(weights.shape[0], -1, weights.shape[-1]).sum(axis=1)  # [outputs, removed]
    delta = per_output @ stats.means[relative]
    if node.op_type == "ConvTranspose":
        # A strided transposed conv puts a different tap on each output position: a constant input
        # adds, on average (the least-squares bias), the tap sum over the positions per input step.
        delta = delta / float(np.prod(attr_value(node, "strides", [1])))
    return delta


def fold_means(model: ir.Model, consumer: Consumer, removed: np.ndarray, stats: ChannelStats,
               deltas: dict[tuple[int, int], tuple[ir.Node, int, np.ndarray]]) -> str | None:
    """Add the removed channels' mean contribution to the consumer's bias delta (in ``deltas``, keyed
    by (node, input index)); return why not when the consumer has no place for it."""
    node = consumer.weight.node
    delta = mean_delta(consumer, removed, stats)
    target = bias_input(model, node, len(delta))
    if target is None:
        return f"{node.op_type} node {node.name!r}: no constant bias to fold the removed channels' means into"
    bias_node, index, scale = target
    key = (id(bias_node), index)
    previous = deltas.get(key)
    deltas[key] = (bias_node, index, delta * scale + (previous[2] if previous else 0.0))
    return None


def bias_input(model: ir.Model | None, node: ir.Node, outputs: int) -> tuple[ir.Node, int, float] | None:
    """(node, input index, factor on the delta) of the constant that adds to this layer's output; a
    Conv / Gemm without one gets a zero bias in ``model`` (None: only find, never add)."""
    weight = constant(node.inputs[1])
    if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
        scale = 1.0
        if node.op_type == "Gemm":
            beta = attr_value(node, "beta", 1.0)
            if beta == 0:
                return None
            scale = attr_value(node, "alpha", 1.0) / beta
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            return (node, 2, scale) if constant(node.inputs[2]) is not None else None
        if model is None:
            return None
        name = unique_name(model, f"{node.name or node.op_type}_bias")
        zeros = np.zeros(outputs, dtype=weight.dtype)
        model.graph.register_initializer(ir.Value(name=name, const_value=ir.Tensor(zeros, name=name)))
        node.resize_inputs(3)
        node.replace_input_with(2, model.graph.initializers[name])
        return node, 2, scale
    uses = list(node.outputs[0].uses())
    if node.op_type != "MatMul" or len(uses) != 1 or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    index = 1 - uses[0].idx
    bias = constant(add.inputs[index])
    if bias is None or bias.ndim == 0 or bias.shape[-1] != outputs or bias.size != outputs:
        return None
    return add, index, 1.0


def unique_name(model: ir.Model, name: str) -> str:
    taken = set(model.graph.initializers) | {v.name for n in model.graph for v in n.outputs}
    candidate, i = name, 1
    while candidate in taken:
        candidate, i = f"{name}_{i}", i + 1
    return candidate


def drop_if_unused(model: ir.Model, value: ir.Value | None) -> None:
    """Remove a constant (and the Identity / Constant nodes leading to it) nothing reads any more."""
    while value is not None and not value.uses() and not value.is_graph_output():
        producer = value.producer()
        if producer is None:
            if value.is_initializer():
                model.graph.initializers.pop(value.name)
            return
        if producer.op_type not in ("Identity", "Constant") or producer.graph is not model.graph:
            return
        value = producer.inputs[0] if producer.op_type == "Identity" else None
        model.graph.remove(producer, safe=True)  # safe: its inputs stop counting it as a use
