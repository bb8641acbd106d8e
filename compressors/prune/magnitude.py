"""Unstructured magnitude pruning.

before: float weight matrices of MatMul / Gemm / Conv (main graph and subgraphs); the W and R of
LSTM / GRU / RNN when ``op_types`` names them.
after:  the same tensors with the smallest-magnitude entries set to exactly 0 — per tensor
(``scope: layer``) or with one threshold across all of them (``scope: global``). Biases, norms and
tensors below ``min_elements`` are left alone, and the stats say which and why.

``allocation: sensitivity`` (with ``scope: layer``) gives each tensor its own sparsity: every
main-graph weight is pruned alone at each level of a grid, the change of the model's first
output on the calibration data is measured in ORT (squared error relative to the output's norm;
on the digits models it allocated better than KL of the class scores),
and the levels are chosen to reach ``sparsity`` over all selected weights at the least summed
change (greedy along each tensor's lower convex hull, the last step interpolated so the overall
sparsity is exact). The change is measured before any recovery, so it is a proxy: the recipe's
gate, measured after recovery, has the last word. Redundant layers (a first layer fed by always-blank pixels, a big FC) are
pruned far beyond the mean and sensitive ones (a small first conv, a classifier) much less.
One ORT session serves every trial: the weights are fed as inputs that override initializers.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from modelpress.compressors.model import EXTERNAL_DATA_THRESHOLD, iter_weights
from modelpress.compressors.padding import compact_feeds
from modelpress.compressors.pipeline import Pass, PassResult
from modelpress.compressors.prune.allocation import allocate_levels, measure_curves
from modelpress.compressors.selection import WeightFilterConfig, select_weights
from modelpress.kernels.sparsity import global_threshold, magnitude_mask, threshold_mask


# Sparsity levels each tensor is tried at under ``allocation: sensitivity``.
SENSITIVITY_GRID = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
# Calibration rows used to measure sensitivity: enough for a stable mean, cheap on large models.
SENSITIVITY_ROWS = 512


class MagnitudeConfig(WeightFilterConfig):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of weights set to zero (the mean under "
                                                              "allocation: sensitivity)")
    scope: Literal["layer", "global"] = "layer"
    allocation: Literal["uniform", "sensitivity"] = Field(
        "uniform", description="sensitivity: per-tensor sparsity from the measured output change (uses --data)")
    max_layer_sparsity: float = Field(0.99, gt=0.0, lt=1.0, description="cap of any one tensor under sensitivity")
    padding_mask: str | None = Field(
        "attention_mask", description="model input whose zeros mark padding: left out of the sensitivity "
        "measurement (and not computed: samples regrouped by length and cut)")
    # LSTM / GRU / RNN W and R on request only: a recurrent weight's error compounds over the time steps.
    op_types: tuple[Literal["MatMul", "Gemm", "Conv", "ConvTranspose", "LSTM", "GRU", "RNN"], ...] = (
        "MatMul", "Gemm", "Conv", "ConvTranspose")


class MagnitudePrune(Pass):
    name = "magnitude"
    stage = "prune"
    config_cls = MagnitudeConfig
    summary = "unstructured magnitude pruning (per layer or global threshold)"

    def call(self, model: ir.Model) -> PassResult:
        config: MagnitudeConfig = self.config
        candidates, skipped = select_weights(model, set(config.op_types), config)

        notes: list[str] = []
        targets: dict[str, float] = {}
        sensitivity: dict[str, dict[str, float]] = {}
        if config.allocation == "sensitivity" and candidates:
            if config.scope == "global":
                notes.append("allocation: sensitivity applies to scope: layer; global threshold used")
            elif not self.context.calibration:
                notes.append("allocation: sensitivity needs --data; every tensor pruned to the mean sparsity")
            elif sum(v.const_value.nbytes for _, v in iter_weights(model)) > EXTERNAL_DATA_THRESHOLD:
                # The trial session is built from one in-memory protobuf, which stops at 2 GiB.
                notes.append("allocation: sensitivity skipped: the model is too large for an in-memory "
                             "trial session; every tensor pruned to the mean sparsity")
            else:
                targets, sensitivity = self._allocate(model, candidates, notes)

        if config.scope == "global" and candidates:
            threshold = global_threshold([np.abs(v.const_value.numpy()) for v in candidates], config.sparsity)
            mask_for = lambda value, w: threshold_mask(w, threshold)  # noqa: E731
        else:
            mask_for = lambda value, w: magnitude_mask(w, targets.get(value.name, config.sparsity))  # noqa: E731

        pruned, total, zeros = {}, 0, 0
        for index, value in enumerate(candidates):
            self.context.progress("magnitude pruning", index, len(candidates))
            weights = value.const_value.numpy()
            new = np.where(mask_for(value, weights), weights, np.zeros((), weights.dtype)).astype(weights.dtype)
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
        if config.allocation == "sensitivity":
            stats["sensitivity"] = sensitivity
            stats["notes"] = notes
        return PassResult(model, modified=bool(pruned), stats=stats)

    def _allocate(self, model: ir.Model, candidates: list[ir.Value], notes: list[str]):
        """(tensor -> sparsity, tensor -> {level: relative output change}) for the main-graph weights."""
        config: MagnitudeConfig = self.config
        measurable = [v for v in candidates if v.graph is model.graph]
        if len(measurable) < len(candidates):
            notes.append(f"{len(candidates) - len(measurable)} subgraph weight(s) pruned to the mean sparsity")
        levels = [s for s in SENSITIVITY_GRID if s <= config.max_layer_sparsity]
        feeds, rows = [], 0
        for feed in self.context.calibration:
            feeds.append(feed)
            rows += len(next(iter(feed.values()))) if feed else 1
            if rows >= SENSITIVITY_ROWS:
                break
        if config.padding_mask:
            feeds, note = compact_feeds(ir.to_proto(model).SerializeToString(), feeds, config.padding_mask,
                                        self.context.threads)
            notes += [note] if note else []

        def by_magnitude(value, weights, level):
            return np.where(magnitude_mask(weights, level), weights, np.zeros((), weights.dtype))

        curves = measure_curves(model, measurable, levels, feeds, by_magnitude, self.context.threads,
                                config.padding_mask, self.context.progress)
        sizes = {v.name: v.const_value.size for v in measurable}
        # Subgraph weights take the mean, so the measured ones carry the rest of the target.
        fixed = sum(v.const_value.size for v in candidates if v.graph is not model.graph) * config.sparsity
        wanted = config.sparsity * sum(v.const_value.size for v in candidates) - fixed
        targets = allocate_levels(curves, sizes, levels, wanted)
        report = {name: {f"{level:g}": round(d, 6) for level, d in zip(levels, curve)} for name, curve in curves.items()}
        return targets, report
