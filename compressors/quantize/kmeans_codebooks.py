"""Per-tensor codebooks of the ``kmeans`` pass (Lloyd k-means): scalar or product quantization,
fixed bits or the fewest bits whose error stays under ``max_relative_error``, one codebook per
group of output channels (indices stay local to their group; ``group_offsets`` makes them global).

before: one float weight or vector (numpy), the pass config and its seed.
after:  ``(bits, codebook, indices, mse)``, ``codebook`` in the weight's dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from modelpress.compressors.model import output_channel_axis
from modelpress.kernels.kmeans import kmeans_1d, kmeans_vectors

if TYPE_CHECKING:  # the pass module imports this one
    from modelpress.compressors.quantize.kmeans import KMeansConfig

# A vector's codebook (2^b floats) must stay well below its own size to be worth it.
VECTOR_CODEBOOK_SHARE = 4


def choose_bits(weights: np.ndarray, groups: int, axis: int | None, size: int, config: KMeansConfig, seed: int):
    """(bits, codebook, indices, mse): fixed ``bits``, or the fewest bits meeting the error bound.
    ``size`` > 1: product quantization of sub-vectors of that many consecutive weights."""
    top = config.bits
    if weights.ndim < 2:  # a vector's codebook must stay well below the vector itself
        top = max(1, min(top, int(np.log2(max(2, weights.size // VECTOR_CODEBOOK_SHARE)))))
    low = top if config.min_bits is None else min(config.min_bits, top)
    wide = weights.astype(np.float64)
    nonzero = wide[wide != 0]
    scale = float(np.mean(nonzero**2)) if nonzero.size else 0.0
    for bits in range(low, top + 1):
        if size > 1:
            codebook, flat = kmeans_vectors(weights.reshape(-1, size), bits, keep_zero=config.keep_zero, seed=seed)
            indices = flat.reshape(weights.shape[:-1] + (weights.shape[-1] // size,))
            codebook = codebook.astype(weights.dtype)
            restored = codebook[indices.astype(np.int64)].reshape(weights.shape).astype(np.float64)
        else:
            codebook, indices = cluster(weights, groups, axis, bits, config)
            codebook = codebook.astype(weights.dtype)  # fp16/bf16 weights keep their dtype
            offsets = group_offsets(weights.shape, groups, axis, 1 << bits)
            restored = codebook[indices.astype(np.int64) + offsets].astype(np.float64)
        mse = float(np.mean((restored - wide) ** 2)) if wide.size else 0.0
        if bits == top or mse <= config.max_relative_error * scale:
            return bits, codebook, indices, mse
    raise AssertionError("unreachable: the loop returns at bits == top")


def cluster(weights: np.ndarray, groups: int, axis: int | None, bits: int,
            config: KMeansConfig) -> tuple[np.ndarray, np.ndarray]:
    """One codebook per group of output channels; codebooks are concatenated, indices are local."""
    run = lambda w: kmeans_1d(w, bits, config.init, config.iterations, config.keep_zero)  # noqa: E731
    if groups == 1:
        return run(weights)
    channels = weights.shape[axis]
    moved = np.moveaxis(weights, axis, 0)
    indices = np.empty(moved.shape, np.uint8)
    books = []
    bounds = np.arange(groups + 1) * channels // groups
    for start, stop in zip(bounds[:-1], bounds[1:]):
        book, indices[start:stop] = run(moved[start:stop])
        books.append(book)
    return np.concatenate(books), np.moveaxis(indices, 0, axis)


def channel_axis(value: ir.Value) -> int | None:
    """The output-channel axis of a weight, agreed by all its consumers (None if they disagree)."""
    rank = len(value.shape)
    axes = {output_channel_axis(use.node, rank) for use in value.uses()}
    return axes.pop() if len(axes) == 1 else None


def group_offsets(shape: tuple[int, ...], groups: int, axis: int | None, k: int) -> np.ndarray:
    """Per-channel start of its group's codebook, shaped to broadcast against the indices."""
    if groups == 1:
        return np.zeros((1,) * len(shape), np.int64)
    channels = shape[axis]
    bounds = np.arange(groups + 1) * channels // groups
    group_of = np.searchsorted(bounds, np.arange(channels), side="right") - 1
    view = [1] * len(shape)
    view[axis] = channels
    return (group_of * k).reshape(view)
