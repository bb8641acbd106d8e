"""Low-rank factorization of weight matrices (numpy, no ONNX).

A linear layer ``y = x @ W`` with W [K, N] becomes ``y = (x @ A) @ B`` with A [K, r] and B [r, N],
which stores ``r·(K + N)`` numbers instead of ``K·N`` — a saving only while ``r < K·N / (K + N)``.

* ``method="svd"``: the truncated SVD ``W = U S Vᵀ`` gives ``A = U_r √S_r``, ``B = √S_r V_rᵀ``
  (the square root splits the scale evenly, so neither factor is badly conditioned). It minimizes
  ``||W - AB||_F``, which treats every input direction as equally important.
* activation-aware (a calibration Gram ``G = XᵀX / rows`` [K, K] given): minimizes the layer's
  output error ``||XW - XAB||_F`` instead (SVD-LLM, Wang et al. 2024; ASVD, Yuan et al. 2023). With
  ``G = Q Λ Qᵀ`` and the whitening ``S = Q Λ^½`` (``SSᵀ = G``), the SVD of ``SᵀW = U Σ Vᵀ`` truncated
  to r is the best rank-r fit of the outputs, and ``A = S⁻ᵀ U_r Σ_r^½``, ``B = Σ_r^½ V_rᵀ``.
  Eigenvalues below ``damp · mean(Λ)`` are raised to it, so inputs never seen in the calibration
  data (Λ = 0) keep a weight-space fit instead of an arbitrary one; at full rank the product is W
  exactly, whatever the damping.

Ranks: ``energy`` keeps the fewest singular values whose squares reach that share of the total
(output energy in the activation-aware case); ``ratio`` keeps at most that share of the layer's
parameters. Both are rounded to a multiple of ``round_to`` (SIMD-friendly shapes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Spectrum:
    """A weight's (possibly whitened) SVD, kept so that several ranks can be tried cheaply."""

    u: np.ndarray  # [K, m], already multiplied by the inverse whitening when activation-aware
    s: np.ndarray  # [m] singular values, descending
    vt: np.ndarray  # [m, N]

    @property
    def energy(self) -> np.ndarray:
        """Cumulative share of ``sum(s²)`` kept by the first 1, 2, ... singular values."""
        squares = np.cumsum(self.s.astype(np.float64) ** 2)
        return squares / squares[-1] if squares[-1] > 0 else np.ones_like(squares)


def spectrum(weight: np.ndarray, gram: np.ndarray | None = None, damp: float = 0.01) -> Spectrum:
    """SVD of W [K, N] (float64), whitened by ``gram`` [K, K] when given (see the module docstring)."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight [K, N], got shape {w.shape}")
    if gram is None:
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        return Spectrum(u, s, vt)
    g = np.asarray(gram, dtype=np.float64)
    if g.shape != (w.shape[0], w.shape[0]):
        raise ValueError(f"the Gram matrix is {g.shape}, the weight has {w.shape[0]} inputs")
    eigenvalues, q = np.linalg.eigh((g + g.T) / 2)
    floor = damp * max(float(np.mean(np.abs(eigenvalues))), 1e-30)
    root = np.sqrt(np.maximum(eigenvalues, floor))
    u, s, vt = np.linalg.svd((root[:, None] * q.T) @ w, full_matrices=False)  # Sᵀ W, S = Q Λ^½
    return Spectrum(q @ (u / root[:, None]), s, vt)  # S⁻ᵀ = Q Λ^-½


def factors(spec: Spectrum, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(A [K, r], B [r, N]) in float64 with ``A @ B`` the rank-``rank`` approximation."""
    if not 1 <= rank <= spec.s.size:
        raise ValueError(f"rank must be in [1, {spec.s.size}], got {rank}")
    root = np.sqrt(spec.s[:rank])
    return spec.u[:, :rank] * root, root[:, None] * spec.vt[:rank]


def rank_for_energy(spec: Spectrum, energy: float) -> int:
    """The fewest singular values whose squared sum reaches ``energy`` of the total."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    kept = spec.energy
    return int(min(np.searchsorted(kept, energy - 1e-12) + 1, kept.size))


def rank_for_ratio(k: int, n: int, ratio: float) -> int:
    """The largest rank whose factors hold at most ``ratio`` of the ``k·n`` parameters (at least 1)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return max(1, int(np.floor(ratio * k * n / (k + n) + 1e-9)))


def round_rank(rank: int, round_to: int, *, up: bool, limit: int) -> int:
    """``rank`` rounded to a multiple of ``round_to`` (up for an accuracy floor, down for a budget),
    kept within [1, limit]. Rounding down never goes below one step."""
    if round_to > 1:
        steps = -(-rank // round_to) if up else rank // round_to
        rank = max(1, steps) * round_to
    return max(1, min(rank, limit))


def saves_parameters(k: int, n: int, rank: int) -> bool:
    return rank * (k + n) < k * n

