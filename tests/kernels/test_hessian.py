"""SparseGPT / Wanda kernels against small straightforward references."""

import numpy as np
import pytest
from modelpress.kernels.hessian import (
    correct_input_error,
    reconstruction_error,
    refit_kept,
    sparsegpt_prune,
    wanda_mask,
    wanda_scores,
)
from modelpress.kernels.sparsity import (
    drop_smallest,
    group_mask,
    magnitude_mask,
    nm_mask,
)


def correlated_inputs(rows: int, n_in: int, seed: int = 0) -> np.ndarray:
    """Inputs whose features are strongly correlated and of unequal scale, like real activations."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(n_in, n_in)) * 0.3 + np.eye(n_in)
    scale = np.exp(rng.normal(size=n_in))
    return (rng.normal(size=(rows, n_in)) @ mix) * scale


def reference_obs(w, h, *, sparsity=0.5, n_zero=0, m=0, blocksize=4, percdamp=0.01):
    """SparseGPT spelled out as exact OBS, one input row at a time, [in, out] layout.

    Each step inverts H restricted to the inputs not processed yet (no Cholesky trick): pruning
    row i to q moves the free rows by -(w_i - q) / [H_F^-1]_00 · [H_F^-1]_{:,0}.
    """
    w, h = w.astype(np.float64).copy(), h.astype(np.float64).copy()
    n_in = w.shape[0]
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[dead] = 0
    h += percdamp * np.mean(np.diag(h)) * np.eye(n_in)

    def saliency(j):  # OBS: w² / [H_F^-1]_00 with F = inputs j..end
        return w[j] ** 2 / np.linalg.inv(h[j:, j:])[0, 0]

    pruned = np.zeros(w.shape, bool)
    dropped = 0
    for i in range(n_in):
        if m and i % m == 0:
            scores = np.stack([saliency(j) for j in range(i, i + m)])
            for col in range(w.shape[1]):
                pruned[i + np.argsort(scores[:, col], kind="stable")[:n_zero], col] = True
        elif not m and i % blocksize == 0:
            end = min(i + blocksize, n_in)
            scores = np.stack([saliency(j) for j in range(i, end)])
            count = round(sparsity * end * w.shape[1]) - dropped
            dropped += count
            flat = np.argsort(scores.ravel(), kind="stable")[:count]
            pruned[i:end].ravel()[flat] = True  # i:end is a contiguous view
        h_inv = np.linalg.inv(h[i:, i:])
        target = np.where(pruned[i], 0.0, w[i])
        w[i:] -= np.outer(h_inv[:, 0], (w[i] - target) / h_inv[0, 0])
        w[i] = target
    return w


def small_layer():
    """A [16, 6] weight and the Hessian of 256 correlated inputs."""
    x = correlated_inputs(256, 16)
    w = np.random.default_rng(1).normal(size=(16, 6))
    return w, x.T @ x


@pytest.fixture
def layer():
    return small_layer()


def test_matches_exact_obs_reference_unstructured(layer):
    w, h = layer
    ours = sparsegpt_prune(w, h, layout="in_out", sparsity=0.5, blocksize=4)
    np.testing.assert_allclose(ours, reference_obs(w, h, sparsity=0.5, blocksize=4), atol=1e-9)


def test_matches_exact_obs_reference_n_m(layer):
    w, h = layer
    ours = sparsegpt_prune(w, h, layout="in_out", prunen=2, prunem=4, blocksize=8)
    np.testing.assert_allclose(ours, reference_obs(w, h, n_zero=2, m=4), atol=1e-9)


def test_out_in_layout_is_the_transpose(layer):
    w, h = layer
    a = sparsegpt_prune(w, h, layout="in_out", sparsity=0.6, blocksize=8)
    b = sparsegpt_prune(np.ascontiguousarray(w.T), h, layout="out_in", sparsity=0.6, blocksize=8)
    np.testing.assert_allclose(a, b.T, atol=1e-12)
    with pytest.raises(ValueError, match="Hessian"):
        sparsegpt_prune(w.T, h, layout="in_out")  # [6, 16] read as in=6 does not match H


def test_exact_sparsity_and_n_m_pattern():
    x = correlated_inputs(512, 64)
    h = x.T @ x
    w = np.random.default_rng(2).normal(size=(64, 48)).astype(np.float32)
    pruned = sparsegpt_prune(w, h, layout="in_out", sparsity=0.7, blocksize=16)
    assert pruned.dtype == np.float32
    assert np.count_nonzero(pruned == 0) == round(0.7 * w.size)
    for n_zero, m in ((2, 4), (4, 8)):
        nm = sparsegpt_prune(w, h, layout="in_out", prunen=n_zero, prunem=m, blocksize=20)
        groups = (nm != 0).reshape(64 // m, m, 48).sum(axis=1)  # groups run along the input axis
        assert np.all(groups == m - n_zero)


def test_beats_magnitude_on_output_error():
    x = correlated_inputs(1024, 128, seed=3)
    h = x.T @ x
    w = np.random.default_rng(4).normal(size=(128, 64))
    magnitude = np.where(magnitude_mask(w, 0.5), w, 0)
    sparsegpt = sparsegpt_prune(w, h, layout="in_out", sparsity=0.5)
    assert reconstruction_error(w, sparsegpt, h, layout="in_out") < 0.5 * reconstruction_error(w, magnitude, h, layout="in_out")
    magnitude_24 = np.where(nm_mask(np.abs(w), 2, 4, axis=0), w, 0)
    sparsegpt_24 = sparsegpt_prune(w, h, layout="in_out", prunen=2, prunem=4)
    assert reconstruction_error(w, sparsegpt_24, h, layout="in_out") < 0.5 * reconstruction_error(w, magnitude_24, h, layout="in_out")
    # the error from H alone equals the one measured on the outputs
    direct = np.sum((x @ w - x @ sparsegpt) ** 2) / np.sum((x @ w) ** 2)
    assert reconstruction_error(w, sparsegpt, h, layout="in_out") == pytest.approx(direct, rel=1e-9)


def test_dead_inputs_and_singular_hessian():
    x = correlated_inputs(8, 32)  # fewer rows than inputs: H is singular
    x[:, 5] = 0  # an input never seen nonzero
    w = np.random.default_rng(5).normal(size=(32, 8))
    pruned = sparsegpt_prune(w, x.T @ x, layout="in_out", sparsity=0.5, percdamp=0.0)
    assert np.all(np.isfinite(pruned)) and np.all(pruned[5] == 0)
    assert np.count_nonzero(pruned == 0) == w.size // 2


def test_deterministic_and_dtype_preserved(layer):
    w, h = layer
    w16 = w.astype(np.float16)
    first = sparsegpt_prune(w16, h, layout="in_out", sparsity=0.5)
    second = sparsegpt_prune(w16.copy(), h.copy(), layout="in_out", sparsity=0.5)
    assert first.dtype == np.float16 and first.tobytes() == second.tobytes()


def test_wanda_scores_and_masks():
    w = np.array([[1.0, -4.0], [-2.0, 1.0], [3.0, 0.5], [0.5, 2.0]])  # [in=4, out=2]
    norms = np.array([1.0, 10.0, 0.1, 1.0])
    np.testing.assert_allclose(wanda_scores(w, norms, layout="in_out"), np.abs(w) * norms[:, None])
    np.testing.assert_allclose(wanda_scores(w.T, norms, layout="out_in"), (np.abs(w) * norms[:, None]).T)
    keep = wanda_mask(w, norms, layout="in_out", sparsity=0.5)
    # per output (column): scores [1, 20, .3, .5] and [4, 10, .05, 2]
    assert keep[:, 0].tolist() == [True, True, False, False]
    assert keep[:, 1].tolist() == [True, True, False, False]
    assert np.array_equal(wanda_mask(w.T, norms, layout="out_in", sparsity=0.5), keep.T)
    keep24 = wanda_mask(w, norms, layout="in_out", n=2, m=4)
    assert np.array_equal(keep24, keep)
    with pytest.raises(ValueError, match="col_norms"):
        wanda_scores(w, norms[:3], layout="in_out")


def test_sparsity_helpers():
    scores = np.array([3.0, 1.0, 1.0, 2.0, 0.0, 5.0, 5.0, 4.0])
    assert drop_smallest(scores, 3).tolist() == [True, False, False, True, False, True, True, True]
    assert nm_mask(scores, 2, 4).tolist() == [True, False, False, True, False, True, True, False]
    assert nm_mask(scores.reshape(2, 4), 1, 2, axis=1).tolist() == [[True, False, False, True], [False, True, True, False]]
    assert group_mask(scores.reshape(2, 4), 0.5, axis=1).tolist() == [[True, False, False, True], [False, True, True, False]]
    assert np.array_equal(nm_mask(np.ones((8, 3)), 2, 4, axis=0).sum(axis=0), [4, 4, 4])
    with pytest.raises(ValueError, match="multiple"):
        nm_mask(np.ones(6), 2, 4)


def test_upstream_correction_is_the_least_squares_fit_to_the_original_outputs():
    x = correlated_inputs(400, 12, seed=6)
    x_hat = x + np.random.default_rng(7).normal(size=x.shape) * 0.3  # inputs after upstream pruning
    w = np.random.default_rng(8).normal(size=(12, 5))
    h, cross = x_hat.T @ x_hat, x_hat.T @ x
    target = correct_input_error(w, h, cross, layout="in_out", percdamp=1e-9)
    np.testing.assert_allclose(target, np.linalg.lstsq(x_hat, x @ w, rcond=None)[0], atol=1e-6)
    np.testing.assert_allclose(correct_input_error(w.T, h, cross, layout="out_in", percdamp=1e-9), target.T, atol=1e-6)
    assert np.array_equal(correct_input_error(w, h, h, layout="in_out"), w)  # nothing upstream: unchanged


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_refit_is_the_least_squares_optimum_of_the_mask(layout):
    """Per output, the kept weights solve the damped normal equations of ||X(w - w')||² exactly, so the
    output error is never above SparseGPT's own and the mask (and sparsity) is unchanged."""
    x = correlated_inputs(300, 32)
    x[:, 5] = 0.0  # a dead input
    w = np.random.default_rng(4).normal(size=(32, 12))
    h = x.T @ x / 300
    pruned = sparsegpt_prune(w, h, layout="in_out", sparsity=0.5)
    given = (w, pruned) if layout == "in_out" else (w.T, pruned.T)
    refit = refit_kept(*given, h, layout=layout, percdamp=1e-9)
    refit = refit if layout == "in_out" else refit.T
    assert np.array_equal(refit != 0, pruned != 0)
    for j in range(12):
        kept = np.flatnonzero(pruned[:, j])
        best, *_ = np.linalg.lstsq(x[:, kept], x @ w[:, j], rcond=None)
        np.testing.assert_allclose(refit[kept, j], best, rtol=1e-5, atol=1e-7)
    before = reconstruction_error(w, pruned, h, layout="in_out")
    after = reconstruction_error(w, refit, h, layout="in_out")
    assert after < 0.9 * before
    with pytest.raises(ValueError, match="Hessian"):
        refit_kept(w, pruned, h[:8, :8], layout="in_out")


def test_drop_smallest_is_a_stable_sort_cut():
    """The linear-time selection drops exactly what a stable sort's first ``count`` entries are, with
    ties (and NaNs, which sort last) taken by position."""
    rng = np.random.default_rng(0)
    for trial in range(2000):
        scores = rng.integers(0, 5, size=int(rng.integers(1, 30))).astype(float)
        scores[rng.random(scores.size) < 0.15 * (trial % 3)] = [np.nan, np.inf, -np.inf][trial % 3]
        count = int(rng.integers(-1, scores.size + 2))
        by_sort = np.ones(scores.size, dtype=bool)
        by_sort[np.argsort(scores, kind="stable")[: max(count, 0)]] = False
        assert np.array_equal(drop_smallest(scores, count), by_sort), (scores, count)
