"""Unstructured magnitude pruning.

before: float weight matrices of MatMul / Gemm / Conv (main graph and subgraphs).
after:  the same tensors with the smallest-magnitude entries set to exactly 0 — per tensor
(``scope: layer``) or with one threshold across all of them (``scope: global``). Biases, norms and
tensors below ``min_elements`` are left alone, and the stats say which and why.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from modelpress.compressors.pipeline import Pass, PassResult
from modelpress.compressors.selection import WeightFilterConfig, select_weights
from modelpress.kernels.sparsity import global_threshold, magnitude_mask, threshold_mask


class MagnitudeConfig(WeightFilterConfig):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of weights set to zero")
    scope: Literal["layer", "global"] = "layer"
    op_types: tuple[Literal["MatMul", "Gemm", "Conv", "ConvTranspose"], ...] = ("MatMul", "Gemm", "Conv", "ConvTranspose")


class MagnitudePrune(Pass):
    name = "magnitude"
    stage = "prune"
    config_cls = MagnitudeConfig
    summary = "unstructured magnitude pruning (per layer or global threshold)"

    def call(self, model: ir.Model) -> PassResult:
        config: MagnitudeConfig = self.config
        candidates, skipped = select_weights(model, set(config.op_types), config)

        if config.scope == "global" and candidates:
            threshold = global_threshold([np.abs(v.const_value.numpy()) for v in candidates], config.sparsity)
            mask_of = lambda w: threshold_mask(w, threshold)  # noqa: E731
        else:
            mask_of = lambda w: magnitude_mask(w, config.sparsity)  # noqa: E731

        pruned, total, zeros = {}, 0, 0
        for index, value in enumerate(candidates):
            self.context.progress("magnitude pruning", index, len(candidates))
            weights = value.const_value.numpy()
            new = np.where(mask_of(weights), weights, np.zeros((), weights.dtype)).astype(weights.dtype)
            value.const_value = ir.Tensor(new, name=value.name)
            count = int(new.size - np.count_nonzero(new))
            pruned[value.name] = round(count / new.size, 4)
            total += new.size
            zeros += count
        stats = {
            "tensors_pruned": len(pruned),
            "sparsity": round(zeros / total, 4) if total else 0.0,
            "per_tensor": pruned,
            "skipped": skipped,
        }
        return PassResult(model, modified=bool(pruned), stats=stats)
