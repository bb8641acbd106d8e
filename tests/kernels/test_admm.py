"""ADMM pruning kernel against a spelled-out reference, and against SparseGPT on output error."""

import numpy as np
import pytest
from modelpress.kernels.hessian import admm_prune, reconstruction_error, refit_kept, sparsegpt_prune
from test_hessian import correlated_inputs, small_layer


def reference_admm(w, h, *, sparsity, iterations, ramp, rho, percdamp=0.01):
    """The iteration written out entry by entry: scale the inputs to unit diag(H), then a least-squares
    step, a projection keeping the largest |V + U| of the layer, a dual step."""
    h = h + percdamp * np.mean(np.diag(h)) * np.eye(len(h))
    d = np.sqrt(np.diag(h))
    hn, wn = h / np.outer(d, d), w * d[:, None]
    v, u = wn.copy(), np.zeros_like(wn)
    for i in range(iterations):
        drop = round((1 - (1 - min(i + 1, ramp) / ramp) ** 3) * sparsity * w.size)
        z = (v + u).ravel().copy()
        z[sorted(range(z.size), key=lambda k: (abs(z[k]), k))[:drop]] = 0.0
        z = z.reshape(w.shape)
        u = u + v - z
        v = np.linalg.solve(hn + rho * np.eye(len(h)), hn @ wn + rho * (z - u))
    return z / d[:, None]


def test_matches_the_reference():
    w, h = small_layer()
    ours = admm_prune(w, h, layout="in_out", sparsity=0.5, iterations=30, ramp=20, rho=0.5)
    np.testing.assert_allclose(ours, reference_admm(w, h, sparsity=0.5, iterations=30, ramp=20, rho=0.5), atol=1e-9)
    transposed = admm_prune(np.ascontiguousarray(w.T), h, layout="out_in", sparsity=0.5, iterations=30, ramp=20)
    np.testing.assert_allclose(transposed.T, ours, atol=1e-12)


def test_exact_sparsity_n_m_dead_inputs_and_dtype():
    x = correlated_inputs(512, 64)
    x[:, 7] = 0.0  # an input never seen nonzero: its weights go first
    h = x.T @ x
    w = np.random.default_rng(2).normal(size=(64, 48)).astype(np.float32)
    pruned = admm_prune(w, h, layout="in_out", sparsity=0.7)
    assert pruned.dtype == np.float32 and np.all(pruned[7] == 0)
    assert np.count_nonzero(pruned == 0) == round(0.7 * w.size)
    for n_zero, m in ((2, 4), (4, 8)):
        nm = admm_prune(w, h, layout="in_out", prunen=n_zero, prunem=m)
        assert np.all((nm != 0).reshape(64 // m, m, 48).sum(axis=1) <= m - n_zero)
        assert np.count_nonzero(nm == 0) == w.size * n_zero // m
    again = admm_prune(w.copy(), h.copy(), layout="in_out", sparsity=0.7)
    assert again.tobytes() == pruned.tobytes()
    with pytest.raises(ValueError, match="ramp"):
        admm_prune(w, h, layout="in_out", iterations=10, ramp=20)
    with pytest.raises(ValueError, match="multiple"):
        admm_prune(w[:62], h[:62, :62], layout="in_out", prunen=2, prunem=4)


@pytest.mark.parametrize("n_zero, m", [(0, 0), (2, 4)])
def test_lower_output_error_than_sparsegpt(n_zero, m):
    """The point of the solver: both masks refit exactly, ADMM's mask loses less of the output."""
    x = correlated_inputs(1024, 96, seed=3)
    h = x.T @ x
    w = np.random.default_rng(4).normal(size=(96, 64))
    errors = []
    for prune in (sparsegpt_prune, admm_prune):
        pruned = refit_kept(w, prune(w, h, layout="in_out", sparsity=0.5, prunen=n_zero, prunem=m), h, layout="in_out")
        errors.append(reconstruction_error(w, pruned, h, layout="in_out"))
    assert errors[1] < 0.95 * errors[0], errors


def test_no_sparsity_keeps_the_layer():
    x = correlated_inputs(300, 12)
    w = np.random.default_rng(5).normal(size=(12, 4))
    dense = admm_prune(w, x.T @ x, layout="in_out", sparsity=0.0, percdamp=1e-9)
    np.testing.assert_allclose(dense, w, rtol=1e-6, atol=1e-6)
