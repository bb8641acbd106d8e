"""Bias correction for the int8 pass (Nagel et al., 2019, "Data-Free Quantization", section 4.2).

Rounding a weight matrix W to W + dW changes a layer's output by dW x. Averaged over the data that
is dW E[x]: a fixed shift of every output channel, which the next layers read as a changed input.
It does not average out where inputs have a non-zero mean (anything after a ReLU, or a
normalization's beta): the rounding errors of a channel's K weights add up along E[x]. Subtracting
dW E[x] from the layer's bias removes the shift at no cost at run time; what remains of the
rounding error has zero mean on the calibration data. E[x] is measured per input channel on the
calibration feeds.

Corrected: Conv (its bias input), Gemm (a 1-D ``C``) and MatMul followed by an ``Add`` of a 1-D
constant (how transformers carry their biases), when the bias is a constant read by that node only.
A layer without a bias is left alone: adding one would add an op. For Conv the correction treats
every output position as interior (zero padding at the borders sees a little less of the mean).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from modelpress.compressors.quantize.graph_edits import const, float_attr, int_attr


class ChannelMean:
    """A calibration reduction: the mean of each channel of a value (``axis``: 1 for NCHW, -1 for [..., K])."""

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.total: np.ndarray | None = None
        self.count = 0
        self.consistent = True

    def update(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch)
        if batch.ndim == 0 or batch.size == 0 or not np.issubdtype(batch.dtype, np.floating):
            return
        axis = self.axis % batch.ndim
        rows = np.moveaxis(batch, axis, -1).reshape(-1, batch.shape[axis]).astype(np.float64)
        if self.total is not None and self.total.shape != rows.shape[1:]:
            self.consistent = False  # a channel count that changes between feeds: not a channel axis
            return
        self.total = rows.sum(axis=0) if self.total is None else self.total + rows.sum(axis=0)
        self.count += rows.shape[0]

    @property
    def value(self) -> np.ndarray | None:
        if self.total is None or not self.count or not self.consistent:
            return None
        return self.total / self.count


def channel_axis(op_type: str) -> int:
    return 1 if op_type == "Conv" else -1


def bias_of(node: ir.Node, weight_index: int) -> ir.Value | None:
    """The constant bias that ``node`` (reading its weight at ``weight_index``) adds, if it is
    correctable; else None."""
    if weight_index != 1:
        return None
    if node.op_type == "Conv":
        bias = node.inputs[2] if len(node.inputs) > 2 else None
    elif node.op_type == "Gemm":
        bias = node.inputs[2] if len(node.inputs) > 2 and not int_attr(node, "transA") else None
    elif node.op_type == "MatMul":
        uses = list(node.outputs[0].uses())
        if len(uses) != 1 or uses[0].node.op_type != "Add" or node.outputs[0].is_graph_output():
            return None
        add = uses[0].node
        bias = add.inputs[1 - uses[0].idx]
    else:
        return None
    values = const(bias)
    if values is None or values.dtype != np.float32 or len(bias.uses()) != 1:
        return None
    if values.ndim < 1 or any(d != 1 for d in values.shape[:-1]):
        return None
    return bias


def correction(node: ir.Node, delta: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """dW E[x] per output channel of ``node`` for the weight change ``delta`` (in the weight's own
    layout), or None when the shapes do not fit."""
    delta = delta.astype(np.float64)
    if node.op_type == "Conv":
        group = int_attr(node, "group", 1)
        out_channels, in_per_group = delta.shape[:2]
        if delta.ndim < 3 or out_channels % group or mean.shape != (in_per_group * group,):
            return None
        summed = delta.reshape(out_channels, in_per_group, -1).sum(axis=2)  # [O, C/g]
        per_group = mean.reshape(group, in_per_group)[np.arange(out_channels) // (out_channels // group)]
        return (summed * per_group).sum(axis=1)
    if delta.ndim != 2:
        return None
    if node.op_type == "Gemm" and int_attr(node, "transB"):
        delta = delta.T
    if mean.shape != (delta.shape[0],):
        return None
    shift = mean @ delta
    if node.op_type == "Gemm":
        beta = float_attr(node, "beta")
        if beta == 0.0:
            return None
        shift = shift * float_attr(node, "alpha") / beta
    return shift


def apply(node: ir.Node, bias: ir.Value, shift: np.ndarray) -> float | None:
    """Subtract ``shift`` from ``bias``; returns the largest |shift|, or None when the shapes do not fit."""
    values = const(bias)
    if values.shape[-1] != shift.shape[0]:
        return None
    corrected = (values.astype(np.float64) - shift.reshape(values.shape)).astype(np.float32)
    bias.const_value = ir.Tensor(corrected, name=bias.name)
    return float(np.abs(shift).max())
