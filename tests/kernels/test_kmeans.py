"""1-D k-means: agrees with a brute-force Lloyd, keeps zeros exact, is deterministic."""

import numpy as np
import pytest

from modelpress.kernels.kmeans import kmeans_1d


def _reference_lloyd(values, k, init, iterations=1000):
    """Textbook Lloyd: full distance matrix, argmin (ties to the lower centroid), empty keeps place."""
    v = np.sort(values.astype(np.float64))
    if init == "linear":
        c = np.linspace(v[0], v[-1], k)
    else:
        c = v[((np.arange(k) + 0.5) * v.size / k).astype(np.int64)]
    labels = None
    for _ in range(iterations):
        new = np.argmin(np.abs(v[:, None] - c[None, :]), axis=1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = v[labels == j]
            if members.size:
                c[j] = members.mean()
    return c


@pytest.mark.parametrize("init", ["linear", "density"])
@pytest.mark.parametrize("bits", [2, 3, 5])
def test_matches_brute_force_lloyd(init, bits):
    rng = np.random.default_rng(bits)
    values = np.concatenate([rng.normal(0, 1, 1500), rng.laplace(2, 0.3, 500)]).astype(np.float32)
    codebook, indices = kmeans_1d(values, bits, init=init, keep_zero=False)
    expected = _reference_lloyd(values, 1 << bits, init)
    assert codebook.dtype == np.float32 and codebook.shape == (1 << bits,)
    np.testing.assert_allclose(np.sort(codebook), np.sort(expected), rtol=1e-5, atol=1e-5)
    # Every value points at its nearest codebook entry.
    distance = np.abs(values[:, None] - codebook[None, :])
    assert np.allclose(distance[np.arange(values.size), indices], distance.min(axis=1), atol=1e-6)


def test_zero_is_kept_exact_and_only_nonzeros_are_clustered():
    rng = np.random.default_rng(0)
    weights = rng.normal(0, 0.1, (64, 48)).astype(np.float32)
    weights[rng.random(weights.shape) < 0.8] = 0.0
    codebook, indices = kmeans_1d(weights, 4, keep_zero=True)
    assert indices.shape == weights.shape and indices.dtype == np.uint8
    assert codebook[0] == 0.0
    assert np.array_equal(indices == 0, weights == 0)  # index 0 marks exactly the pruned weights
    restored = codebook[indices]
    assert np.array_equal(restored == 0, weights == 0)
    nonzero = weights[weights != 0]
    expected = _reference_lloyd(nonzero, 15, "linear")
    np.testing.assert_allclose(np.sort(codebook[1:]), np.sort(expected), rtol=1e-5, atol=1e-6)


def test_keep_zero_without_zeros_uses_every_centroid():
    values = np.random.default_rng(1).normal(0, 1, 1000).astype(np.float32)
    codebook, indices = kmeans_1d(values, 3, keep_zero=True)
    assert np.unique(indices).size == 8


def test_deterministic():
    values = np.random.default_rng(2).normal(0, 1, 20_000).astype(np.float32)
    first = kmeans_1d(values, 5, init="density")
    second = kmeans_1d(values.copy(), 5, init="density")
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])


def test_few_distinct_values_are_reproduced_exactly():
    values = np.array([[0.5, -1.25, 0.0], [3.0, 0.5, -1.25]], np.float32)
    codebook, indices = kmeans_1d(values, 2)
    assert np.array_equal(codebook[indices], values)
    assert codebook.shape == (4,)


def test_clustering_reduces_error_with_more_bits():
    values = np.random.default_rng(3).normal(0, 1, 50_000).astype(np.float32)
    errors = [np.mean((kmeans_1d(values, b)[0][kmeans_1d(values, b)[1]] - values) ** 2) for b in (2, 4, 6, 8)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3


def test_empty_and_invalid_input():
    codebook, indices = kmeans_1d(np.zeros((0,), np.float32), 3)
    assert codebook.shape == (8,) and indices.shape == (0,)
    with pytest.raises(ValueError, match="finite"):
        kmeans_1d(np.array([1.0, np.nan], np.float32), 3)
    with pytest.raises(ValueError, match="bits"):
        kmeans_1d(np.ones(4, np.float32), 9)


def test_vector_kmeans_zero_vectors_exact_deterministic_and_improving():
    from modelpress.kernels.kmeans import kmeans_vectors

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 4)).astype(np.float32)
    x[:1000] = 0
    errors = []
    for bits in (2, 4, 6):
        book, idx = kmeans_vectors(x, bits, seed=1)
        assert book.shape == (1 << bits, 4) and idx.dtype == np.uint8 and idx.shape == (3000,)
        assert not book[0].any() and (idx[:1000] == 0).all() and (idx[1000:] != 0).all()
        errors.append(float(np.mean((book[idx] - x) ** 2)))
        again = kmeans_vectors(x, bits, seed=1)
        assert np.array_equal(again[0], book) and np.array_equal(again[1], idx)
    assert errors[0] > errors[1] > errors[2]
    few = np.repeat(rng.normal(size=(5, 3)).astype(np.float32), 40, axis=0)
    book, idx = kmeans_vectors(few, 3)
    assert np.array_equal(book[idx], few)  # fewer distinct vectors than entries: exact
    with pytest.raises(ValueError):
        kmeans_vectors(np.zeros(10, np.float32), 3)
