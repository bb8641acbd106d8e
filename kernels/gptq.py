"""Block-wise weight quantization of linear layers: GPTQ and round-to-nearest (numpy, torch; no ONNX).

A linear layer ``y = x @ W`` keeps its weight as low-bit integers in blocks of ``block_size``
consecutive *inputs* per output — the layout of ONNX Runtime's ``MatMulNBits`` and of opset-21
``DequantizeLinear(block_size=...)``: one scale and zero point per (block, output).

Integers are unsigned, ``q`` in ``[0, 2^bits)``, and ``w ~ (q - zero_point) * scale``:

* symmetric: ``zero_point = 2^(bits-1)`` (MatMulNBits' default, so the input can be omitted) and
  ``scale = m / -2^(bits-1)`` with ``m`` the block's weight of largest magnitude, sign kept (as
  ONNX Runtime's own blockwise quantizer does): ``m`` lands exactly on the end of the grid and all
  ``2^bits`` levels are used. Such a scale can be negative; the product is what counts.
* asymmetric: the range ``[min(w, 0), max(w, 0)]`` in ``2^bits - 1`` steps, ``zero_point =
  round(-min / scale)``.

``rtn_quantize`` rounds every weight to its nearest level. ``gptq_quantize`` (Frantar et al., 2023)
quantizes one input row at a time and moves the rounding error onto the rows not yet quantized so
that the layer's output on the calibration inputs changes least (``||XW - XŴ||²``, Hessian
``H = X^T X``); it shares the Cholesky machinery of SparseGPT (``kernels/hessian.py``). A block's
scale is chosen when the solver reaches its first row, from the weights as updated so far. With
``act_order`` rows go in order of decreasing ``diag(H)`` and every block's scale comes from the
original weights ("static groups"), so the result still fits the plain block layout (no g_idx).

Layouts as in ``kernels/hessian.py``: ``"in_out"`` (W [K, N], ONNX MatMul) or ``"out_in"`` (W [N, K],
Gemm ``transB=1``). Results follow the given layout: ``q`` like W, ``scales`` and ``zero_points``
[k_blocks, N] (in_out) or [N, k_blocks] (out_in), ``k_blocks = ceil(K / block_size)`` — the last
block may be partial. Deterministic: float64 throughout, scales rounded to float32 before use so
that the integers dequantize in ONNX Runtime to the values the solver assumed.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from modelpress.kernels.hessian import Layout, _to_in_out, inverse_hessian_cholesky, reconstruction_error
from modelpress.kernels.quant import pack_bits

# ``search``: range shrink factors tried, from 1 down to MIN_SHRINK.
MIN_SHRINK = 0.75
SHRINK_STEPS = 11
# Rows per lazy-batch update (rounded to a multiple of block_size so no block straddles two).
LAZY_ROWS = 128


class BlockQuantized(NamedTuple):
    q: np.ndarray  # uint8 integers in [0, 2^bits), the weight's layout
    scales: np.ndarray  # float32, one per (block, output)
    zero_points: np.ndarray  # uint8, same shape as scales


def block_params(rows: np.ndarray, bits: int, symmetric: bool, search: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32 values, as float64) and zero point per output of one block ``rows`` [rows, N].

    ``search``: also try ranges shrunk by up to ``1 - MIN_SHRINK`` and keep, per output, the one
    with the least squared rounding error (clipping a rare large weight can pay at 4 bits).
    """
    maxq = (1 << bits) - 1
    half = 1 << (bits - 1)
    if symmetric:
        peak = rows[np.argmax(np.abs(rows), axis=0), np.arange(rows.shape[1])]
        low, high = peak, peak  # only the signed peak matters
    else:
        low = np.minimum(rows.min(axis=0), 0.0)
        high = np.maximum(rows.max(axis=0), 0.0)
    best = None
    for shrink in np.linspace(1.0, MIN_SHRINK, SHRINK_STEPS) if search else (1.0,):
        if symmetric:
            scale = peak * shrink / -half
            zero = np.full(rows.shape[1], half, dtype=np.float64)
        else:
            scale = (high - low) * shrink / maxq
            zero = np.clip(np.rint(-low * shrink / np.where(scale != 0, scale, 1.0)), 0, maxq)
        scale = np.where(np.abs(scale) >= 1e-30, scale, 1.0).astype(np.float32).astype(np.float64)
        if not search:
            return scale, zero
        error = np.sum(((_round(rows, scale, zero, maxq) - zero) * scale - rows) ** 2, axis=0)
        if best is None:
            best = (error, scale, zero)
        else:
            better = error < best[0]
            best = (np.where(better, error, best[0]), np.where(better, scale, best[1]), np.where(better, zero, best[2]))
    return best[1], best[2]


def _round(row: np.ndarray, scale: np.ndarray, zero: np.ndarray, maxq: int) -> np.ndarray:
    return np.clip(np.rint(row / scale) + zero, 0, maxq)


def _check(bits: int, block_size: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")


def _result(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, layout: Layout) -> BlockQuantized:
    q, scales, zeros = q.astype(np.uint8), scales.astype(np.float32), zeros.astype(np.uint8)
    if layout == "out_in":
        q, scales, zeros = q.T, scales.T, zeros.T
    return BlockQuantized(np.ascontiguousarray(q), np.ascontiguousarray(scales), np.ascontiguousarray(zeros))


def rtn_quantize(
    weight: np.ndarray, *, bits: int = 4, block_size: int = 32, symmetric: bool = True, search: bool = False,
    layout: Layout = "in_out",
) -> BlockQuantized:
    """Round each weight to the nearest level of its block's grid (no calibration data)."""
    _check(bits, block_size)
    w = np.asarray(_to_in_out(weight, layout), dtype=np.float64)
    n_in, n_out = w.shape
    blocks = -(-n_in // block_size)
    q = np.empty(w.shape)
    scales, zeros = np.empty((blocks, n_out)), np.empty((blocks, n_out))
    for b in range(blocks):
        rows = w[b * block_size : (b + 1) * block_size]
        scales[b], zeros[b] = block_params(rows, bits, symmetric, search)
        q[b * block_size : (b + 1) * block_size] = _round(rows, scales[b], zeros[b], (1 << bits) - 1)
    return _result(q, scales, zeros, layout)


class PreparedHessian(NamedTuple):
    """What GPTQ needs of a Hessian, computed once for every layer that reads the same input."""

    order: np.ndarray  # the order rows are quantized in
    act_order: bool  # order by decreasing diag(H) (block scales then come from the original weights)
    upper: np.ndarray  # upper Cholesky factor of the damped inverse Hessian, in that order
    dead: np.ndarray  # inputs never active in the calibration data (their weights become 0)


def prepare_hessian(hessian: np.ndarray, damp: float = 0.01, act_order: bool = False) -> PreparedHessian:
    """Factor ``H`` for ``gptq_quantize`` (``act_order``: rows by decreasing ``diag(H)``)."""
    h = np.asarray(hessian, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"the Hessian must be square, got shape {h.shape}")
    dead = np.diag(h) == 0
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(h.shape[0])
    upper, _ = inverse_hessian_cholesky(h[np.ix_(order, order)] if act_order else h, damp)
    return PreparedHessian(order, act_order, upper, dead)


def gptq_quantize(
    weight: np.ndarray,
    hessian: np.ndarray | PreparedHessian,
    *,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = True,
    damp: float = 0.01,
    act_order: bool = False,
    search: bool = False,
    layout: Layout = "in_out",
) -> BlockQuantized:
    """GPTQ: quantize ``weight`` so that ``||X W - X Ŵ||²`` stays small, ``hessian = X^T X`` [K, K]
    (or its ``prepare_hessian``, which then fixes ``damp`` and ``act_order``).

    Inputs never active in the calibration data (``diag(H) == 0``) get zero weights, which leaves
    the calibration outputs unchanged. ``damp`` is relative to ``mean(diag(H))``.
    """
    _check(bits, block_size)
    w = np.array(_to_in_out(weight, layout), dtype=np.float64, copy=True)
    n_in, n_out = w.shape
    if not isinstance(hessian, PreparedHessian):
        hessian = prepare_hessian(hessian, damp, act_order)
    order, act_order, upper, dead = hessian
    if upper.shape != (n_in, n_in):
        raise ValueError(f"the Hessian is {upper.shape}, the weight has {n_in} inputs ({layout})")
    maxq = (1 << bits) - 1
    blocks = -(-n_in // block_size)
    w[dead] = 0.0
    scales, zeros = np.zeros((blocks, n_out)), np.zeros((blocks, n_out))
    if act_order:
        for b in range(blocks):  # static groups: the block layout must not depend on the order
            scales[b], zeros[b] = block_params(w[b * block_size : (b + 1) * block_size], bits, symmetric, search)
        w = w[order]
    q = np.empty(w.shape)

    def round_row(position: int, rows: np.ndarray) -> np.ndarray:
        row = order[position]
        b = row // block_size
        if not act_order and row % block_size == 0:
            scales[b], zeros[b] = block_params(rows[:block_size], bits, symmetric, search)
        q[position] = _round(rows[0], scales[b], zeros[b], maxq)
        return (q[position] - zeros[b]) * scales[b]

    gptq_sweep(w, upper, max(block_size, LAZY_ROWS // block_size * block_size), round_row)
    if act_order:
        q[order] = q.copy()
    return _result(q, scales, zeros, layout)


def gptq_sweep(w: np.ndarray, upper: np.ndarray, lazy: int,
               round_row: Callable[[int, np.ndarray], np.ndarray]) -> None:
    """GPTQ's column loop, shared by ``gptq_quantize`` and ``kernels.kmeans.gptq_codebook``.

    ``w`` [K, N] float64, rows already in solving order, is updated in place. Row ``p`` is rounded
    by ``round_row(p, rows)``: ``rows`` holds that row and the later rows of its lazy batch, as
    updated so far (``rows[0]`` is the row to round); it returns the row's restored values. The
    rounding error, scaled by the Cholesky factor ``upper``, moves onto the rows not yet rounded:
    at once within the batch of ``lazy`` rows, and onto the later rows in one product per batch.
    """
    n_in = w.shape[0]
    for i1 in range(0, n_in, lazy):
        i2 = min(i1 + lazy, n_in)
        chunk = w[i1:i2].copy()
        u_chunk = upper[i1:i2, i1:i2]
        errors = np.empty_like(chunk)
        for i in range(i2 - i1):
            err = (chunk[i] - round_row(i1 + i, chunk[i:])) / u_chunk[i, i]
            chunk[i:] -= np.outer(u_chunk[i, i:], err)  # row i itself becomes the restored values
            errors[i] = err
        if i2 < n_in:
            w[i2:] -= upper[i1:i2, i2:].T @ errors  # lazy batch update of the later rows


def dequantize_blocks(quantized: BlockQuantized, block_size: int, *, layout: Layout = "in_out") -> np.ndarray:
    """The float32 weights ``(q - zero_point) * scale`` that a quantized layer computes with."""
    q, scales, zeros = quantized
    if layout == "out_in":
        q, scales, zeros = q.T, scales.T, zeros.T
    expand = np.arange(q.shape[0]) // block_size
    w = (q.astype(np.float32) - zeros[expand].astype(np.float32)) * scales[expand]
    return np.ascontiguousarray(w if layout == "in_out" else w.T)


def output_error(weight: np.ndarray, quantized: BlockQuantized, block_size: int, hessian: np.ndarray, *,
                 layout: Layout = "in_out") -> float:
    """Relative output error ``||X(W - Ŵ)||² / ||XW||²`` of a quantized layer, from ``H`` alone."""
    restored = dequantize_blocks(quantized, block_size, layout=layout)
    return reconstruction_error(weight, restored, hessian, layout=layout)


# --------------------------------------------------------------------------- storage layouts


def matmulnbits_arrays(quantized: BlockQuantized, block_size: int, bits: int, *, layout: Layout = "in_out"):
    """``MatMulNBits`` inputs: B uint8 [N, k_blocks, block_size·bits/8] (K padded to whole blocks
    with the zero level), scales [N, k_blocks] and zero points packed to [N, ceil(k_blocks·bits/8)]."""
    q, scales, zeros = quantized
    if layout == "in_out":
        q, scales, zeros = q.T, scales.T, zeros.T
    n, k = q.shape
    blocks = scales.shape[1]
    padded = np.full((n, blocks * block_size), 1 << (bits - 1), np.uint8)
    padded[:, :k] = q
    return pack_bits(padded.reshape(n, blocks, block_size), bits), np.ascontiguousarray(scales), pack_bits(zeros, bits)


def folded_arrays(quantized: BlockQuantized, block_size: int, bits: int, symmetric: bool, *, layout: Layout = "in_out"):
    """The integers and parameters shaped so that ``(q - zero_point) * scale`` broadcasts block-wise:
    q [k_blocks, block_size, N] with parameters [k_blocks, 1, N] (``in_out``), or [N, k_blocks,
    block_size] with [N, k_blocks, 1] (``out_in``), the input axis zero-padded to whole blocks; 2-D
    q with [1, N] / [N, 1] parameters when one block spans the axis. Symmetric integers are stored
    signed (``q - 2^(bits-1)``, zero points None), others unsigned; int4 as ml_dtypes' 4-bit types."""
    import ml_dtypes

    q, scales, zeros = quantized
    axis = 0 if layout == "in_out" else 1
    blocks, (rows, cols) = scales.shape[axis], q.shape
    signed = q.astype(np.int16) - (1 << (bits - 1)) if symmetric else q
    int_type = {4: (ml_dtypes.uint4, ml_dtypes.int4), 8: (np.uint8, np.int8)}[bits][int(symmetric)]
    if blocks == 1:
        shape = (1, cols) if axis == 0 else (rows, 1)
        return signed.astype(int_type), scales.reshape(shape), None if symmetric else zeros.reshape(shape).astype(int_type)
    padding = [(0, 0), (0, 0)]
    padding[axis] = (0, blocks * block_size - q.shape[axis])
    blocked = np.pad(signed, padding).reshape((blocks, block_size, cols) if axis == 0 else (rows, blocks, block_size))
    shape = (blocks, 1, cols) if axis == 0 else (rows, blocks, 1)
    return blocked.astype(int_type), scales.reshape(shape), None if symmetric else zeros.reshape(shape).astype(int_type)
