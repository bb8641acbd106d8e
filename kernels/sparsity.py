"""Magnitude masks: which weights to zero for a target sparsity (numpy only, no ONNX)."""

from __future__ import annotations

import numpy as np


def magnitude_mask(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """Boolean mask of the weights kept: exactly ``round(sparsity * size)`` smallest |w| removed.

    Ties are broken by position (a stable sort), so the result is deterministic.
    """
    flat = np.abs(weights.astype(np.float32, copy=False)).ravel()
    drop = int(round(sparsity * flat.size))
    keep = np.ones(flat.size, dtype=bool)
    if drop > 0:
        keep[np.argsort(flat, kind="stable")[:drop]] = False
    return keep.reshape(weights.shape)


def global_threshold(abs_values: list[np.ndarray], sparsity: float) -> float:
    """The |w| below which a fraction ``sparsity`` of all given weights lies (one threshold for all)."""
    total = sum(a.size for a in abs_values)
    drop = int(round(sparsity * total))
    if drop == 0:
        return -1.0
    merged = np.concatenate([a.ravel() for a in abs_values]).astype(np.float32, copy=False)
    return float(np.partition(merged, drop - 1)[drop - 1])


def threshold_mask(weights: np.ndarray, threshold: float) -> np.ndarray:
    return np.abs(weights) > threshold


def drop_smallest(scores: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask of the entries kept: exactly ``count`` lowest scores removed (ties by position)."""
    flat = np.asarray(scores).ravel()
    keep = np.ones(flat.size, dtype=bool)
    if count >= flat.size:
        keep[:] = False
    elif count > 0:
        # A linear-time selection instead of a full sort (ADMM calls this 150 times per layer); the
        # entries equal to the threshold go by position, exactly as a stable sort would drop them.
        threshold = np.partition(flat, count - 1)[count - 1]
        undefined = np.isnan(threshold)  # NaNs sort last
        below = ~np.isnan(flat) if undefined else flat < threshold
        keep[below] = False
        ties = np.isnan(flat) if undefined else flat == threshold
        keep[np.flatnonzero(ties)[: count - int(below.sum())]] = False
    return keep.reshape(np.shape(scores))


def group_mask(scores: np.ndarray, sparsity: float, axis: int) -> np.ndarray:
    """Keep-mask removing ``round(sparsity * n)`` lowest scores in every 1-D slice along ``axis``.

    Wanda compares weights only within one output: for an ONNX MatMul weight [in, out] that is
    ``axis=0`` (each column is one output), for a torch/Gemm-transB weight [out, in] ``axis=1``.
    """
    moved = np.moveaxis(np.asarray(scores), axis, -1)
    drop = round(sparsity * moved.shape[-1])
    keep = np.ones(moved.shape, dtype=bool)
    if drop > 0:
        order = np.argsort(moved, axis=-1, kind="stable")[..., :drop]
        np.put_along_axis(keep, order, False, axis=-1)
    return np.moveaxis(keep, -1, axis)


def nm_mask(scores: np.ndarray, n: int, m: int, axis: int = 0) -> np.ndarray:
    """N:M keep-mask: in every run of ``m`` consecutive entries along ``axis`` keep the ``n`` highest.

    "2:4" is ``n=2, m=4`` (at most 2 nonzeros in each group of 4). The groups run along the input
    dimension of a weight — ``axis=0`` for an ONNX MatMul weight [in, out] — which is the layout
    sparse tensor cores and sparse CPU kernels expect. ``scores.shape[axis]`` must be a multiple of
    ``m``. Ties keep the earlier position, so the result is deterministic.
    """
    if not 0 < n <= m:
        raise ValueError(f"N:M needs 0 < n <= m, got {n}:{m}")
    moved = np.moveaxis(np.asarray(scores), axis, -1)
    length = moved.shape[-1]
    if length % m:
        raise ValueError(f"N:M {n}:{m}: the dimension has {length} entries, not a multiple of {m}")
    groups = moved.reshape(*moved.shape[:-1], length // m, m)
    # Stable sort of the negated scores: highest first, earlier position first among equals.
    order = np.argsort(-groups, axis=-1, kind="stable")[..., :n]
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order, True, axis=-1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)
