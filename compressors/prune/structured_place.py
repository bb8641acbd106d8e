"""What the structured walk records: where channels lie (``Place``), the constant slices and
consumers that follow from removing them (``Edit``, ``Consumer``), one source layer's findings
(``Source``), why a group is left alone (``Unprunable``), and reading constants behind exporter quirks.
``structured_walk.py`` fills these in, ``structured_groups.py`` merges them, ``structured.py`` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir


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
    start: int = 0  # its first output channel: a layer whose channels a Split hands out is one source per part
    part: bool = False  # one of those parts
    edits: list[Edit] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    touched: list[ir.Value] = field(default_factory=list)  # values whose shape changes
    placements: list[tuple[str, Place]] = field(default_factory=list)  # where its channels were seen
    depthwise: list[ir.Node] = field(default_factory=list)  # their ``group`` attribute changes
    reshapes: list[ir.Node] = field(default_factory=list)  # flatten-like Reshapes: target becomes [0, -1]
    # (Reshape node, target position, positions per unit): that target entry loses removed * per_unit
    reshape_dims: list[tuple[ir.Node, int, int]] = field(default_factory=list)
    # (value, axis, Reshape node): computed Reshape target entries read these sizes, which must not change
    fixed: list[tuple[str, int, str]] = field(default_factory=list)
    ties: list[tuple[ir.Value, Place, str]] = field(default_factory=list)  # (other value, place, node)
    splits: list[tuple[ir.Node, int, int, tuple[int, ...]]] = field(default_factory=list)  # (Split, output,
    # positions per unit, its sizes before pruning): that output loses removed * positions per unit
    bn_scale: np.ndarray | None = None  # |gamma| / sqrt(var + eps) of a BatchNorm right after it
    reason: str | None = None

    @property
    def label(self) -> str:
        name = self.weight.name or self.node.name or self.node.op_type
        return f"{name}[{self.start}:{self.start + self.count * self.unit}]" if self.part else name


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


def axes_of(node: ir.Node):
    """The ``axes`` of Squeeze/Unsqueeze/Reduce*: an attribute before opset 13/18, an input after."""
    axes = attr_value(node, "axes")
    if axes is None and len(node.inputs) > 1:
        axes = constant(node.inputs[1])
    return axes
