"""fp16 / bf16 weight storage: float32 initializers kept as 16-bit floats, computed in float32.

before: a float32 model — weights of any op, in the main graph or in If/Loop/Scan bodies
(``normalize`` has already lifted Constant-node weights into initializers).
after:  each selected float32 initializer ``W`` stored as ``W_fp16`` (float16) or ``W_bf16``
(bfloat16) with ``Cast(to=float)`` at the top of the graph that owns it; the Cast's output takes
the name ``W`` and feeds the original consumers, so every op still computes in float32.

Why a Cast and not a float16 graph: stock onnxruntime constant-folds the all-initializer Cast when
the session loads (checked on its optimized graph: only the float32 MatMul is left, for float16 and
bfloat16 alike), so inference runs the very kernels of the input model at the same speed, while
the file is 2x smaller and the outputs change only by the weights' rounding error. A float16
compute graph would need an fp16 kernel for every op, which ORT's CPU provider mostly lacks.

Tensors whose values would not survive the conversion stay float32 and are listed in
``skipped`` with the reason: any |x| above the format's largest finite value (65504 for
float16), or a relative error ``||W - W16|| / ||W||`` above ``max_relative_error`` — what values
below the float16 normal range (6.1e-5) cost when a tensor is made of them. bfloat16 keeps
float32's exponent range (no overflow or underflow to speak of) but only 8 significant bits.
Per tensor the stats give the max absolute error, the relative error and how many nonzero
values became zero. Scales and zero points of quantized ops (QuantizeLinear, DequantizeLinear,
com.microsoft kernels such as MatMulNBits) are left exact, so the pass can follow int8 / int4.
"""

from __future__ import annotations

from typing import Any, Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir
from modelpress.compressors.model import ensure_opset, iter_weights, opset_version
from modelpress.compressors.pipeline import Pass, PassResult
from modelpress.compressors.quantize.graph_edits import (
    Names,
    initializer,
    initializer_bytes,
)
from modelpress.compressors.selection import WeightFilterConfig, matches
from pydantic import Field

# Cast takes its `to` as an int from opset 6; Cast from bfloat16 needs opset 13.
CAST_OPSET = {"float16": 6, "bfloat16": 13}
NUMPY_TYPE = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
SUFFIX = {"float16": "fp16", "bfloat16": "bf16"}
# A few times the plain rounding error of the format (relative L2 error ~2e-4 for float16's 11
# significant bits, ~2e-3 for bfloat16's 8): a tensor above it lost values to underflow.
DEFAULT_MAX_RELATIVE_ERROR = {"float16": 1e-3, "bfloat16": 1e-2}


class Fp16Config(WeightFilterConfig):
    dtype: Literal["float16", "bfloat16"] = Field(
        "float16", description="float16: 11 significant bits, |x| <= 65504; bfloat16: 8 bits, float32's range")
    # include / exclude globs from WeightFilterConfig. min_elements 16: the Cast node a tensor
    # gets costs about what 16 elements save (2 bytes each).
    min_elements: int = Field(16, ge=1, description="smaller tensors are left as they are")
    max_relative_error: float | None = Field(
        None, gt=0.0, lt=1.0, description="per tensor ||W - W16|| / ||W|| above which it stays float32 "
        "(default 1e-3 for float16, 1e-2 for bfloat16)")


class Fp16Quantize(Pass):
    name = "fp16"
    stage = "quantize"
    config_cls = Fp16Config
    summary = "float32 weights stored as float16/bfloat16, Cast back (folded by ORT): 2x, same speed"

    def call(self, model: ir.Model) -> PassResult:
        config: Fp16Config = self.config
        notes: list[str] = []
        bytes_before = initializer_bytes(model)
        minimum = CAST_OPSET[config.dtype]
        if opset_version(model) < minimum:
            notes.append(f"opset upgraded {opset_version(model)} -> {minimum} for Cast from {config.dtype}")
            model = ensure_opset(model, minimum)  # a new model object: select on it
        limit = config.max_relative_error or DEFAULT_MAX_RELATIVE_ERROR[config.dtype]
        names = Names(model)
        per_tensor: dict[str, dict[str, Any]] = {}
        skipped: list[dict[str, str]] = []
        small = 0
        for graph, value in list(iter_weights(model)):
            tensor = value.const_value
            if tensor.dtype != ir.DataType.FLOAT or not value.uses():
                continue  # already 16-bit, integer, or dead: nothing to store smaller
            name = value.name or "?"
            reason = None
            if value.is_graph_input():
                reason = "is also a graph input, so callers may override it at run time"
            elif value.is_graph_output():
                reason = "is a graph output"
            elif not matches(name, config.include, config.exclude):
                reason = "excluded by include/exclude globs"
            elif quantized := sorted({u.node.op_type for u in value.uses() if _quantization_op(u.node)}):
                reason = f"a quantization parameter of {', '.join(quantized)} (kept exact)"
            elif tensor.size < config.min_elements:
                small += 1
                continue
            if reason is None:
                weights = tensor.numpy()
                with np.errstate(over="ignore"):  # overflow is checked (and reported) below
                    stored = weights.astype(NUMPY_TYPE[config.dtype])
                reason, figures = _conversion_check(weights, stored, config.dtype, limit)
                if reason is None:
                    kept = _store(graph, value, stored, SUFFIX[config.dtype], names)
                    per_tensor[name] = {**figures, "bytes_before": int(weights.nbytes), "bytes_after": int(stored.nbytes),
                                        "elements": int(weights.size), "stored_as": [kept]}
            if reason is not None:
                skipped.append({"tensor": name, "reason": reason})
        bytes_after = initializer_bytes(model)
        stats: dict[str, Any] = {
            "dtype": config.dtype, "tensors_converted": len(per_tensor),
            "bytes_before": bytes_before, "bytes_after": bytes_after,
            "size_ratio": round(bytes_before / bytes_after, 3) if bytes_after else None,
            "max_abs_error": max((f["max_abs_error"] for f in per_tensor.values()), default=0.0),
            "max_relative_error": max((f["relative_error"] for f in per_tensor.values()), default=0.0),
            "per_tensor": per_tensor, "skipped": skipped,
            "small_tensors_kept": small, "notes": notes,
        }
        return PassResult(model, modified=bool(per_tensor), stats=stats)


def _quantization_op(node: ir.Node) -> bool:
    """Scales of (De)QuantizeLinear and of contrib kernels (MatMulNBits, ...) stay float32: ORT's
    QDQ fusions and kernel pre-packing read them as initializers, and they are small."""
    return node.domain not in ("", "ai.onnx") or node.op_type in ("QuantizeLinear", "DequantizeLinear")


def _conversion_check(weights: np.ndarray, stored: np.ndarray, dtype: str, limit: float) -> tuple[str | None, dict]:
    """(why the tensor must stay float32 or None, its rounding figures)."""
    if not np.all(np.isfinite(weights)):
        return "holds inf or NaN", {}
    largest = float(np.abs(weights).max(initial=0.0))
    if not np.all(np.isfinite(stored)):
        top = float(ml_dtypes.finfo(NUMPY_TYPE[dtype]).max)
        return f"overflow: max |x| = {largest:.6g} exceeds {dtype}'s largest finite value {top:.6g}", {}
    back = stored.astype(np.float32)
    error = np.abs(back.astype(np.float64) - weights)
    norm = float(np.linalg.norm(weights.astype(np.float64)))
    relative = float(np.linalg.norm(error)) / norm if norm else 0.0
    flushed = int(np.count_nonzero((weights != 0) & (back == 0)))
    figures = {"elements": int(weights.size), "max_abs_error": float(f"{float(error.max(initial=0.0)):.6g}"),
               "relative_error": float(f"{relative:.6g}"), "flushed_to_zero": flushed}
    if relative > limit:
        return (f"underflow: relative error {relative:.3g} > max_relative_error {limit:g} "
                f"({flushed} nonzero values became 0; max |x| = {largest:.3g})"), figures
    return None, figures


def _store(graph: ir.Graph, value: ir.Value, stored: np.ndarray, suffix: str, names: Names) -> str:
    """``value`` becomes ``Cast(value_<suffix>, to=float)`` under its own name, first in ``graph``
    (consumers in nested subgraphs see it as an outer-scope value, as they saw the initializer).
    Returns the name of the 16-bit initializer."""
    name = value.name
    half = initializer(graph, names(f"{name}_{suffix}"), stored)
    cast = ir.node("Cast", [half], {"to": ir.DataType.FLOAT})
    out = cast.outputs[0]
    out.name = names(f"{name}_cast")  # no type/shape: onnx-ir would write a value_info entry for it
    first = next(iter(graph), None)
    graph.insert_before(first, cast) if first is not None else graph.append(cast)
    value.replace_all_uses_with(out)
    graph.initializers.pop(name)
    out.name = name  # the graph reads as before: W = Cast(W_fp16)
    return half.name
