"""Exact 1-D k-means (Lloyd) for weight sharing, numpy only.

before: any float array (a weight tensor), a bit width b.
after:  a codebook of 2^b float32 centroids and a uint8 index per value (same shape), so that
``codebook[indices]`` is the clustered tensor.

Why it is fast: in one dimension the clusters of Lloyd's algorithm are contiguous runs of the sorted
values, split at the midpoints between neighbouring centroids. So the values are sorted once
(O(n log n)) and prefix sums of them are kept; each iteration then finds the k-1 split points with
``np.searchsorted`` and gets every cluster's sum and count from the prefix sums — O(k log n) per
iteration, independent of n. The final assignment is one ``searchsorted`` of the values into the
midpoints. Ten million values take about a second, dominated by the one sort.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from modelpress.kernels.gptq import LAZY_ROWS, gptq_sweep

Init = Literal["linear", "density"]


def kmeans_1d(
    values: np.ndarray,
    bits: int,
    init: Init = "linear",
    iterations: int = 1000,
    keep_zero: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster ``values`` into at most ``2**bits`` shared values; return ``(codebook, indices)``.

    - ``codebook``: float32 of exactly ``2**bits`` entries. Entries no value is assigned to (when
      the data has fewer distinct values than centroids) repeat a used one, so the codebook is
      always full size.
    - ``indices``: uint8, the shape of ``values``; ``codebook[indices]`` is the clustered array.
    - ``keep_zero``: when the array holds zeros (pruned weights) they get entry 0, which is exactly
      0.0 and never moves, and only the nonzeros are clustered into the other ``2**bits - 1``
      entries — so pruning survives clustering and index 0 marks exactly the pruned positions.
    - ``init``: ``linear`` spaces the initial centroids evenly over [min, max] (keeps the rare large
      weights representable; Deep Compression found it the most accurate); ``density`` spaces
      them evenly over the CDF (more centroids where the weights are dense).
    - ``iterations``: an upper bound; Lloyd stops early once no split point moves.

    Deterministic: no random numbers, and ties between two centroids go to the lower one.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8 for uint8 indices, got {bits}")
    if init not in ("linear", "density"):
        raise ValueError(f"init must be 'linear' or 'density', got {init!r}")
    k = 1 << bits
    flat = np.asarray(values).ravel()
    if flat.size and not np.isfinite(flat).all():
        raise ValueError("values contain NaN or infinity; k-means needs finite weights")
    flat = flat.astype(np.float32, copy=False)

    nonzero = flat != 0 if keep_zero else None
    zero_slot = nonzero is not None and flat.size > 0 and not nonzero.all()  # any exact zeros?
    clustered = flat[nonzero] if zero_slot else flat
    free = k - 1 if zero_slot else k

    centroids = _lloyd(np.sort(clustered), free, init, iterations)
    # Assign against the float32 centroids actually stored, so each index is the nearest entry.
    centroids = centroids.astype(np.float32)
    indices = np.zeros(flat.size, dtype=np.uint8)
    if centroids.size:
        c64 = centroids.astype(np.float64)
        midpoints = (c64[:-1] + c64[1:]) / 2
        # side="left": a value exactly on a midpoint goes to the lower centroid. Only the clustered
        # values are searched: with 90% zeros that is a tenth of the work.
        assigned = np.searchsorted(midpoints, clustered, side="left").astype(np.uint8)
        if zero_slot:
            indices[nonzero] = assigned + 1
        else:
            indices = assigned
    codebook = np.concatenate([[0.0] if zero_slot else [], centroids]).astype(np.float32)
    if codebook.size < k:  # no values at all: pad so the codebook always has 2**bits entries
        fill = codebook[-1] if codebook.size else np.float32(0)
        codebook = np.concatenate([codebook, np.full(k - codebook.size, fill, np.float32)])
    return codebook, indices.reshape(np.shape(values))


def _lloyd(sorted_values: np.ndarray, k: int, init: Init, iterations: int) -> np.ndarray:
    """Lloyd's iterations on sorted values; return k ascending float64 centroids."""
    n = sorted_values.size
    if n == 0:
        return np.zeros(0)
    s = sorted_values.astype(np.float64)
    is_new = np.concatenate([[True], s[1:] != s[:-1]])
    if np.count_nonzero(is_new) <= k:
        distinct = s[is_new]
        # Fewer distinct values than centroids: every value is its own exact centroid.
        return np.concatenate([distinct, np.full(k - distinct.size, distinct[-1])])
    prefix = np.concatenate([[0.0], np.cumsum(s)])

    if init == "linear":
        centroids = np.linspace(s[0], s[-1], k)
    else:  # density: the value at the middle of each of k equal slices of the CDF
        centroids = s[((np.arange(k) + 0.5) * n / k).astype(np.int64)]

    bounds = None
    for _ in range(iterations):
        midpoints = (centroids[:-1] + centroids[1:]) / 2
        # Cluster j holds s[edges[j]:edges[j+1]]; side="right" keeps ties with the lower centroid.
        new_bounds = np.searchsorted(s, midpoints, side="right")
        if bounds is not None and np.array_equal(new_bounds, bounds):
            break
        bounds = new_bounds
        edges = np.concatenate([[0], bounds, [n]])
        counts = np.diff(edges)
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        # An empty cluster keeps its centroid: moving it would need a random restart.
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        # Means of contiguous sorted runs stay sorted, so the midpoint split stays valid.
    return centroids


def kmeans_vectors(
    vectors: np.ndarray,
    bits: int,
    iterations: int = 20,
    keep_zero: bool = True,
    seed: int = 0,
    chunk: int = 1 << 16,
) -> tuple[np.ndarray, np.ndarray]:
    """Product quantization: cluster ``vectors`` [n, d] into ``2**bits`` d-dimensional centroids.

    Returns ``(codebook [2**bits, d] float32, indices [n] uint8)`` with ``codebook[indices]`` the
    clustered vectors. With ``keep_zero`` vectors that are entirely zero (pruned) get entry 0, an
    exact zero vector, and only the others are clustered. Lloyd's iterations from a k-means++-style
    seeded start (deterministic for a given ``seed``); distances are computed ``chunk`` vectors at a
    time, so memory stays O(chunk * 2**bits) whatever n is.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8 for uint8 indices, got {bits}")
    data = np.asarray(vectors, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"vectors must be [n, d], got shape {data.shape}")
    if data.size and not np.isfinite(data).all():
        raise ValueError("values contain NaN or infinity; k-means needs finite weights")
    k = 1 << bits
    nonzero = data.any(axis=1) if keep_zero else np.ones(len(data), bool)
    zero_slot = keep_zero and not nonzero.all()
    clustered = data[nonzero]
    free = k - 1 if zero_slot else k
    centroids = _lloyd_vectors(clustered, free, iterations, seed, chunk)
    indices = np.zeros(len(data), np.uint8)
    if len(clustered):
        assigned = _nearest(clustered, centroids, chunk).astype(np.uint8)
        indices[nonzero] = assigned + 1 if zero_slot else assigned
    rows = [np.zeros((1, data.shape[1]), np.float32)] if zero_slot else []
    codebook = np.concatenate(rows + [centroids.astype(np.float32)]) if rows or len(centroids) else \
        np.zeros((0, data.shape[1]), np.float32)
    if len(codebook) < k:  # fewer vectors than entries: repeat the last so the codebook is full size
        fill = codebook[-1:] if len(codebook) else np.zeros((1, data.shape[1]), np.float32)
        codebook = np.concatenate([codebook, np.repeat(fill, k - len(codebook), axis=0)])
    return codebook, indices


def _nearest(data: np.ndarray, centroids: np.ndarray, chunk: int) -> np.ndarray:
    """Index of the nearest centroid of each row (ties: the lower index)."""
    c = centroids.astype(np.float32)
    norms = (c.astype(np.float64) ** 2).sum(axis=1).astype(np.float32)
    scaled = -2 * c.T
    out = np.empty(len(data), np.int64)
    for start in range(0, len(data), chunk):
        distance = data[start : start + chunk] @ scaled  # |x|^2 is the same for every centroid
        distance += norms
        out[start : start + chunk] = np.argmin(distance, axis=1)
    return out


def _lloyd_vectors(data: np.ndarray, k: int, iterations: int, seed: int, chunk: int) -> np.ndarray:
    if len(data) == 0:
        return np.zeros((0, data.shape[1]))
    unique = np.unique(data, axis=0)
    if len(unique) <= k:  # every distinct vector is its own exact centroid
        return unique.astype(np.float64)
    rng = np.random.default_rng(seed)
    # k-means++ on a sample: spread-out seeds without an O(n k) pass per seed over all the data.
    sample = data[rng.choice(len(data), min(len(data), 64 * k), replace=False)].astype(np.float64)
    centroids = [sample[rng.integers(len(sample))]]
    nearest = ((sample - centroids[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = nearest.sum()
        pick = rng.choice(len(sample), p=nearest / total) if total > 0 else rng.integers(len(sample))
        centroids.append(sample[pick])
        nearest = np.minimum(nearest, ((sample - sample[pick]) ** 2).sum(axis=1))
    centroids = np.array(centroids)
    previous = None
    for _ in range(iterations):
        assigned = _nearest(data, centroids, chunk)
        if previous is not None and np.array_equal(assigned, previous):
            break
        previous = assigned
        counts = np.bincount(assigned, minlength=k)
        sums = np.stack([np.bincount(assigned, weights=data[:, j], minlength=k) for j in range(data.shape[1])], axis=1)
        # An empty cluster keeps its centroid.
        centroids = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centroids)
    return centroids


# --------------------------------------------------------------------------- grids for GPTQ


def uniform_codebook(bits: int) -> np.ndarray:
    """The 2^bits integers ``-(2^(bits-1) - 1) .. 2^(bits-1)`` as float32 (0.0 at index ``2^(bits-1) - 1``).

    With a step per channel and the indices entropy coded, this is entropy-coded uniform
    quantization: at a given coded size it leaves less error than a Lloyd codebook, whose
    equally-likely entries waste little but code at nearly the full ``bits`` (Gish & Pierce).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8 for uint8 indices, got {bits}")
    half = 1 << (bits - 1)
    return np.arange(1 - half, half + 1, dtype=np.float32)


def nearest_entry(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index (uint8) of the nearest codebook entry of each value; ties go to the lower value."""
    order = np.argsort(codebook, kind="stable")
    ordered = codebook[order].astype(np.float64)
    midpoints = (ordered[:-1] + ordered[1:]) / 2
    return order[np.searchsorted(midpoints, values, side="left")].astype(np.uint8)


def gptq_codebook(weight: np.ndarray, prepared, scales: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """GPTQ (Frantar et al.) onto a codebook: indices [K, N] such that ``codebook[idx] * scales``
    approximates ``weight`` [K, N] (in_out) with the least change of ``X @ W`` on the calibration
    inputs. ``prepared`` is ``kernels.gptq.prepare_hessian(X^T X)``; ``scales`` [N] multiply each
    output's entries. Each input row in turn is rounded to its nearest entries and its rounding
    error is moved onto the rows not yet rounded. Exact zeros (pruned weights) stay exactly zero
    when the codebook holds 0.0; the error of the rows around them is still compensated.
    """
    w = np.array(weight, dtype=np.float64, copy=True)
    n_in, n_out = w.shape
    order, _, upper, dead = prepared
    if upper.shape != (n_in, n_in) or scales.shape != (n_out,):
        raise ValueError(f"weight {w.shape}, Hessian {upper.shape} and scales {scales.shape} do not agree")
    zero_at = np.flatnonzero(codebook == 0)
    pruned = (w == 0) if zero_at.size else np.zeros(w.shape, bool)
    w[dead] = 0.0
    w, pruned = w[order], pruned[order]
    safe = np.where(scales != 0, scales, 1.0).astype(np.float64)
    entries = codebook.astype(np.float64)
    indices = np.empty(w.shape, np.uint8)

    def round_row(position: int, rows: np.ndarray) -> np.ndarray:
        index = nearest_entry(rows[0] / safe, codebook)
        if zero_at.size:
            index[pruned[position]] = zero_at[0]
        indices[position] = index
        return entries[index] * scales

    gptq_sweep(w, upper, LAZY_ROWS, round_row)
    restored = np.empty_like(indices)
    restored[order] = indices
    return restored
