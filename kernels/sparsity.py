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
