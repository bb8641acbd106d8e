"""Cutting the constants structured pruning edits: every group's removals at once, in original coordinates.

before: {(node, input index): (node, index, {axis: removed positions})} from every pruned group, and
bias deltas from compensation (``structured_bias.fold_means``).
after:  each edited constant sliced (and its bias delta added): in place when this node is its only
user, else as the node's own copy, so a constant shared with layers that keep their channels is not
touched. Constant nodes (tiny tensors normalize keeps as nodes) are edited through their attribute.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from modelpress.compressors.model import output_channel_axis
from modelpress.compressors.prune.structured_bias import drop_if_unused, unique_name
from modelpress.compressors.prune.structured_place import constant


def slice_constants(model: ir.Model, removals: dict, deltas: dict) -> list[str]:
    """Each edited input: bias deltas added, removed positions cut; in place when this is the only
    way the constant is used, else as the node's own copy."""
    edits = {key: (node, index, axes, None) for key, (node, index, axes) in removals.items()}
    for key, (node, index, delta) in deltas.items():
        axes = edits.get(key, (node, index, _new_bias_cut(node, index, removals), None))[2]
        edits[key] = (node, index, axes, delta)
    by_value: dict[int, list] = {}
    for node, index, axes, delta in edits.values():
        by_value.setdefault(id(node.inputs[index]), []).append((node, index, axes, delta))
    copied = []
    for uses in by_value.values():
        value = uses[0][0].inputs[uses[0][1]]
        producer = value.producer()
        owned = producer is None or producer.op_type == "Constant"
        every_use = {(id(u.node), u.idx) for u in value.uses()} == {(id(n), i) for n, i, *_ in uses}
        alike = len(uses) == 1 or all(a == uses[0][2] and d is None for _, _, a, d in uses)
        if owned and every_use and alike and not value.is_graph_output():
            _set_constant(value, _edited(constant(value), uses[0][2], uses[0][3]))
            continue
        # Shared with a node that keeps its channels (or behind an exporter's Identity): each edited
        # use gets its own copy, the others keep the original.
        copied.append(value.name)
        for node, index, axes, delta in uses:
            name = unique_name(model, f"{value.name}_pruned")
            model.graph.register_initializer(ir.Value(name=name, const_value=ir.Tensor(
                _edited(constant(value), axes, delta), name=name)))
            node.replace_input_with(index, model.graph.initializers[name])
        drop_if_unused(model, value)
    return copied


def _new_bias_cut(node: ir.Node, index: int, removals: dict) -> dict[int, set[int]]:
    """The cut of a bias that ``fold_means`` created for a Conv / Gemm (the graph search never saw
    it): the output channels its own weight loses, when the layer is pruned on that side too."""
    if index != 2 or (id(node), 1) not in removals:
        return {}
    out_axis = output_channel_axis(node, constant(node.inputs[1]).ndim)
    removed = removals[(id(node), 1)][2].get(out_axis)
    return {0: set(removed)} if removed else {}


def _edited(array: np.ndarray, axes: dict[int, set[int]], delta: np.ndarray | None) -> np.ndarray:
    if delta is not None:
        array = (array.astype(np.float64) + delta).astype(array.dtype)
    return _sliced(array, axes)


def _sliced(array: np.ndarray, axes: dict[int, set[int]]) -> np.ndarray:
    for axis, positions in axes.items():
        keep = np.setdiff1d(np.arange(array.shape[axis]), np.fromiter(positions, dtype=np.int64))
        array = np.take(array, keep, axis=axis)
    return np.ascontiguousarray(array)


def _set_constant(value: ir.Value, array: np.ndarray) -> None:
    if value.const_value is not None and value.producer() is None:
        value.const_value = ir.Tensor(array, name=value.name)
        value.dtype, value.shape = value.const_value.dtype, ir.Shape(array.shape)
        return
    node = value.producer()  # a Constant node (tiny tensors stay Constant nodes after normalize)
    tensor = ir.Tensor(array, name=value.name)
    node.attributes["value"] = ir.AttrTensor("value", tensor)
    # With the type too: a shape without one makes onnx-ir warn on every save ("value type not known").
    value.dtype, value.shape = tensor.dtype, ir.Shape(array.shape)
