"""Low-rank kernels against direct numpy references."""

import numpy as np
import pytest
from modelpress.kernels import lowrank


def weight_with_spectrum(k, n, singular, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(k, len(singular))))
    v, _ = np.linalg.qr(rng.normal(size=(n, len(singular))))
    return (u * np.asarray(singular)) @ v.T


def test_full_rank_is_exact_and_factors_are_balanced():
    w = np.random.default_rng(0).normal(size=(48, 32))
    spec = lowrank.spectrum(w)
    a, b = lowrank.factors(spec, 32)
    assert a.shape == (48, 32) and b.shape == (32, 32)
    np.testing.assert_allclose(a @ b, w, atol=1e-10)
    # √S on both sides: the columns of A and the rows of B have the same norms.
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1), rtol=1e-10)


def test_truncation_is_the_eckart_young_optimum():
    w = np.random.default_rng(1).normal(size=(40, 30))
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    a, b = lowrank.factors(lowrank.spectrum(w), 5)
    np.testing.assert_allclose(a @ b, (u[:, :5] * s[:5]) @ vt[:5], atol=1e-10)
    assert np.linalg.norm(w - a @ b) ** 2 == pytest.approx(np.sum(s[5:] ** 2))


def test_energy_and_ratio_ranks():
    spec = lowrank.spectrum(weight_with_spectrum(64, 64, [4, 3, 2, 1] + [0.01] * 12))
    total = 16 + 9 + 4 + 1 + 12 * 1e-4
    assert lowrank.rank_for_energy(spec, 16 / total) == 1  # exactly reached: no extra value
    assert lowrank.rank_for_energy(spec, 0.9) == 3  # (16 + 9 + 4) / 30.0012 = 0.967; two give 0.833
    assert lowrank.rank_for_energy(spec, 0.999) == 4
    assert lowrank.rank_for_energy(spec, 1.0) == 16
    assert lowrank.rank_for_ratio(300, 100, 0.5) == 37  # 0.5·30000 / 400 = 37.5
    assert lowrank.rank_for_ratio(64, 64, 0.01) == 1  # never zero
    assert lowrank.round_rank(37, 8, up=False, limit=100) == 32
    assert lowrank.round_rank(37, 8, up=True, limit=100) == 40
    assert lowrank.round_rank(3, 8, up=False, limit=100) == 8  # one step at least
    assert lowrank.round_rank(99, 8, up=True, limit=100) == 100  # never above min(K, N)
    assert lowrank.saves_parameters(300, 100, 74) and not lowrank.saves_parameters(300, 100, 75)


def test_activation_aware_fits_outputs_better_and_is_exact_at_full_rank():
    rng = np.random.default_rng(2)
    k, n, rows = 32, 24, 500
    # Inputs with very unequal feature scales, as real activations have (outlier features).
    x = rng.normal(size=(rows, k)) * np.geomspace(10, 0.01, k)
    w = rng.normal(size=(k, n))
    gram = x.T @ x / rows
    plain = lowrank.factors(lowrank.spectrum(w), 6)
    aware = lowrank.factors(lowrank.spectrum(w, gram), 6)

    def output_error(pair):
        return np.linalg.norm(x @ w - x @ pair[0] @ pair[1]) ** 2 / np.linalg.norm(x @ w) ** 2

    assert output_error(aware) < 0.2 * output_error(plain)
    # The reference: the best rank-6 fit of XW in the column space of X, through X's own SVD.
    ux = np.linalg.svd(x, full_matrices=False)[0]
    uy, sy, vyt = np.linalg.svd(ux.T @ x @ w, full_matrices=False)
    best = np.linalg.norm(x @ w - ux @ (uy[:, :6] * sy[:6]) @ vyt[:6]) ** 2 / np.linalg.norm(x @ w) ** 2
    assert output_error(aware) == pytest.approx(best, rel=1e-3)
    full = lowrank.factors(lowrank.spectrum(w, gram), n)
    np.testing.assert_allclose(full[0] @ full[1], w, atol=1e-8)


def test_unseen_inputs_keep_a_weight_space_fit():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 16))
    x[:, 8:] = 0.0  # half the inputs never active: a singular Gram
    w = rng.normal(size=(16, 16))
    a, b = lowrank.factors(lowrank.spectrum(w, x.T @ x / 200), 16)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    np.testing.assert_allclose(a @ b, w, atol=1e-8)


def test_bad_arguments():
    spec = lowrank.spectrum(np.eye(4))
    with pytest.raises(ValueError, match="rank must be in"):
        lowrank.factors(spec, 5)
    with pytest.raises(ValueError, match="energy"):
        lowrank.rank_for_energy(spec, 0.0)
    with pytest.raises(ValueError, match="Gram"):
        lowrank.spectrum(np.eye(4), np.eye(3))
    with pytest.raises(ValueError, match="2-D"):
        lowrank.spectrum(np.ones((2, 2, 2)))
