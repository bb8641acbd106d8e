"""Integer quantization math (numpy only, no ONNX): scales, zero points, rounding, calibration ranges.

Conventions (the ones ONNX ``QuantizeLinear`` / ``DequantizeLinear`` use, so a tensor quantized here
dequantizes identically in onnxruntime):

* ``q = saturate(round_half_to_even(x / scale) + zero_point)`` and ``x ~ (q - zero_point) * scale``.
* Weights are int8. Symmetric weights use the narrow range [-127, 127] with zero point 0, so that
  ``-w`` quantizes to ``-q`` exactly; asymmetric weights use [-128, 127] and a zero point.
* Activations are uint8, asymmetric, and their range always contains 0 (so 0.0 — padding, ReLU
  outputs — is represented exactly): u8 activations x s8 weights is the fast integer path of the
  x86 kernels (VNNI) in onnxruntime.
* ``axis`` is the axis that gets its own scale (per channel); ``None`` means one scale per tensor.

Everything is deterministic: no randomness, float32 scales computed the same way every time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INT8_MIN, INT8_MAX = -128, 127
UINT8_MIN, UINT8_MAX = 0, 255
# The smallest scale we emit: below it float32 division by the scale overflows for ordinary values.
MIN_SCALE = np.float32(1e-30)


@dataclass(frozen=True)
class QParams:
    """Scale and zero point of one quantized tensor; 0-d for per tensor, 1-d along ``axis``."""

    scale: np.ndarray  # float32
    zero_point: np.ndarray  # int8 (weights) or uint8 (activations), same shape as scale
    axis: int | None = None
    narrow: bool = False  # symmetric int8: [-127, 127] instead of [-128, 127]

    @property
    def dtype(self) -> np.dtype:
        return self.zero_point.dtype

    @property
    def symmetric(self) -> bool:
        return not np.any(self.zero_point)


def _reduce_axes(ndim: int, axis: int | None) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    return tuple(i for i in range(ndim) if i != axis % ndim)


def broadcast_shape(param: np.ndarray, axis: int | None, ndim: int) -> tuple[int, ...]:
    """Shape that makes a per-axis parameter broadcast against a tensor of rank ``ndim``."""
    if axis is None or param.ndim == 0:
        return ()
    shape = [1] * ndim
    shape[axis % ndim] = param.size
    return tuple(shape)


def weight_qparams(weights: np.ndarray, axis: int | None = None, symmetric: bool = True, bits: int = 8) -> QParams:
    """int8 scale / zero point covering ``weights`` exactly (min-max), per tensor or per ``axis``.
    ``bits=7`` keeps the values in [-64, 63] ("reduce range"): u8 x s8 products of two such values
    cannot saturate the int16 pair sums of AVX2's VPMADDUBSW on CPUs without VNNI."""
    qmax = (1 << (bits - 1)) - 1
    w = np.asarray(weights, dtype=np.float32)
    if w.ndim == 0:
        axis = None
    axes = _reduce_axes(w.ndim, axis)
    if symmetric:
        amax = np.max(np.abs(w), axis=axes) if w.size else np.zeros(w.shape[axis] if axis is not None else ())
        scale = np.asarray(amax, np.float32) / np.float32(qmax)
        zero_point = np.zeros(scale.shape, np.int8)
    else:
        lo = np.minimum(np.min(w, axis=axes), 0).astype(np.float32)
        hi = np.maximum(np.max(w, axis=axes), 0).astype(np.float32)
        scale = (hi - lo) / np.float32(2 * qmax + 1)
        safe = np.where(scale > MIN_SCALE, scale, np.float32(1))
        zero_point = np.clip(np.rint(-qmax - 1 - lo / safe), -qmax - 1, qmax).astype(np.int8)
    scale = np.where(scale > MIN_SCALE, scale, np.float32(1)).astype(np.float32)  # all-zero channels
    return QParams(
        np.asarray(scale, np.float32), np.asarray(zero_point), None if axis is None else axis % w.ndim, narrow=symmetric
    )


def activation_qparams(low: float, high: float, symmetric: bool = False) -> QParams:
    """uint8 scale / zero point for an activation observed in [low, high] (0 always included).

    ``symmetric`` centres the range on 0 (zero point 128), for signed activations that should not
    get a biased grid.
    """
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if symmetric:
        bound = max(-low, high)
        low, high = -bound, bound
    scale = np.float32((high - low) / (UINT8_MAX - UINT8_MIN))
    if not scale > MIN_SCALE:
        return QParams(np.asarray(np.float32(1)), np.asarray(np.uint8(0)))
    if symmetric:
        zero_point = 128
    else:
        zero_point = int(np.clip(np.rint(UINT8_MIN - np.float32(low) / scale), UINT8_MIN, UINT8_MAX))
    return QParams(np.asarray(scale, np.float32), np.asarray(np.uint8(zero_point)))


def quantize(x: np.ndarray, params: QParams) -> np.ndarray:
    """ONNX QuantizeLinear: round half to even, add the zero point, saturate to the integer type."""
    info = np.iinfo(params.dtype)
    x = np.asarray(x, np.float32)
    low = -info.max if params.narrow else info.min
    shape = broadcast_shape(params.scale, params.axis, x.ndim)
    scale = params.scale.reshape(shape)
    zero_point = params.zero_point.astype(np.int32).reshape(shape)
    q = np.rint(x / scale) + zero_point
    return np.clip(q, low, info.max).astype(params.dtype)


def dequantize(q: np.ndarray, params: QParams) -> np.ndarray:
    """ONNX DequantizeLinear: ``(q - zero_point) * scale`` in float32."""
    shape = broadcast_shape(params.scale, params.axis, np.ndim(q))
    centred = q.astype(np.int32) - params.zero_point.astype(np.int32).reshape(shape)
    return (centred.astype(np.float32) * params.scale.reshape(shape)).astype(np.float32)


def quantize_weights(weights: np.ndarray, axis: int | None = None, symmetric: bool = True,
                     bits: int = 8) -> tuple[np.ndarray, QParams]:
    """int8 weights and their parameters (per ``axis`` or per tensor), in ``bits`` (8 or 7)."""
    params = weight_qparams(weights, axis, symmetric, bits)
    return quantize(weights, params), params


# --------------------------------------------------------------------------- calibration


class MinMaxObserver:
    """Running min / max of every value seen (the ``minmax`` calibration method)."""

    def __init__(self) -> None:
        self.low = np.inf
        self.high = -np.inf

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.size == 0:
            return
        finite = x[np.isfinite(x)] if not np.all(np.isfinite(x)) else x
        if finite.size:
            self.low = min(self.low, float(finite.min()))
            self.high = max(self.high, float(finite.max()))

    @property
    def seen(self) -> bool:
        return self.low <= self.high

    def range(self) -> tuple[float, float]:
        return (self.low, self.high) if self.seen else (0.0, 0.0)


class HistogramObserver:
    """A fixed-bin histogram over a known [low, high] (from a first min-max pass).

    Two passes over the calibration data (min-max, then histogram) keep the bins identical for every
    batch, so the result does not depend on batch order and needs memory for one batch only.
    """

    def __init__(self, low: float, high: float, bins: int = 2048) -> None:
        self.low, self.high = float(low), float(high)
        if not self.high > self.low:
            self.high = self.low + 1.0
        self.counts = np.zeros(bins, np.int64)
        self.edges = np.linspace(self.low, self.high, bins + 1)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64).ravel()
        x = x[np.isfinite(x)]
        counts, _ = np.histogram(np.clip(x, self.low, self.high), bins=self.edges)
        self.counts += counts

    def percentile_range(self, percentile: float) -> tuple[float, float]:
        return percentile_range(self.counts, self.edges, percentile)

    def range(self, method: str, percentile: float = 99.99) -> tuple[float, float]:
        """The activation range by ``method``: percentile, mse or entropy."""
        if method == "percentile":
            return self.percentile_range(percentile)
        return mse_range(self.counts, self.edges) if method == "mse" else entropy_range(self.counts, self.edges)


def percentile_range(counts: np.ndarray, edges: np.ndarray, percentile: float) -> tuple[float, float]:
    """[value at (100 - p) %, value at p %] of a histogram: each tail loses (100 - p) % of the
    mass (onnxruntime's percentile calibration does the same). Bin edges are returned."""
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    total = int(counts.sum())
    if total == 0:
        return 0.0, 0.0
    if percentile == 100:
        nonzero = np.flatnonzero(counts)
        return float(edges[nonzero[0]]), float(edges[nonzero[-1] + 1])
    cumulative = np.cumsum(counts)
    tail = total * (100.0 - percentile) / 100.0
    low_bin = int(np.searchsorted(cumulative, tail, side="right"))
    high_bin = int(np.searchsorted(cumulative, total - tail, side="left"))
    low_bin = min(low_bin, len(counts) - 1)
    high_bin = max(min(high_bin, len(counts) - 1), low_bin)
    return float(edges[low_bin]), float(edges[high_bin + 1])


# Candidate clipping ranges for ``mse_range`` / ``entropy_range``: the observed [low, high] scaled
# by each of these factors (0 stays inside, the tails are clipped alike).
CLIP_FACTORS = np.linspace(0.2, 1.0, 81)


def _bin_index(edges: np.ndarray, value: float) -> int:
    return int(np.clip(np.searchsorted(edges, value, side="left"), 0, len(edges) - 1))


def mse_range(counts: np.ndarray, edges: np.ndarray, levels: int = UINT8_MAX - UINT8_MIN + 1) -> tuple[float, float]:
    """The clipping range whose uint8 grid gives the least expected squared error over the
    histogram (each bin's mass at its centre): rounding error inside, clipping error outside."""
    total = counts.sum()
    if total == 0:
        return 0.0, 0.0
    centres = (edges[:-1] + edges[1:]) / 2
    weights = counts / total
    low0, high0 = min(float(edges[0]), 0.0), max(float(edges[-1]), 0.0)
    best, best_error = (low0, high0), np.inf
    for factor in CLIP_FACTORS:
        low, high = low0 * factor, high0 * factor
        scale = (high - low) / (levels - 1)
        if not scale > 0:
            continue
        grid = np.clip(np.rint((centres - low) / scale), 0, levels - 1) * scale + low
        error = float(weights @ (centres - grid) ** 2)
        if error < best_error:
            best, best_error = (low, high), error
    return float(best[0]), float(best[1])


def entropy_range(counts: np.ndarray, edges: np.ndarray, levels: int = UINT8_MAX - UINT8_MIN + 1) -> tuple[float, float]:
    """The clipping range minimising KL(P || Q) (TensorRT's entropy calibration): P is the
    histogram inside the range with the clipped tails folded into its end bins, Q the same
    histogram merged into ``levels`` quantization levels and spread back over P's non-empty bins."""
    total = counts.sum()
    if total == 0:
        return 0.0, 0.0
    counts = counts.astype(np.float64)
    low0, high0 = min(float(edges[0]), 0.0), max(float(edges[-1]), 0.0)
    best, best_kl = (low0, high0), np.inf
    for factor in CLIP_FACTORS:
        low, high = low0 * factor, high0 * factor
        first, last = _bin_index(edges, low), max(_bin_index(edges, high), _bin_index(edges, low) + 1)
        raw = counts[first:last]
        if raw.size < levels or raw.sum() == 0:
            continue  # fewer bins than levels: the histogram cannot tell the candidates apart
        inside = raw.copy()
        inside[0] += counts[:first].sum()
        inside[-1] += counts[last:].sum()
        p = inside / inside.sum()
        # Q from the bins without the folded tails: what the clipped range can represent. Clipping
        # then shows as the end bins' mass that Q lacks.
        q = np.zeros_like(p)
        for chunk in np.array_split(np.arange(raw.size), levels):
            occupied = chunk[raw[chunk] > 0]
            if occupied.size:
                q[occupied] = raw[chunk].sum() / occupied.size
        q /= q.sum()
        mask = p > 0
        q_safe = np.maximum(q[mask], 1e-12)  # a clipped-to-empty end bin: heavily penalised, not infinite
        kl = float(np.sum(p[mask] * np.log(p[mask] / q_safe)))
        if kl < best_kl:
            best, best_kl = (float(edges[first]), float(edges[last])), kl
    return best


def agreement(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    """Top-1 agreement of two score arrays [..., classes]; None when there is nothing to compare."""
    if reference.ndim < 2 or reference.shape[-1] < 2 or reference.shape != candidate.shape:
        return None
    return float(np.mean(reference.argmax(-1) == candidate.argmax(-1)))


def cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Cosine similarity of two flattened arrays (1.0 for two all-zero arrays)."""
    a = np.asarray(reference, np.float64).ravel()
    b = np.asarray(candidate, np.float64).ravel()
    norm = np.linalg.norm(a) * np.linalg.norm(b)
    if norm == 0:
        return 1.0 if not (a.any() or b.any()) else 0.0
    return float(np.dot(a, b) / norm)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit integers along the last axis into uint8, low-order bits first
    (the layout of ONNX's INT4/UINT4 tensors and of onnxruntime's MatMulNBits / GatherBlockQuantized).
    A last axis that does not fill whole bytes is padded with zeros."""
    if bits not in (2, 4, 8):
        raise ValueError(f"bits must be 2, 4 or 8, got {bits}")
    v = np.asarray(values).astype(np.uint8)
    if bits == 8:
        return np.ascontiguousarray(v)
    per_byte = 8 // bits
    pad = -v.shape[-1] % per_byte
    if pad:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (pad,), np.uint8)], axis=-1)
    v = v.reshape(v.shape[:-1] + (-1, per_byte))
    packed = np.zeros(v.shape[:-1], np.uint8)
    for i in range(per_byte):
        packed |= (v[..., i] & ((1 << bits) - 1)) << (i * bits)
    return packed


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: the first ``count`` values along the last axis."""
    p = np.asarray(packed, np.uint8)
    if bits == 8:
        return p[..., :count].copy()
    per_byte = 8 // bits
    parts = [(p >> (i * bits)) & ((1 << bits) - 1) for i in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(p.shape[:-1] + (-1,))[..., :count]
