"""The walk behind structured pruning's dependency groups: where one layer's output channels go.

before: a source layer (Conv / Gemm / MatMul with a constant weight) and the static shapes of the
main graph's values.
after:  the ``Source`` filled in: every constant slice that removing its channel ``c`` implies
(``Edit``), the consumers that read the channels, the values whose shapes change, the depthwise
Convs and flatten-like Reshapes to fix up, and the computed values tied to it (residual Adds), or
``Unprunable`` with the reason. ``structured_groups.py`` merges tied sources into groups; Reshape
and Shape steps live in ``structured_reshape.py``, the records in ``structured_place.py``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from modelpress.compressors.prune.structured_place import (  # noqa: F401  (re-exported for the pass)
    Consumer,
    Edit,
    NeedUnit,
    Place,
    Source,
    Unprunable,
    attr_value,
    axes_of,
    constant,
)
from modelpress.compressors.prune.structured_reshape import reshape, shape_read
from modelpress.compressors.prune.structured_split import walk_split

UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Erf", "Gelu", "Elu", "Selu", "Celu", "Softplus", "Softsign",
    "HardSigmoid", "HardSwish", "Mish", "ThresholdedRelu", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal",
    "Identity", "Dropout", "Cast", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Clip", "Swish",
    "IsNaN", "IsInf", "Not",  # torch's attention export guards Softmax with IsNaN -> Where
}
# Pools keep the channel axis (1) and only touch the spatial axes.
POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu"}
# Ops that crop, pad or rescale axes one by one: channels pass through when their axis is untouched.
SPATIAL = {"Slice", "Pad", "Resize", "Upsample"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceProd",
          "ReduceSumSquare", "ReduceLogSumExp"}


# --------------------------------------------------------------------------- the walk


class Walker:
    """Follows one source's channels forward and records what must change."""

    def __init__(self, model: ir.Model, shapes: dict[str, list], source: Source,
                 symbols: dict[str, list] | None = None, symbols_missing: str = "not computed"):
        """``shapes``: static dims (int or None); ``symbols``: dims with symbolic names (int, str or
        None) for computed Reshape targets, or why there are none (``symbols_missing``)."""
        self.model, self.shapes, self.source = model, shapes, source
        self.symbols, self.symbols_missing = symbols or {}, symbols_missing
        self.seen: set[tuple[str, Place]] = set()

    def run(self) -> None:
        src = self.source
        node = src.node
        unit = Place(src.weight_axis, src.start, src.unit, src.count)
        src.edits.append(Edit(src.weight, unit, node, 1))
        channels = constant(src.weight).shape[src.weight_axis]
        out = node.outputs[0]
        rank = self.rank(out)
        axis = 1 if node.op_type in ("Conv", "ConvTranspose", "Gemm") else rank - 1
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None:  # Conv bias [C]; Gemm C broadcast to [M, N]
            array = constant(bias)
            if array is None:
                raise Unprunable(f"{node.op_type} node {node.name!r}: its bias is computed, not a constant")
            if array.ndim >= 1 and array.shape[-1] == channels:
                self.edit(bias, Place(array.ndim - 1, src.start, src.unit, src.count), node)
            elif array.size != 1:
                raise Unprunable(f"{node.op_type} node {node.name!r}: bias of shape {list(array.shape)}")
        self.follow(out, Place(axis, src.start, src.unit, src.count))

    # ----- helpers

    def rank(self, value: ir.Value) -> int:
        dims = self.shapes.get(value.name)
        if dims is None:
            raise Unprunable(f"the shape of {value.name!r} is unknown (run ONNX shape inference on the model)")
        return len(dims)

    def dim(self, value: ir.Value, axis: int) -> int:
        dims = self.shapes.get(value.name)
        if dims is None or dims[axis] is None:
            raise Unprunable(f"axis {axis} of {value.name!r} has no static size")
        return dims[axis]

    def symbolic(self, value: ir.Value) -> list:
        dims = self.symbols.get(value.name)
        if dims is None:
            raise Unprunable(f"the symbolic shape of {value.name!r} is unknown ({self.symbols_missing})")
        return dims

    def edit(self, value: ir.Value, place: Place, node: ir.Node) -> None:
        if constant(value) is None:
            raise Unprunable(f"{node.op_type} node {node.name!r}: input {value.name!r} is computed, not a constant")
        self.source.edits.append(Edit(value, place, node, list(node.inputs).index(value)))

    def slice_operand(self, other: ir.Value, out_rank: int, place: Place, node: ir.Node) -> None:
        """An operand broadcast against the channels: sliced (constant), tied (computed) or left alone."""
        array = constant(other)
        rank = array.ndim if array is not None else self.rank(other)
        axis = place.axis - (out_rank - rank)
        if axis < 0:
            return  # broadcast over the channel axis
        size = array.shape[axis] if array is not None else self.dim(other, axis)
        if size == 1:
            return
        full = self.shapes.get(node.outputs[0].name, [None] * out_rank)[place.axis]
        if full is not None and size != full:
            raise Unprunable(f"{node.op_type} node {node.name!r}: operand {other.name!r} does not match the channel axis")
        mapped = Place(axis, place.offset, place.block, place.count)
        if array is not None:
            self.edit(other, mapped, node)
        else:
            self.source.ties.append((other, mapped, node.name or node.op_type))

    # ----- walking

    def follow(self, value: ir.Value, place: Place) -> None:
        key = (value.name, place)
        if key in self.seen:
            return
        self.seen.add(key)
        self.source.touched.append(value)
        self.source.placements.append(key)
        if value.is_graph_output():
            raise Unprunable(f"channels reach the graph output {value.name!r}")
        for use in list(value.uses()):
            node = use.node
            if node.graph is not self.model.graph:
                raise Unprunable(f"{value.name!r} is read inside an If/Loop/Scan subgraph")
            if node.domain not in ("", "ai.onnx"):
                raise Unprunable(f"consumer {node.domain}.{node.op_type} node {node.name!r} is not understood")
            self.consume(node, use.idx, value, place)

    def consume(self, node: ir.Node, index: int, value: ir.Value, place: Place) -> None:
        op, name = node.op_type, node.name
        rank = self.rank(value)
        if op in UNARY and index == 0:
            if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
                raise Unprunable(f"{op} node {name!r}: its second output is used")
            return self.follow(node.outputs[0], place)
        if op in POOLS and index == 0 and place.axis == 1:
            if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
                raise Unprunable(f"{op} node {name!r}: its indices output is used")
            return self.follow(node.outputs[0], place)
        if (op in BINARY and index in (0, 1)) or op == "Where":  # Where: condition, X, Y all broadcast
            out = node.outputs[0]
            out_rank = self.rank(out)
            moved = Place(place.axis + out_rank - rank, place.offset, place.block, place.count)
            for other in node.inputs:
                if other is not value:
                    self.slice_operand(other, out_rank, moved, node)
            return self.follow(out, moved)
        if op in ("BatchNormalization", "InstanceNormalization") and index == 0 and place.axis == 1:
            if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
                raise Unprunable(f"{op} node {name!r}: training outputs are used")
            for param in node.inputs[1:]:
                self.edit(param, Place(0, place.offset, place.block, place.count), node)
            return self.follow(node.outputs[0], place)
        if op in ("Softmax", "LogSoftmax", "LayerNormalization") and index == 0:
            axis = attr_value(node, "axis", -1)
            axis = axis + rank if axis < 0 else axis
            if (op == "LayerNormalization" and place.axis < axis) or (op != "LayerNormalization" and place.axis != axis):
                if op == "LayerNormalization" and any(o.uses() for o in node.outputs[1:]):
                    raise Unprunable(f"{op} node {name!r}: its statistics outputs are used")
                return self.follow(node.outputs[0], place)
            raise Unprunable(f"{op} node {name!r} normalizes across the channels")
        if op == "Conv" and index == 0:
            return self.into_conv(node, place)
        if op == "ConvTranspose" and index == 0:  # weight [C_in, C_out / group, k...]
            if constant(node.inputs[1]) is None or place.axis != 1 or attr_value(node, "group", 1) != 1:
                raise Unprunable(f"ConvTranspose node {name!r}: grouped, or its weight is computed")
            return self.consumer(node, value, place, Place(0, place.offset, place.block, place.count))
        if op == "Gemm" and index == 0:
            array = constant(node.inputs[1])
            if attr_value(node, "transA", 0) or array is None or place.axis != 1:
                raise Unprunable(f"Gemm node {name!r}: channels are not its K axis with a constant weight")
            axis = 1 if attr_value(node, "transB", 0) else 0
            return self.consumer(node, value, place, Place(axis, place.offset, place.block, place.count))
        if op == "MatMul" and (index == 1 or constant(node.inputs[1]) is None):
            return self.dynamic_matmul(node, index, value, place)
        if op == "MatMul" and index == 0:
            array = constant(node.inputs[1])
            if array is None or array.ndim != 2:
                raise Unprunable(f"MatMul node {name!r}: the other operand is not a constant 2-D weight")
            if place.axis == rank - 1:
                return self.consumer(node, value, place, Place(0, place.offset, place.block, place.count))
            return self.follow(node.outputs[0], place)  # channels on a row axis pass through
        if op == "Transpose" and index == 0:
            perm = list(attr_value(node, "perm", list(range(rank))[::-1]))
            moved = Place(perm.index(place.axis), place.offset, place.block, place.count)
            return self.follow(node.outputs[0], moved)
        if op == "Flatten" and index == 0:
            axis = attr_value(node, "axis", 1)
            axis = axis + rank if axis < 0 else axis
            return self.flatten(node, value, place, axis)
        if op == "Reshape" and index == 0:
            return reshape(self, node, value, place)
        if op == "Shape":
            return shape_read(self, node, value, place)
        if op in ("Squeeze", "Unsqueeze") and index == 0:
            return self.squeeze(node, place, rank)
        if op in REDUCE and index == 0:
            return self.reduce(node, place, rank)
        if op == "Concat":
            return self.concat(node, index, value, place)
        if op == "Split" and index == 0:
            return walk_split(self, node, value, place)
        if op in SPATIAL and index == 0:
            return self.spatial(node, place, rank)
        raise Unprunable(f"consumer {op} node {name!r} (input {index}) does not pass channels through")

    def consumer(self, node: ir.Node, value: ir.Value, place: Place, weight_place: Place) -> None:
        weight = node.inputs[1]
        self.edit(weight, weight_place, node)
        self.source.consumers.append(Consumer(value, place, Edit(weight, weight_place, node, 1)))

    def into_conv(self, node: ir.Node, place: Place) -> None:
        array = constant(node.inputs[1])
        if array is None or place.axis != 1:
            raise Unprunable(f"Conv node {node.name!r}: channels are not its input channels, or its weight is computed")
        group = attr_value(node, "group", 1)
        if group == 1:
            return self.consumer(node, node.inputs[0], place, Place(1, place.offset, place.block, place.count))
        if array.shape[1] != 1 or array.shape[0] % group:
            raise Unprunable(f"Conv node {node.name!r}: grouped (group={group}) but not depthwise")
        multiplier = array.shape[0] // group
        out_place = Place(1, place.offset * multiplier, place.block * multiplier, place.count)
        self.edit(node.inputs[1], Place(0, out_place.offset, out_place.block, out_place.count), node)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            self.edit(node.inputs[2], Place(0, out_place.offset, out_place.block, out_place.count), node)
        self.source.depthwise.append(node)
        self.follow(node.outputs[0], out_place)

    def flatten(self, node: ir.Node, value: ir.Value, place: Place, axis: int) -> None:
        rank = self.rank(value)
        if place.axis != axis:
            raise Unprunable(f"{node.op_type} node {node.name!r}: channels are not the first flattened axis")
        inner = int(np.prod([self.dim(value, a) for a in range(axis + 1, rank)], dtype=np.int64))
        self.follow(node.outputs[0], Place(1, place.offset * inner, place.block * inner, place.count))

    def dynamic_matmul(self, node: ir.Node, index: int, value: ir.Value, place: Place) -> None:
        """MatMul of two computed values (attention): batch axes tie both operands, rows of A and
        columns of B pass through, the contracted axis cannot lose channels."""
        rank, out_rank = self.rank(value), self.rank(node.outputs[0])
        if rank < 2:
            raise Unprunable(f"MatMul node {node.name!r}: a 1-D operand carries the channels")
        shift = out_rank - rank
        if place.axis < rank - 2:
            moved = Place(place.axis + shift, place.offset, place.block, place.count)
            self.slice_operand(node.inputs[1 - index], out_rank, moved, node)
            return self.follow(node.outputs[0], moved)
        if (index, place.axis) in ((0, rank - 2), (1, rank - 1)):
            return self.follow(node.outputs[0], Place(place.axis + shift, place.offset, place.block, place.count))
        raise Unprunable(f"MatMul node {node.name!r} contracts over the channels")

    def squeeze(self, node: ir.Node, place: Place, rank: int) -> None:
        axes = axes_of(node)
        if axes is None:
            raise Unprunable(f"{node.op_type} node {node.name!r}: its axes are not constant")
        out_rank = self.rank(node.outputs[0])
        axes = sorted(int(a) + (out_rank if node.op_type == "Unsqueeze" else rank) if a < 0 else int(a) for a in axes)
        axis = place.axis
        if node.op_type == "Squeeze":
            if axis in axes:
                raise Unprunable(f"Squeeze node {node.name!r} removes the channel axis")
            axis -= sum(1 for a in axes if a < place.axis)
        else:
            for a in axes:
                if a <= axis:
                    axis += 1
        self.follow(node.outputs[0], Place(axis, place.offset, place.block, place.count))

    def spatial(self, node: ir.Node, place: Place, rank: int) -> None:
        """Slice / Pad / Resize / Upsample with constant parameters that leave the channel axis whole
        (a crop of the spatial axes, a 2x upsample): the output carries the same channels."""
        untouched = {"Slice": slice_keeps_axis, "Pad": pad_keeps_axis}.get(node.op_type, scale_keeps_axis)
        verdict = untouched(node, place.axis, rank, self.dim(node.inputs[0], place.axis))
        if verdict is not True:
            raise Unprunable(f"{node.op_type} node {node.name!r}: {verdict}")
        self.follow(node.outputs[0], place)

    def reduce(self, node: ir.Node, place: Place, rank: int) -> None:
        axes = axes_of(node)
        if axes is None:
            raise Unprunable(f"{node.op_type} node {node.name!r} reduces over every axis")
        axes = [int(a) + rank if a < 0 else int(a) for a in axes]
        if place.axis in axes:
            raise Unprunable(f"{node.op_type} node {node.name!r} reduces over the channels")
        axis = place.axis if attr_value(node, "keepdims", 1) else place.axis - sum(1 for a in axes if a < place.axis)
        self.follow(node.outputs[0], Place(axis, place.offset, place.block, place.count))

    def concat(self, node: ir.Node, index: int, value: ir.Value, place: Place) -> None:
        rank = self.rank(value)
        axis = attr_value(node, "axis", 0)
        axis = axis + rank if axis < 0 else axis
        if axis == place.axis:
            before = sum(self.dim(v, axis) for v in node.inputs[:index])
            moved = Place(axis, place.offset + before, place.block, place.count)
            return self.follow(node.outputs[0], moved)
        for other in node.inputs:  # concatenated along another axis: every input carries these channels
            if other is not value:
                self.slice_operand(other, rank, place, node)
        self.follow(node.outputs[0], place)


# --------------------------------------------------------------------------- spatial ops
# Each returns True when the op leaves axis ``axis`` (of ``size`` entries) whole, else why not.


MISSING = object()  # an optional parameter that is absent (its default applies)


def _operand(node: ir.Node, index: int, attribute: str):
    """A parameter given as an attribute (old opsets) or as a constant input (new ones); MISSING
    when absent, None when computed."""
    value = attr_value(node, attribute)
    if value is not None:
        return np.asarray(value)
    if len(node.inputs) <= index or node.inputs[index] is None:
        return MISSING
    return constant(node.inputs[index])


def slice_keeps_axis(node: ir.Node, axis: int, rank: int, size: int):
    starts, ends = _operand(node, 1, "starts"), _operand(node, 2, "ends")
    axes, steps = _operand(node, 3, "axes"), _operand(node, 4, "steps")
    if any(v is None for v in (starts, ends, axes, steps)) or starts is MISSING or ends is MISSING:
        return "its starts / ends / axes / steps are computed"
    axes = range(len(starts)) if axes is MISSING else [int(a) + rank if a < 0 else int(a) for a in axes]
    steps = [1] * len(starts) if steps is MISSING else steps
    for a, start, end, step in zip(axes, starts, ends, steps):
        # Whole: from the first entry (0, or a negative start at or before it) to at least the last.
        if a == axis and not (step == 1 and (start == 0 or start <= -size) and end >= size):
            return "it crops the channel axis"
    return True


def pad_keeps_axis(node: ir.Node, axis: int, rank: int, size: int):
    pads, axes = _operand(node, 1, "pads"), _operand(node, 3, "axes")
    if pads is None or pads is MISSING or axes is None:
        return "its pads are computed"
    axes = list(range(rank)) if axes is MISSING else [int(a) + rank if a < 0 else int(a) for a in axes]
    if axis in axes:
        i = axes.index(axis)
        if pads[i] != 0 or pads[i + len(axes)] != 0:
            return "it pads the channel axis"
    return True


def scale_keeps_axis(node: ir.Node, axis: int, rank: int, size: int):
    inputs = node.inputs
    if node.op_type == "Resize" and len(inputs) > 3 and inputs[3] is not None:
        return "its output sizes name the channel count"  # a constant would need rewriting; rare in exports
    # Upsample: attribute (opset 7) or input 1; Resize: input 1 in opset 10 (X, scales), else input 2.
    scales = _operand(node, 1 if node.op_type == "Upsample" or len(inputs) == 2 else 2, "scales")
    if scales is None or scales is MISSING:
        return "its scales are computed"
    axes = attr_value(node, "axes") or range(rank)  # Resize-18 may scale only the listed axes
    axes = [int(a) + rank if a < 0 else int(a) for a in axes]
    if len(scales) != len(axes):
        return "its scales do not match its axes"
    if axis in axes and float(scales[axes.index(axis)]) != 1.0:
        return "it rescales the channel axis"
    return True
