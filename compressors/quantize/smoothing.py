"""SmoothQuant-style scale migration for the int8 pass's dynamic MatMul/Gemm kernels.

A dynamic int8 kernel quantizes its input activation with one scale for the whole tensor. After a
normalization layer that tensor has a few outlier channels (LayerNorm's gamma makes them tens of
times larger than the rest), so the scale is set by them and every other channel keeps only a few
levels. Migration divides each input channel j by s_j and multiplies row j of the weight by s_j —
the product is unchanged — with s_j = max|x_j|^alpha / max|W_j|^(1 - alpha) (Xiao et al., 2023):
the activation's range evens out, the weight (quantized per output channel) absorbs the difference.

Only activations produced by a normalization are migrated (``LayerNormalization`` and its
decomposed ``Mul(gamma) -> Add(beta)`` form): that is where the outliers live. Measured on
all-MiniLM-L6-v2 (benchmarks/minilm.py; mean-pooled sentence-embedding cosine to fp32, 160
sentences, batch 1): all-dynamic int8 0.9934; migrating the normalization-fed projections
(attention q/k/v, feed-forward input) 0.9960 at alpha 0.5 and 0.9964 at alpha 0.75 (the default:
it was also best for most single layers in a simulation of ORT's dynamic kernel); migrating the
attention and feed-forward *output* projections as well lowered it to 0.988.

The division is folded into the normalization's scale and bias when the migrated MatMuls are its
only consumers (pre-LN transformers); otherwise (post-LN BERT, where the residual also reads it) a
``Mul`` by 1/s is inserted in front of the migrated MatMuls only: an elementwise op, cheap next to
the MatMuls it serves.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from modelpress.compressors.quantize.graph_edits import Names, const, initializer, int_attr

NORMALIZATION_OPS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")
# s is kept within these bounds: a channel that is (almost) always zero must not blow a weight row up.
MIN_SCALE, MAX_SCALE = 1e-2, 1e2
FLOOR = 1e-5


class ChannelAbsMax:
    """A calibration reduction: the largest |x| of each channel (last axis)."""

    def __init__(self) -> None:
        self.value: np.ndarray | None = None

    def update(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch)
        if batch.ndim == 0 or batch.size == 0:
            return
        channel_max = np.abs(batch.reshape(-1, batch.shape[-1])).max(axis=0).astype(np.float64)
        self.value = channel_max if self.value is None else np.maximum(self.value, channel_max)


def normalization_output(value: ir.Value | None) -> bool:
    """Is ``value`` the output of a normalization layer (an op, or a decomposed LayerNorm's affine)?"""
    producer = value.producer() if value is not None else None
    if producer is None:
        return False
    if producer.op_type in NORMALIZATION_OPS:
        return producer.outputs[0] is value
    return _decomposed_affine(producer) is not None


def _decomposed_affine(add: ir.Node) -> tuple[ir.Node, ir.Value, ir.Value] | None:
    """For ``Add(Mul(Div(...), gamma), beta)`` with constant 1-D gamma and beta (LayerNorm exported
    below opset 17): (the Mul, gamma, beta); else None."""
    if add.op_type != "Add" or len(add.inputs) != 2:
        return None
    for mul_side in (0, 1):
        mul_out, beta = add.inputs[mul_side], add.inputs[1 - mul_side]
        mul = mul_out.producer() if mul_out is not None else None
        if mul is None or mul.op_type != "Mul" or const(beta) is None or const(beta).ndim != 1:
            continue
        for gamma_side in (0, 1):
            gamma, normed = mul.inputs[gamma_side], mul.inputs[1 - gamma_side]
            source = normed.producer() if normed is not None else None
            if const(gamma) is not None and const(gamma).ndim == 1 and source is not None and source.op_type == "Div":
                return mul, gamma, beta
    return None


def migrate(graph: ir.Graph, activation: ir.Value, uses: list[tuple[ir.Node, ir.Value]], channel_max: np.ndarray,
            alpha: float, names: Names) -> dict | None:
    """Migrate ``activation``'s scale into the weights of ``uses`` ((MatMul/Gemm node, weight
    initializer) pairs, each weight read by that node only). Returns a stats record (with
    ``scale``, the divisor now applied to the activation's channels), or None when nothing was
    changed."""
    rows = []
    for node, weight in uses:
        w = const(weight)
        transposed = node.op_type == "Gemm" and int_attr(node, "transB")
        rows.append(np.abs(w).max(axis=0 if transposed else 1) if w is not None else None)
    if any(r is None or r.shape != channel_max.shape for r in rows):
        return None
    weight_max = np.max(rows, axis=0).astype(np.float64)
    scale = np.maximum(channel_max, FLOOR) ** alpha / np.maximum(weight_max, FLOOR) ** (1.0 - alpha)
    scale = np.clip(scale, MIN_SCALE, MAX_SCALE)
    for node, weight in uses:
        w = const(weight).astype(np.float64)
        transposed = node.op_type == "Gemm" and int_attr(node, "transB")
        scaled = w * (scale[None, :] if transposed else scale[:, None])
        weight.const_value = ir.Tensor(scaled.astype(np.float32), name=weight.name)
    inverse = (1.0 / scale).astype(np.float32)
    smoothed = _fold(activation, [n for n, _ in uses], inverse) or _insert_mul(graph, activation, uses, inverse, names)
    return {"activation": activation.name, "channels": int(scale.size), "how": smoothed,
            "outlier_ratio": round(float(channel_max.max() / max(np.median(channel_max), FLOOR)), 2),
            "scale": scale}


def _fold(activation: ir.Value, nodes: list[ir.Node], inverse: np.ndarray) -> str | None:
    """Scale the normalization's gamma and beta by 1/s when the migrated nodes are the only readers."""
    if activation.is_graph_output() or {id(u.node) for u in activation.uses()} != {id(n) for n in nodes}:
        return None
    producer = activation.producer()
    if producer.op_type in NORMALIZATION_OPS:
        params = [v for v in producer.inputs[1:3] if v is not None]
    else:
        _, gamma, beta = _decomposed_affine(producer)
        params = [gamma, beta]
    if any(const(v) is None or const(v).shape != inverse.shape or len(v.uses()) != 1 for v in params):
        return None
    for value in params:
        value.const_value = ir.Tensor((const(value) * inverse).astype(np.float32), name=value.name)
    return "folded into the normalization"


def _insert_mul(graph: ir.Graph, activation: ir.Value, uses, inverse: np.ndarray, names: Names) -> str:
    factor = initializer(graph, names(f"{activation.name}_smooth_inv"), inverse)
    mul = ir.node("Mul", [activation, factor])
    mul.outputs[0].name = names(f"{activation.name}_smoothed")
    first = min((n for n, _ in uses), key=lambda n: list(graph).index(n))
    graph.insert_before(first, mul)
    for node, _ in uses:
        node.replace_input_with(0, mul.outputs[0])
    return "Mul inserted"
