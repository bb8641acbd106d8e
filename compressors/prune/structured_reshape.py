"""Reshape and Shape on the structured walk: where a Reshape moves the channels, which target
entries change, and which sizes a computed target reads.

before: a Reshape (or Shape) node reading a value whose channels lie at ``place``, and the walker's
shapes: static ones (ONNX shape inference) and, for computed targets, symbolic ones (onnxruntime's
symbolic shape inference, which carries ``batch`` / ``seq`` through the graph).
after:  the channels followed onto the output, and recorded on the ``Source``: flatten-like
Reshapes (``reshapes``: target becomes [0, -1]), target entries that lose the removed units
(``reshape_dims``), the sizes a computed target reads (``fixed``: no pruned group may change them) —
or ``Unprunable`` with the reason.

Targets understood:
- a constant [N, -1]-like flatten of [N, C, ...] with the channels on axis 1;
- a constant, or a ``Concat`` of 1-element pieces that are constants or sizes read by
  Shape -> Gather [-> Unsqueeze] (what torch exports for ``x.view(x.size(0), x.size(1), heads, -1)``
  with dynamic axes), that splits the channel axis [.., H*D, ..] -> [.., H, D, ..] (attention
  heads), merges it back, or keeps it (same rank). The channel axis's entry must be a constant:
  -1 stays, a size loses the removed units. For a computed target every other output axis must be
  the input's same axis by symbolic shape (equal names or equal sizes), so a target that reorders,
  merges or splits the batch and sequence axes is left alone; the pieces' sizes must not be axes a
  group prunes (checked across groups by ``structured_groups.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_ir as ir
from modelpress.compressors.prune.structured_place import (
    NeedUnit,
    Place,
    Unprunable,
    attr_value,
    constant,
)

if TYPE_CHECKING:
    from modelpress.compressors.prune.structured_walk import Walker


def reshape(walker: Walker, node: ir.Node, value: ir.Value, place: Place) -> None:
    """Follow the channels through ``node`` (a Reshape reading them as its data input)."""
    target = constant(node.inputs[1])
    static_in = walker.shapes.get(value.name)
    if target is not None and target.ndim == 1 and len(target) == 2 and place.axis == 1 and static_in:
        leading = int(target[0])
        same_batch = leading == 0 or (static_in[0] is not None and leading == static_in[0])
        if same_batch or (leading == -1 and int(target[1]) != -1):
            walker.source.reshapes.append(node)
            return walker.flatten(node, value, place, 1)
    entries = target_entries(walker, node)
    if target is not None:  # sizes from ONNX shape inference (unknown batch axes compare equal)
        in_dims, out_dims, strict = static_in, walker.shapes.get(node.outputs[0].name), False
    else:
        in_dims, out_dims, strict = walker.symbolic(value), walker.symbolic(node.outputs[0]), True
    a = place.axis
    if in_dims is None or out_dims is None or len(entries) != len(out_dims):
        raise Unprunable(f"Reshape node {node.name!r}: its target or shapes are not static")
    if entries[a] == 0:
        raise Unprunable(f"Reshape node {node.name!r} copies the channel axis with 0")
    if entries[a] is None:
        raise Unprunable(f"Reshape node {node.name!r}: the channel axis's target entry is computed, not a constant")

    def same(outs: list, ins: list) -> bool:
        return len(outs) == len(ins) and all(o == i and (i is not None or not strict) for o, i in zip(outs, ins))

    def sizes(*dims) -> bool:
        return all(isinstance(d, int) and d > 0 for d in dims)

    if len(out_dims) == len(in_dims) + 1 and same(out_dims[:a], in_dims[:a]) and same(out_dims[a + 2:], in_dims[a + 1:]) \
            and sizes(out_dims[a], out_dims[a + 1], in_dims[a]) and out_dims[a] * out_dims[a + 1] == in_dims[a]:
        inner = out_dims[a + 1]
        if place.block % inner == 0 and place.offset % inner == 0:
            moved = Place(a, place.offset // inner, place.block // inner, place.count)
            walker.source.reshape_dims.append((node, a, moved.block))
            return walker.follow(node.outputs[0], moved)
        if place.block == 1 and place.offset == 0 and place.count == in_dims[a] and walker.source.unit == 1:
            raise NeedUnit(inner, f"Reshape node {node.name!r} splits the channels into units of {inner}")
        raise Unprunable(f"Reshape node {node.name!r} splits the channels across its new axes")
    if len(out_dims) == len(in_dims) - 1 and same(out_dims[:a], in_dims[:a]) and same(out_dims[a + 1:], in_dims[a + 2:]) \
            and sizes(in_dims[a], in_dims[a + 1], out_dims[a]) and out_dims[a] == in_dims[a] * in_dims[a + 1]:
        inner = in_dims[a + 1]
        moved = Place(a, place.offset * inner, place.block * inner, place.count)
        walker.source.reshape_dims.append((node, a, moved.block))
        return walker.follow(node.outputs[0], moved)
    if len(out_dims) == len(in_dims) and same(out_dims[:a], in_dims[:a]) and same(out_dims[a + 1:], in_dims[a + 1:]) \
            and sizes(out_dims[a]) and out_dims[a] == in_dims[a]:
        walker.source.reshape_dims.append((node, a, place.block))  # e.g. [B, H, T, D] -> [B, -1, T, D]
        return walker.follow(node.outputs[0], place)
    raise Unprunable(f"Reshape node {node.name!r} neither flattens, splits, merges nor keeps the channel axis")


def target_entries(walker: Walker, node: ir.Node) -> list[int | None]:
    """The Reshape target: an int per constant entry, None per computed one (whose size is recorded
    in ``fixed``: pruning must not change it)."""
    target = constant(node.inputs[1])
    if target is not None:
        if target.ndim != 1:
            raise Unprunable(f"Reshape node {node.name!r}: its target is not 1-D")
        return [int(t) for t in target]
    concat = node.inputs[1].producer()
    if concat is None or concat.op_type != "Concat" or concat.domain not in ("", "ai.onnx") \
            or attr_value(concat, "axis") not in (0, -1):
        how = "a graph input" if concat is None else f"a {concat.op_type} node"
        raise Unprunable(f"Reshape node {node.name!r}: its target is computed by {how}, not a constant or a "
                         "Concat of sizes")
    entries: list[int | None] = []
    for piece in concat.inputs:
        array = constant(piece)
        if array is not None:
            entries.extend(int(v) for v in array.reshape(-1))
            continue
        read = size_read(walker, piece)
        if read is None or walker.shapes.get(piece.name) != [1]:
            raise Unprunable(f"Reshape node {node.name!r}: target piece {piece.name!r} is not a constant or a "
                             "size read by Shape -> Gather [-> Unsqueeze]")
        of, axis = read
        walker.source.fixed.append((of.name, axis, node.name or "Reshape"))
        entries.append(None)
    return entries


def size_read(walker: Walker, piece: ir.Value) -> tuple[ir.Value, int] | None:
    """(value, axis) when ``piece`` is one size of ``value``: Gather(Shape(value), k), made 1-D by
    Unsqueeze when k is a scalar; None for anything else."""
    node = piece.producer()
    if node is not None and node.op_type == "Unsqueeze" and node.domain in ("", "ai.onnx"):
        node = node.inputs[0].producer()
    if node is None or node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or attr_value(node, "axis", 0) != 0:
        return None
    index = constant(node.inputs[1])
    shape = node.inputs[0].producer()
    if index is None or index.size != 1 or shape is None or shape.op_type != "Shape" or shape.domain not in ("", "ai.onnx"):
        return None
    of = shape.inputs[0]
    rank = walker.rank(of)
    axes = list(range(rank))[attr_value(shape, "start", 0): attr_value(shape, "end", rank)]
    k = int(index.reshape(-1)[0])
    return (of, axes[k]) if -len(axes) <= k < len(axes) else None


def shape_read(walker: Walker, node: ir.Node, value: ir.Value, place: Place) -> None:
    """A Shape of channel-carrying values passes nothing on; fine while only other axes' sizes are
    read (Gather with constant indices, Slice with constant bounds: torch's SDPA export reads
    head_dim so), since those do not change."""
    rank = walker.rank(value)
    axes = list(range(rank))[attr_value(node, "start", 0): attr_value(node, "end", rank)]
    if place.axis not in axes:
        return
    out = node.outputs[0]
    for use in out.uses():
        read = _axes_read(use.node, axes) if use.idx == 0 else None
        if read is None or place.axis in read:
            raise Unprunable(f"Shape node {node.name!r}: the channel count of {value.name!r} is read")
    if out.is_graph_output():
        raise Unprunable(f"Shape node {node.name!r}: the channel count of {value.name!r} is a graph output")


def _axes_read(node: ir.Node, axes: list[int]) -> list[int] | None:
    """Which of ``axes`` (a Shape's output) a Gather or Slice of it reads; None when not constant."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Gather" and len(node.inputs) > 1 and attr_value(node, "axis", 0) == 0:
        index = constant(node.inputs[1])
        if index is None or any(not -len(axes) <= int(k) < len(axes) for k in index.reshape(-1)):
            return None
        return [axes[int(k)] for k in index.reshape(-1)]
    if node.op_type == "Slice" and len(node.inputs) >= 3:
        bounds = [constant(v) if v is not None else None for v in node.inputs[1:]]
        if any(b is None and v is not None for b, v in zip(bounds, node.inputs[1:])):
            return None  # a computed bound
        starts, ends = bounds[0], bounds[1]
        along = bounds[2] if len(bounds) > 2 else None
        steps = bounds[3] if len(bounds) > 3 else None
        if starts is None or ends is None or starts.size != 1 or ends.size != 1 \
                or (along is not None and int(along.reshape(-1)[0]) not in (0, -1)) \
                or (steps is not None and int(steps.reshape(-1)[0]) != 1):
            return None
        return axes[int(starts.reshape(-1)[0]): int(ends.reshape(-1)[0])]
    return None
