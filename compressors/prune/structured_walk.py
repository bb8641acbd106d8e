"""The walk behind structured pruning's dependency groups: where one layer's output channels go.

before: a source layer (Conv / Gemm / MatMul with a constant weight) and the static shapes of the
main graph's values.
after:  the ``Source`` filled in: every constant slice that removing its channel ``c`` implies
(``Edit``), the consumers that read the channels, the values whose shapes change, the depthwise
Convs and flatten-like Reshapes to fix up, and the computed values tied to it (residual Adds), or
``Unprunable`` with the reason. ``structured_groups.py`` merges tied sources into groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Erf", "Gelu", "Elu", "Selu", "Celu", "Softplus", "Softsign",
    "HardSigmoid", "HardSwish", "Mish", "ThresholdedRelu", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal",
    "Identity", "Dropout", "Cast", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Clip", "Swish",
}
# Pools keep the channel axis (1) and only touch the spatial axes.
POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceProd",
          "ReduceSumSquare", "ReduceLogSumExp"}


class Unprunable(Exception):
    """Raised during the walk: the group this source belongs to must be left alone."""


class NeedUnit(Unprunable):
    """The channels are split into units (a Reshape [.., H*D] -> [.., H, D]: attention heads): the
    source can only lose whole units of ``unit`` channels; walk it again that way."""

    def __init__(self, unit: int, message: str):
        super().__init__(message)
        self.unit = unit


@dataclass(frozen=True)
class Place:
    """Where channel ``c`` lies on one axis: positions offset + c*block ... + block - 1."""

    axis: int
    offset: int
    block: int
    count: int

    def positions(self, channels: np.ndarray) -> np.ndarray:
        starts = self.offset + np.asarray(channels, dtype=np.int64) * self.block
        return (starts[:, None] + np.arange(self.block)[None, :]).reshape(-1)


@dataclass(frozen=True)
class Edit:
    """A constant input of ``node`` that loses the positions of the removed channels along ``place.axis``."""

    value: ir.Value
    place: Place
    node: ir.Node
    index: int  # which input of ``node`` it is: a shared tensor gets a sliced copy for this use


@dataclass(frozen=True)
class Consumer:
    """A Conv/Gemm/MatMul reading the channels: its input value and its weight's input-axis edit."""

    value: ir.Value
    place: Place  # where the channels lie on the consumer's input value
    weight: Edit  # the weight slice each channel multiplies


@dataclass
class Source:
    node: ir.Node
    weight: ir.Value
    weight_axis: int  # the weight's output-channel axis
    count: int  # prunable units (output channels, or attention heads when unit > 1)
    unit: int = 1  # consecutive output channels per unit
    edits: list[Edit] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    touched: list[ir.Value] = field(default_factory=list)  # values whose shape changes
    placements: list[tuple[str, Place]] = field(default_factory=list)  # where its channels were seen
    depthwise: list[ir.Node] = field(default_factory=list)  # their ``group`` attribute changes
    reshapes: list[ir.Node] = field(default_factory=list)  # flatten-like Reshapes: target becomes [0, -1]
    # (Reshape node, target position, positions per unit): that target entry loses removed * per_unit
    reshape_dims: list[tuple[ir.Node, int, int]] = field(default_factory=list)
    ties: list[tuple[ir.Value, Place, str]] = field(default_factory=list)  # (other value, place, node)
    bn_scale: np.ndarray | None = None  # |gamma| / sqrt(var + eps) of a BatchNorm right after it
    reason: str | None = None

    @property
    def label(self) -> str:
        return self.weight.name or self.node.name or self.node.op_type


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The array of an initializer or a Constant node's output (also behind Identity nodes, which the
    torch exporter inserts to share equal initializers), else None."""
    while value is not None:
        tensor = ir.convenience.get_const_tensor(value)
        if tensor is not None:
            return tensor.numpy()
        producer = value.producer()
        if producer is None or producer.op_type != "Identity" or producer.domain not in ("", "ai.onnx"):
            return None
        value = producer.inputs[0]
    return None


def attr_value(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _axes(node: ir.Node):
    """The ``axes`` of Squeeze/Unsqueeze/Reduce*: an attribute before opset 13/18, an input after."""
    axes = attr_value(node, "axes")
    if axes is None and len(node.inputs) > 1:
        axes = constant(node.inputs[1])
    return axes


# --------------------------------------------------------------------------- the walk


class Walker:
    """Follows one source's channels forward and records what must change."""

    def __init__(self, model: ir.Model, shapes: dict[str, list], source: Source):
        self.model, self.shapes, self.source = model, shapes, source
        self.seen: set[tuple[str, Place]] = set()

    def run(self) -> None:
        src = self.source
        node = src.node
        unit = Place(src.weight_axis, 0, src.unit, src.count)
        src.edits.append(Edit(src.weight, unit, node, 1))
        out = node.outputs[0]
        rank = self.rank(out)
        axis = 1 if node.op_type in ("Conv", "Gemm") else rank - 1
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None:  # Conv bias [C]; Gemm C broadcast to [M, N]
            array = constant(bias)
            if array is None:
                raise Unprunable(f"{node.op_type} node {node.name!r}: its bias is computed, not a constant")
            if array.ndim >= 1 and array.shape[-1] == src.count * src.unit:
                self.edit(bias, Place(array.ndim - 1, 0, src.unit, src.count), node)
            elif array.size != 1:
                raise Unprunable(f"{node.op_type} node {node.name!r}: bias of shape {list(array.shape)}")
        self.follow(out, Place(axis, 0, src.unit, src.count))

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
        if op in BINARY and index in (0, 1):
            out = node.outputs[0]
            out_rank = self.rank(out)
            moved = Place(place.axis + out_rank - rank, place.offset, place.block, place.count)
            other = node.inputs[1 - index]
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
            return self.reshape(node, value, place)
        if op in ("Squeeze", "Unsqueeze") and index == 0:
            return self.squeeze(node, place, rank)
        if op in REDUCE and index == 0:
            return self.reduce(node, place, rank)
        if op == "Concat":
            return self.concat(node, index, value, place)
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

    def reshape(self, node: ir.Node, value: ir.Value, place: Place) -> None:
        """A flatten [N, C, ...] -> [N, C*...] (target rewritten to [0, -1]), or a split of the channel
        axis [.., H*D, ..] -> [.., H, D, ..] / a merge back (attention heads; target entries rewritten)."""
        target = constant(node.inputs[1])
        in_dims = self.shapes.get(value.name)
        if target is not None and target.ndim == 1 and len(target) == 2 and place.axis == 1 and in_dims:
            leading = int(target[0])
            same_batch = leading == 0 or (in_dims[0] is not None and leading == in_dims[0])
            if same_batch or (leading == -1 and int(target[1]) != -1):
                self.source.reshapes.append(node)
                return self.flatten(node, value, place, 1)
        out_dims = self.shapes.get(node.outputs[0].name)
        a = place.axis
        if target is None or in_dims is None or out_dims is None or len(target) != len(out_dims):
            raise Unprunable(f"Reshape node {node.name!r}: its target or shapes are not static")
        if int(target[a]) == 0:
            raise Unprunable(f"Reshape node {node.name!r} copies the channel axis with 0")
        if len(out_dims) == len(in_dims) + 1 and out_dims[:a] == in_dims[:a] and out_dims[a + 2:] == in_dims[a + 1:] \
                and None not in (out_dims[a], out_dims[a + 1], in_dims[a]) and out_dims[a] * out_dims[a + 1] == in_dims[a]:
            inner = out_dims[a + 1]
            if place.block % inner == 0 and place.offset % inner == 0:
                moved = Place(a, place.offset // inner, place.block // inner, place.count)
                self.source.reshape_dims.append((node, a, moved.block))
                return self.follow(node.outputs[0], moved)
            if place.block == 1 and place.offset == 0 and place.count == in_dims[a] and self.source.unit == 1:
                raise NeedUnit(inner, f"Reshape node {node.name!r} splits the channels into units of {inner}")
            raise Unprunable(f"Reshape node {node.name!r} splits the channels across its new axes")
        if len(out_dims) == len(in_dims) - 1 and out_dims[:a] == in_dims[:a] and out_dims[a + 1:] == in_dims[a + 2:] \
                and None not in (in_dims[a], in_dims[a + 1], out_dims[a]) and out_dims[a] == in_dims[a] * in_dims[a + 1]:
            inner = in_dims[a + 1]
            moved = Place(a, place.offset * inner, place.block * inner, place.count)
            self.source.reshape_dims.append((node, a, moved.block))
            return self.follow(node.outputs[0], moved)
        raise Unprunable(f"Reshape node {node.name!r} neither flattens, splits nor merges the channel axis")

    def squeeze(self, node: ir.Node, place: Place, rank: int) -> None:
        axes = _axes(node)
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

    def reduce(self, node: ir.Node, place: Place, rank: int) -> None:
        axes = _axes(node)
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
