"""Wanda pruning: magnitude weighted by the activations it multiplies, from calibration data.

before: float MatMul / Gemm weight matrices and calibration feeds (``--data``).
after:  in every output the weights with the lowest ``|w_ij| · ||x_j||₂`` are set to exactly 0 — the
``sparsity`` fraction of each output's inputs, or N:M along the input dimension — and the survivors
are left as they were (Wanda, Sun et al. 2023: no weight update, so it is cheaper than SparseGPT and
needs only per-feature norms, not a Hessian), all from one run of the original model unless
``rounds`` says otherwise. Fallbacks and stats as for ``sparsegpt``.

L1 and L2 criteria are not separate passes: for single weights both rank by ``|w|``, which is the
``magnitude`` pass; they differ only for structured (row / channel) pruning.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from modelpress.compressors.calibration import ColumnNorms, Reduction
from modelpress.compressors.prune.sparsegpt import LayerwiseConfig, LayerwisePrune
from modelpress.kernels.hessian import wanda_mask
from pydantic import Field


class WandaConfig(LayerwiseConfig):
    # One capture from the original model by default: on the digits MLP (70 % sparsity) sequential
    # rounds lose 5 pp of accuracy, and on MiniLM they cost 13x the time for no gain.
    rounds: Literal["sequential"] | Annotated[int, Field(ge=1)] = 1


class WandaPrune(LayerwisePrune):
    name = "wanda"
    config_cls = WandaConfig
    summary = "prune by |weight| x input activation norm from calibration data (Wanda)"

    def reduction(self, transposed: bool) -> Reduction:
        return ColumnNorms(transposed)

    def solve(self, layer, weights, stats):
        config: WandaConfig = self.config
        # A shared weight sees the rows of every use: squared norms add up.
        norms = np.sqrt(sum(s.norms**2 for s in stats))
        n, m = config.nm or (0, 0)
        keep = wanda_mask(weights, norms, layout=layer.layout, sparsity=self.layer_sparsity(layer), n=n, m=m)
        return np.where(keep, weights, np.zeros((), weights.dtype)), {}
