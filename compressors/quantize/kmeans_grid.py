"""Codebooks with a scale per channel, uniform grids and GPTQ rounding for the ``kmeans`` pass.

before: one float weight (a MatMul/Gemm matrix or a Gather table) and the pass config.
after:  ``(codebook, indices, scales, figures)`` such that ``codebook[indices] * scales`` (scales
broadcast along the output-channel axis; ``None`` = 1) approximates the weight.

Why: per-tensor k-means leaves rows of small norm (most rows of a word-embedding table) with a
large relative error, and 4-bit per-tensor k-means of all-MiniLM-L6-v2 ends at a sentence cosine
of 0.94. Dividing each channel by its RMS first makes one shared codebook fit every channel
(``scale: channel``). A uniform grid (``codebook: uniform``, entries = integers times ``step``
RMS) wastes no entries on equal occupancy: its indices entropy-code to ~2.6 bits at 0.7 RMS,
where a 3-bit Lloyd codebook codes to ~2.8 bits with more error on MiniLM's word table.
``method: gptq`` rounds MatMul/Gemm weights row by row onto the codebook and moves each row's
error onto the rows not yet rounded (``kernels.kmeans.gptq_codebook``), from Hessians captured on
the calibration data with padding positions left out.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import onnx_ir as ir

from modelpress.compressors.calibration import Gram, capture, linear_layers, padding_masks, plan_rounds
from modelpress.kernels.gptq import prepare_hessian
from modelpress.kernels.hessian import reconstruction_error
from modelpress.kernels.kmeans import gptq_codebook, kmeans_1d, nearest_entry, uniform_codebook

# Float64 Hessians held at once while solving (as the int4 pass): more layers capture in more runs.
HESSIAN_BUDGET = 1 << 30
CAPTURE_GROUP = 32


class Solution(NamedTuple):
    """What GPTQ needs for one weight."""

    layout: str  # "in_out" [K, N] (MatMul) or "out_in" [N, K] (Gemm transB)
    hessian: np.ndarray  # X^T X of its input, for the reported output error
    prepared: Any  # kernels.gptq.PreparedHessian of it


def solve_gptq(model: ir.Model, values: list[ir.Value], config, context, axis_of) -> tuple[dict[str, tuple], list[str]]:
    """GPTQ for every MatMul/Gemm weight in ``values`` whose input can be captured on the data.

    Returns (weight name -> (original weights, ``share`` result), notes). With ``rounds`` > 1 the
    layers are solved in that many contiguous groups, and each group's inputs are captured with
    the groups before it already rounded, so later layers make up for the error upstream (the
    weights are restored to their originals before returning). ``axis_of(value)`` gives the
    output-channel axis, as the pass decides it."""
    linear = [v for v in values if v.uses() and all(u.node.op_type in ("MatMul", "Gemm") for u in v.uses())]
    layers, rest = linear_layers(model, linear)
    notes = [f"{v.name}: rounded to nearest ({why})" for v, why in rest]
    feeds = context.calibration
    inputs = {key: layer.weight.const_value.shape[layer.in_axis] for layer in layers for key in layer.inputs}
    memory_rounds = -(-sum(8 * k * k for k in inputs.values()) // HESSIAN_BUDGET)
    rounds = plan_rounds(layers, max(1, memory_rounds, config.rounds)) if layers else []
    masks = padding_masks(feeds, config.padding_mask)
    results: dict[str, tuple] = {}
    done = 0
    try:
        for index, group in enumerate(rounds):
            grams = {key: Gram(key[1]) for layer in group for key in layer.inputs}
            capture(model, [(name, g) for (name, _), g in grams.items()], feeds, row_masks=masks,
                    values_per_run=CAPTURE_GROUP, threads=context.threads, progress=context.progress)
            prepared: dict[tuple, tuple] = {}  # Q, K and V read one input: factor its Hessian once
            for layer in group:
                context.progress("kmeans: GPTQ", done, len(layers))
                key = tuple(sorted(layer.inputs))
                if key not in prepared:
                    hessian = sum(grams[k].hessian for k in layer.inputs)
                    prepared[key] = (hessian, prepare_hessian(hessian, config.damp, act_order=True))
                value = layer.weight
                weights = value.const_value.numpy()
                solution = Solution(layer.layout, *prepared[key])
                result = share(weights, axis_of(value), config, solution)
                results[value.name] = (weights, result)
                if index < len(rounds) - 1:  # the next captures see this layer rounded
                    codebook, indices, scales, _ = result
                    restored = codebook[indices.astype(np.int64)] * (1 if scales is None else scales)
                    value.const_value = ir.Tensor(restored.astype(weights.dtype), name=value.name)
                done += 1
    finally:
        for layer in layers:
            if layer.weight.name in results:
                layer.weight.const_value = ir.Tensor(results[layer.weight.name][0], name=layer.weight.name)
    return results, notes


def channel_rms(weights: np.ndarray, axis: int) -> np.ndarray:
    """RMS of the nonzero weights of each channel along ``axis`` (1.0 for an all-zero channel)."""
    moved = np.moveaxis(weights.astype(np.float64), axis, 0).reshape(weights.shape[axis], -1)
    counts = np.count_nonzero(moved, axis=1)
    rms = np.sqrt(np.sum(moved**2, axis=1) / np.maximum(counts, 1))
    return np.where(rms > 0, rms, 1.0)


def share(weights: np.ndarray, axis: int | None, config, solution: Solution | None):
    """(codebook, indices, scales or None, figures) for one weight; see the module docstring."""
    wide = weights.astype(np.float64)
    per_channel = config.scale == "channel" and axis is not None
    if per_channel:
        scales = channel_rms(weights, axis)
        view = [1] * weights.ndim
        view[axis] = -1
        normalized = wide / scales.reshape(view)
    else:
        scales, view = None, None
        nonzero = wide[wide != 0]
        normalized = wide / (float(np.sqrt(np.mean(nonzero**2))) if nonzero.size else 1.0)
    if config.codebook == "uniform":
        codebook = (uniform_codebook(config.bits) * config.step).astype(np.float32)
    else:
        codebook, _ = kmeans_1d(normalized, config.bits, config.init, config.iterations, config.keep_zero)
    if not per_channel:  # one tensor-wide scale: fold it into the codebook
        rms = float(np.sqrt(np.mean(wide[wide != 0] ** 2))) if np.any(wide) else 1.0
        codebook = (codebook.astype(np.float64) * rms).astype(np.float32)
        normalized = wide
    figures: dict[str, Any] = {}
    if solution is None:
        indices = nearest_entry(normalized, codebook)
        if config.keep_zero and np.any(codebook == 0):
            indices[wide == 0] = int(np.flatnonzero(codebook == 0)[0])
    else:
        in_out = solution.layout == "in_out"
        matrix = wide if in_out else wide.T
        column_scales = scales if per_channel else np.ones(matrix.shape[1])
        found = gptq_codebook(matrix, solution.prepared, column_scales, codebook)
        indices = found if in_out else np.ascontiguousarray(found.T)
    codebook = codebook.astype(weights.dtype)
    restored = codebook[indices.astype(np.int64)].astype(np.float64)
    if per_channel:
        restored = restored * scales.reshape(view)
    if solution is not None:
        figures["output_error"] = round(reconstruction_error(wide, restored, solution.hessian,
                                                             layout=solution.layout), 6)
        figures["method"] = "gptq"
    figures["mse"] = float(np.mean((restored - wide) ** 2)) if wide.size else 0.0
    levels, counts = np.unique(indices, return_counts=True)
    p = counts / counts.sum()
    figures["index_entropy_bits"] = round(float(-(p * np.log2(p)).sum()), 3)
    if per_channel:
        shaped = scales.astype(weights.dtype).reshape(view)
        return codebook, indices, shaped, figures
    return codebook, indices, None, figures
