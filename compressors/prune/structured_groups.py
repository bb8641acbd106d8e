"""Dependency groups for structured pruning: which tensors must lose which slices together.

before: a normalized ``onnx_ir.Model`` and the static shapes of its main-graph values (ONNX shape
inference).
after:  ``ChannelGroup``s. Each group holds the *sources* whose output channels are removed together
(Conv with group 1, Gemm, MatMul with a constant 2-D weight), every constant slice that follows
from removing channel ``c`` (``Edit``: a tensor, an axis and where channel ``c`` lies on it), the
consumers whose inputs lose those channels (for activation-aware importance) and, when a group
cannot be pruned safely, the reason.

How: from every source, the positions of its channels are followed forward through the graph. The
state on a value is (axis, offset, block, count): channel ``c`` occupies positions
``offset + c*block .. offset + (c+1)*block - 1`` along ``axis``. Element-wise ops pass the state
through (a constant operand with the full channel axis is sliced — biases, BatchNorm statistics);
``Concat`` on the channel axis shifts ``offset``; a ``Split`` passes them to the output that holds
them (when it cuts one source's channels into parts, each part becomes a source of its own, walked
separately: ``structured_split.py``); ``Flatten`` of [N, C, H, W] multiplies ``block``
by H*W; a depthwise Conv maps input to output channels; Conv/Gemm/MatMul consumers lose the matching
input slices and end the walk. A residual ``Add``/``Mul`` of two computed values *ties* them: the
other operand's channels must come from a source at the same positions, and the two sources are
merged into one group (union-find), so they lose the same channels. Anything else — an unknown op, a
graph output, a use inside an If/Loop body, a shape that is not static, a constant that is also a
graph input — makes the group unprunable, with the reason. (A constant shared with other nodes is not
a reason: the pruned uses get sliced copies.) When a Reshape target is computed at run time (torch's
export with dynamic axes), the walk reads onnxruntime's symbolic shapes too, and a group whose
target reads the size of an axis where any source's channels lie is left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from modelpress.compressors.model import output_channel_axis
from modelpress.compressors.prune.structured_walk import (
    NeedUnit,
    Place,
    Source,
    Unprunable,
    Walker,
    attr_value,
    constant,
)
from modelpress.compressors.prune.structured_split import NeedSplit, part_sources


@dataclass
class ChannelGroup:
    sources: list[Source]
    reason: str | None = None

    @property
    def label(self) -> str:
        names = ", ".join(s.label for s in self.sources)
        unit = self.sources[0].unit
        return f"{names} [units of {unit} channels]" if unit > 1 else names

    @property
    def count(self) -> int:
        return self.sources[0].count


# --------------------------------------------------------------------------- shapes


def _shape_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a proto for shape inference, which needs the weights' shapes, not their bytes:
    large initializers become typed graph inputs, so a model of several GB is inferred from a small
    proto (small ones stay: shape tensors)."""
    proto = ir.to_proto(model)
    graph = proto.graph
    kept = [t for t in graph.initializer if int(np.prod(t.dims)) <= 64]
    graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for t in graph.initializer if int(np.prod(t.dims)) > 64)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return proto


def _dims(graph: onnx.GraphProto, symbolic: bool) -> dict[str, list]:
    shapes: dict[str, list] = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor = info.type.tensor_type
        if tensor.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else
                                 (d.dim_param or None if symbolic else None) for d in tensor.shape.dim]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def static_shapes(model: ir.Model, inputs: dict[str, tuple[int, ...]] | None = None) -> dict[str, list]:
    """Main-graph value name -> dims (int, or None when not static) from ONNX shape inference;
    ``inputs``: graph inputs' shapes to assume (e.g. a calibration feed's), for dynamic axes."""
    proto = _shape_proto(model)
    for info in proto.graph.input:
        if inputs and info.name in inputs and info.type.tensor_type.HasField("shape"):
            dims = info.type.tensor_type.shape.dim
            if len(dims) == len(inputs[info.name]):
                for dim, size in zip(dims, inputs[info.name]):
                    dim.Clear()
                    dim.dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 — inference is a help, not a requirement: values stay unknown
        inferred = proto
    return _dims(inferred.graph, symbolic=False)


def symbolic_shapes(model: ir.Model) -> tuple[dict[str, list], str]:
    """Main-graph value name -> dims (int, symbol name, or None) from onnxruntime's symbolic shape
    inference, and why there are none when it is unavailable. ONNX's own inference names a new
    unknown dim at every broadcast (the attention mask's batch against the scores'), so it cannot
    tell that a torch-computed Reshape target keeps ``batch`` and ``seq``; onnxruntime's merges the
    names of broadcast dims (they must be equal or 1 in a model that runs)."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError as error:  # it needs sympy: torch (a dependency) brings it, onnxruntime does not
        return {}, f"onnxruntime's symbolic shape inference is unavailable: {error}; pip install sympy"
    logger = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")
    level = logger.level
    logger.setLevel(logging.ERROR)  # it warns about every merged dim
    try:
        inferred = SymbolicShapeInference.infer_shapes(_shape_proto(model), auto_merge=True)
    except Exception as error:  # noqa: BLE001 — not every model is understood: its targets stay unprunable
        return {}, f"onnxruntime's symbolic shape inference failed: {type(error).__name__}: {error}"
    finally:
        logger.setLevel(level)
    if inferred is None:
        return {}, "onnxruntime's symbolic shape inference gave up on this model"
    return _dims(inferred.graph, symbolic=True), "not inferred"


# --------------------------------------------------------------------------- sources


def find_sources(model: ir.Model, shapes: dict[str, list]) -> tuple[list[Source], list[dict[str, str]]]:
    """Nodes whose output channels come from a constant weight, and main-graph-less ones skipped."""
    sources: list[Source] = []
    skipped: list[dict[str, str]] = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        found = _as_source(node)
        if found is None:
            continue
        if node.graph is not model.graph:
            skipped.append({"group": found.label, "reason": "inside an If/Loop/Scan subgraph"})
            continue
        sources.append(found)
    return sources, skipped


def _as_source(node: ir.Node) -> Source | None:
    if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    array = constant(weight)
    if array is None or array.dtype.kind != "f":
        return None
    op = node.op_type
    layer = (op in ("Conv", "ConvTranspose") and attr_value(node, "group", 1) == 1 and array.ndim >= 3) \
        or (op == "Gemm" and array.ndim == 2) \
        or (op == "MatMul" and array.ndim == 2 and constant(node.inputs[0]) is None)
    if not layer:
        return None
    axis = output_channel_axis(node, array.ndim)
    return Source(node, weight, axis, array.shape[axis])


# --------------------------------------------------------------------------- groups


def find_groups(model: ir.Model) -> tuple[list[ChannelGroup], list[dict[str, str]]]:
    """Every dependency group of the main graph (prunable or not) and sources skipped outright."""
    shapes = static_shapes(model)
    symbols, missing = {}, "no Reshape target is computed"
    if any(n.op_type == "Reshape" and constant(n.inputs[1]) is None for n in model.graph):
        symbols, missing = symbolic_shapes(model)
        for name, dims in symbols.items():  # sizes only it resolved (heads behind computed targets)
            known = shapes.get(name)
            if known is None or len(known) == len(dims):
                shapes[name] = [k if k is not None else (d if isinstance(d, int) else None)
                                for k, d in zip(known or [None] * len(dims), dims)]
    found, skipped = find_sources(model, shapes)

    def walk(source: Source) -> None:
        Walker(model, shapes, source, symbols, missing).run()

    sources = [walked for source in found for walked in _walk(walk, source)]
    for source in sources:
        _note_batchnorm(source)
    _check_fixed_sizes(sources)

    parent = list(range(len(sources)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # Which source's channels sit where on each value: ties are resolved against this map.
    placed: dict[tuple[str, Place], int] = {}
    for i, source in enumerate(sources):
        for key in source.placements:
            placed.setdefault(key, i)
    tie_reason: dict[int, str] = {}
    for i, source in enumerate(sources):
        for other, place, node_name in source.ties:
            j = placed.get((other.name, place))
            if j is None or sources[j].count != source.count:
                tie_reason[i] = (f"node {node_name!r} ties these channels to {other.name!r}, whose channels do "
                                 "not all come from one prunable layer")
                continue
            parent[root(i)] = root(j)

    members: dict[int, list[int]] = {}
    for i in range(len(sources)):
        members.setdefault(root(i), []).append(i)
    groups = []
    for indices in members.values():
        group = ChannelGroup([sources[i] for i in indices])
        reasons = [sources[i].reason or tie_reason.get(i) for i in indices]
        group.reason = next((r for r in reasons if r), None)
        if group.reason is None:
            group.reason = _graph_input_weight(group)
        groups.append(group)
    return groups, skipped


def _walk(walk, source: Source) -> list[Source]:
    """``source`` walked (its findings or its reason filled in): as it is, as attention heads when a
    Reshape splits its channels into units, or as one source per part when a Split hands them out."""
    if source.count < 2:
        source.reason = "fewer than 2 output channels"
        return [source]
    try:
        walk(source)
    except NeedUnit as exc:
        if source.unit > 1:
            source.reason = str(exc)
            return [source]
        heads = Source(source.node, source.weight, source.weight_axis, source.count // exc.unit, exc.unit,
                       start=source.start, part=source.part)
        return _walk(walk, heads)
    except NeedSplit as exc:
        return [walked for part in part_sources(source, exc.cuts) for walked in _walk(walk, part)]
    except Unprunable as exc:
        source.reason = str(exc)
    return [source]


def _check_fixed_sizes(sources: list[Source]) -> None:
    """A computed Reshape target reads sizes (batch, sequence, head_dim) that must stay as they are:
    a source whose target reads an axis where some source's channels lie is left alone (whether that
    one is pruned is not known yet: leaving both alone is the safe side)."""
    channel_axes = {(name, place.axis) for source in sources for name, place in source.placements}
    for source in sources:
        for name, axis, reshape in source.fixed:
            if source.reason is None and (name, axis) in channel_axes:
                source.reason = (f"Reshape node {reshape!r}: its target reads the size of axis {axis} of {name!r}, "
                                 "which carries prunable channels")


def _graph_input_weight(group: ChannelGroup) -> str | None:
    for source in group.sources:
        for edit in source.edits:
            value = edit.value
            if value.is_graph_input() or value.is_graph_output():
                return f"initializer {value.name!r} is also a graph input or output"
    return None


def _note_batchnorm(source: Source) -> None:
    """The per-channel scale of a BatchNormalization that directly follows the source."""
    uses = list(source.node.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "BatchNormalization" or uses[0].idx != 0:
        return
    bn = uses[0].node
    gamma, var = constant(bn.inputs[1]), constant(bn.inputs[4])
    if gamma is None or var is None or source.unit != 1 or gamma.shape != var.shape or gamma.ndim != 1 \
            or source.start + source.count > gamma.shape[0]:
        return
    gamma, var = (a[source.start: source.start + source.count] for a in (gamma, var))
    eps = attr_value(bn, "epsilon", 1e-5)
    source.bn_scale = np.abs(gamma.astype(np.float64)) / np.sqrt(var.astype(np.float64) + eps)
