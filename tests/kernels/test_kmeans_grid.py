"""Grids for GPTQ weight sharing: the uniform codebook, nearest-entry rounding and GPTQ onto a codebook."""

import numpy as np
import pytest

from modelpress.kernels.gptq import prepare_hessian
from modelpress.kernels.hessian import reconstruction_error
from modelpress.kernels.kmeans import gptq_codebook, kmeans_1d, nearest_entry, uniform_codebook


def test_uniform_codebook_is_the_integers_with_an_exact_zero():
    book = uniform_codebook(4)
    assert book.dtype == np.float32
    assert book.tolist() == list(range(-7, 9))
    assert book[7] == 0.0
    with pytest.raises(ValueError, match="bits"):
        uniform_codebook(9)


def test_nearest_entry_on_an_unsorted_codebook():
    book = np.array([0.0, -1.0, 2.0, 0.5], np.float32)  # kmeans_1d puts the zero entry first
    values = np.array([-3.0, -0.6, -0.4, 0.2, 0.25, 0.3, 1.2, 1.3, 9.0])
    got = nearest_entry(values, book)
    assert got.dtype == np.uint8
    assert book[got].tolist() == [-1.0, -1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 2.0, 2.0]  # 0.25: tie goes lower


def _layer(seed=0, rows=2048, k=48, n=24):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(k, k)) * 0.5 + np.eye(k)  # correlated inputs: where GPTQ beats rounding
    x = rng.normal(size=(rows, k)) @ mix
    w = rng.normal(0, 0.3, (k, n))
    return x, w, x.T @ x / rows


def test_gptq_onto_a_uniform_grid_beats_rounding_to_nearest():
    _, w, h = _layer()
    scales = np.sqrt(np.mean(w**2, axis=0)) * 0.5  # step 0.5 RMS per output column
    book = uniform_codebook(8)
    idx = gptq_codebook(w, prepare_hessian(h, 0.01, act_order=True), scales, book)
    gptq = book[idx] * scales
    nearest = book[nearest_entry(w / scales, book)] * scales
    e_gptq = reconstruction_error(w, gptq, h, layout="in_out")
    e_nearest = reconstruction_error(w, nearest, h, layout="in_out")
    assert e_gptq < 0.7 * e_nearest, (e_gptq, e_nearest)
    assert np.array_equal(idx, gptq_codebook(w, prepare_hessian(h, 0.01, act_order=True), scales, book))


def test_gptq_keeps_pruned_zeros_exact_on_a_kmeans_codebook():
    _, w, h = _layer(1)
    w[np.random.default_rng(2).random(w.shape) < 0.5] = 0.0
    book, _ = kmeans_1d(w, 3)  # entry 0 is the exact zero
    idx = gptq_codebook(w, prepare_hessian(h), np.ones(w.shape[1]), book)
    restored = book[idx]
    assert np.all(restored[w == 0] == 0.0)
    assert reconstruction_error(w, restored, h, layout="in_out") < reconstruction_error(w, book[nearest_entry(w, book)], h, layout="in_out")


def test_gptq_codebook_rejects_mismatched_shapes():
    _, w, h = _layer()
    with pytest.raises(ValueError, match="do not agree"):
        gptq_codebook(w, prepare_hessian(h), np.ones(w.shape[1] + 1), uniform_codebook(4))
