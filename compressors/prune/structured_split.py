"""Split in structured pruning: channels that a Split hands out in parts, and the sizes it then needs.

before: a source's channels reaching a ``Split`` (the structured walk), or pruned groups whose
channels went through one (``apply_split_sizes``).
after:  the walk goes on into the output that holds the channels, at their position in it; a Split
that cuts one source's channels into several parts asks for the source to be walked as one part
per output (``NeedSplit``): YOLOv8's C2f block splits its first conv's output in halves, one half
goes straight to the block's last conv, the other runs through residual bottlenecks. Each part is
then its own group (tied to different layers), and each Split's sizes shrink by what its outputs
lost — a constant of its own, since exporters share equal size lists between Splits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
from modelpress.compressors.prune.structured_bias import drop_if_unused, unique_name
from modelpress.compressors.prune.structured_place import Place, Source, Unprunable, attr_value, constant

if TYPE_CHECKING:
    from modelpress.compressors.prune.structured_groups import ChannelGroup
    from modelpress.compressors.prune.structured_walk import Walker


class NeedSplit(Unprunable):
    """A Split cuts this source's channels into parts: walk it again as one source per part, cut
    before each unit index in ``cuts``."""

    def __init__(self, cuts: list[int], message: str):
        super().__init__(message)
        self.cuts = cuts


def split_sizes(node: ir.Node, size: int) -> list[int] | None:
    """The sizes of a Split's parts along its axis (``size`` entries): a constant input (opset 13+),
    the ``split`` attribute (before 13), or equal parts (ceil-sized, the last smaller: opset 18's
    ``num_outputs``); None when computed."""
    given = attr_value(node, "split")
    if given is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        given = constant(node.inputs[1])
        if given is None:
            return None
    if given is not None:
        return [int(s) for s in given]
    parts = len(node.outputs)
    each = -(-size // parts)
    return [min(each, size - i * each) for i in range(parts)]


def walk_split(walker: Walker, node: ir.Node, value: ir.Value, place: Place) -> None:
    rank = walker.rank(value)
    axis = attr_value(node, "axis", 0)
    axis = axis + rank if axis < 0 else axis
    if axis != place.axis:  # split along another axis: every part carries all the channels
        for out in node.outputs:
            if out.uses() or out.is_graph_output():
                walker.follow(out, place)
        return
    sizes = split_sizes(node, walker.dim(value, axis))
    if sizes is None:
        raise Unprunable(f"Split node {node.name!r}: its sizes are computed")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    first, end = place.offset, place.offset + place.count * place.block
    inside = [int(b) for b in bounds[1:-1] if first < b < end]
    if inside:
        if any((b - first) % place.block for b in inside):
            raise Unprunable(f"Split node {node.name!r} cuts through a unit of {place.block} channels")
        raise NeedSplit([(b - first) // place.block for b in inside],
                        f"Split node {node.name!r} hands these channels to different outputs")
    part = int(np.searchsorted(bounds, first, side="right")) - 1
    walker.source.splits.append((node, part, place.block, tuple(sizes)))
    walker.follow(node.outputs[part], Place(axis, first - int(bounds[part]), place.block, place.count))


def part_sources(source: Source, cuts: list[int]) -> list[Source]:
    """``source`` as one source per part, cut before each unit in ``cuts`` (indices in its units)."""
    bounds = [0, *sorted(set(cuts)), source.count]
    return [Source(source.node, source.weight, source.weight_axis, hi - lo, source.unit,
                   start=source.start + lo * source.unit, part=True)
            for lo, hi in zip(bounds, bounds[1:])]


def apply_split_sizes(model: ir.Model, groups: list[ChannelGroup], removed: dict[int, int]) -> None:
    """Every Split that pruned channels went through gets sizes that many positions smaller, in a
    constant of its own (the ``split`` attribute before opset 13)."""
    # Split -> (its sizes before pruning, {output: positions removed})
    lost: dict[int, tuple[ir.Node, list[int], dict[int, int]]] = {}
    for group in groups:
        entries = {(id(node), part): (node, part, block, sizes) for s in group.sources
                   for node, part, block, sizes in s.splits}
        for node, part, block, sizes in entries.values():
            _, _, by_part = lost.setdefault(id(node), (node, list(sizes), {}))
            by_part[part] = by_part.get(part, 0) + removed[id(group)] * block
    for node, sizes, by_part in lost.values():
        for part, count in by_part.items():
            sizes[part] -= count
        if "split" in node.attributes:
            node.attributes["split"] = ir.AttrInt64s("split", sizes)
            continue
        name = unique_name(model, f"{node.name or 'split'}_pruned_sizes")
        model.graph.register_initializer(ir.Value(name=name, const_value=ir.Tensor(np.array(sizes, np.int64), name=name)))
        node.attributes.pop("num_outputs", None)  # opset 18: sizes and num_outputs are exclusive
        old = node.inputs[1] if len(node.inputs) > 1 else None
        if old is None:
            node.resize_inputs(2)
        node.replace_input_with(1, model.graph.initializers[name])
        drop_if_unused(model, old)

