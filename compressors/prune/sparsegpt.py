"""SparseGPT one-shot pruning: calibrated, with Hessian-based updates of the surviving weights.

before: float MatMul / Gemm weight matrices and calibration feeds (``--data``).
after:  the same tensors at the target sparsity (or exactly N:M along the input dimension), the
remaining weights updated so each layer's output on the calibration data changes least
(``||XW - XW'||²``, SparseGPT, Frantar & Alistarh 2023), then (``refit``) the kept weights of each
output re-solved exactly for the chosen mask. Layers are solved in graph order, each round's inputs
captured from the model with the earlier rounds already pruned (``rounds``). Padding positions
(zeros of the ``padding_mask`` input, ``attention_mask`` by default) are left out of the statistics.
A one-group 2-D Conv is the same problem over its im2col patches (kernel [O, C, kh, kw] solved as
[O, C·kh·kw]; kernels/im2col.py). Weights the solver cannot reach — inside If/Loop bodies,
ConvTranspose kernels, Conv kernels under N:M, shared in two layouts — are pruned by magnitude
instead (listed under ``fallback`` with the reason); grouped (depthwise) Convs and the rest that is
left dense are listed under ``skipped``. ``output_error`` per tensor is ``||X(W - W')||² / ||XW||²``.

The loop (``LayerwisePrune``) and the Hessian-based steps around the solver (``ReconstructionPrune``)
are shared: ``wanda`` and ``admm`` (prune/admm.py, another solver for the same problem) build on them.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Annotated, Any, Literal

import numpy as np
import onnx_ir as ir
from modelpress.compressors.calibration import (
    ColumnNorms,
    CrossGram,
    Gram,
    LinearLayer,
    Reduction,
    capture,
    first_samples,
    linear_layers,
    padding_masks,
    plan_rounds,
    weight_input_axis,
)
from modelpress.compressors.padding import compact_feeds
from modelpress.compressors.pipeline import Pass, PassResult
from modelpress.compressors.prune.allocation import allocate_levels, measure_curves
from modelpress.compressors.selection import WeightFilterConfig, select_weights
from modelpress.kernels.hessian import (
    correct_input_error,
    reconstruction_error,
    refit_kept,
    sparsegpt_prune,
    wanda_mask,
)
from modelpress.kernels.sparsity import magnitude_mask, nm_mask
from pydantic import Field, model_validator

PATTERNS = {"2:4": (2, 4), "4:8": (4, 8)}  # at most N nonzeros in every M consecutive inputs
# Work bound of the exact refit of one layer (about out·kept_inputs³/3 flops, ~1 minute on one core):
# MiniLM's largest layer needs 6e10; a 4096 x 11008 LLM layer would need 3e13 and is left as solved.
REFIT_FLOPS = 2e12
# Under ``allocation: sensitivity``: the levels each layer is tried at (by Wanda's score, alone in the
# original model) and how many calibration samples, spread over the data, measure the output change.
ALLOCATION_LEVELS = (0.0, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
ALLOCATION_SAMPLES = 128


class LayerwiseConfig(WeightFilterConfig):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of weights set to zero (unstructured)")
    pattern: Literal["unstructured", "2:4", "4:8"] = "unstructured"
    # "sequential": each layer input captured after everything before it is pruned (as in the paper);
    # k: k capture runs in all (1 = every statistic from the original model, fastest).
    rounds: Literal["sequential"] | Annotated[int, Field(ge=1)] = "sequential"
    padding_mask: str | None = Field(
        "attention_mask", description="model input whose zeros mark padding: those positions are left out "
        "of the calibration statistics (when the feeds have it and its shape matches the layer input's rows)")
    allocation: Literal["uniform", "sensitivity"] = Field(
        "uniform", description="sensitivity: each layer's sparsity from the measured output change when it "
        "alone is pruned (the mean stays `sparsity`; unstructured only)")
    max_layer_sparsity: float = Field(0.8, gt=0.0, lt=1.0, description="cap of any one layer under sensitivity")
    # The statistics cost time linear in the samples and stop improving long before a later `recover`
    # step stops gaining from more data: a recipe can give recover thousands and this pass fewer.
    samples: int | None = Field(None, ge=1, description="at most this many calibration samples (the first ones); "
                                "None: all that the recipe's calibration.samples gives")

    @model_validator(mode="after")
    def _pattern_fixes_sparsity(self):
        if self.pattern != "unstructured" and "sparsity" in self.model_fields_set:
            n, m = PATTERNS[self.pattern]
            if abs(self.sparsity - (m - n) / m) > 1e-9:
                raise ValueError(
                    f"pattern {self.pattern} fixes the sparsity at {(m - n) / m:g}; remove `sparsity`"
                )
        if self.pattern != "unstructured" and self.allocation == "sensitivity":
            raise ValueError(f"pattern {self.pattern} fixes every layer's sparsity; use allocation: uniform")
        if self.allocation == "sensitivity" and self.max_layer_sparsity < self.sparsity:
            raise ValueError("max_layer_sparsity is below the mean sparsity: no allocation reaches it")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        return PATTERNS.get(self.pattern)


class LayerwisePrune(Pass):
    """Shared loop of calibrated layer-wise pruning: select, capture in rounds, solve, fall back."""

    stage = "prune"
    needs_calibration = True

    @abstractmethod
    def reduction(self, transposed: bool) -> Reduction:
        """The statistic of a layer input the solver needs."""

    def wants_reference(self) -> bool:
        """True when the statistics also need the original model's activations (``CrossGram``)."""
        return False

    @abstractmethod
    def solve(self, layer: LinearLayer, weights: np.ndarray, stats: list[Reduction]) -> tuple[np.ndarray, dict]:
        """New weights (same shape and dtype) and per-tensor figures for the stats."""

    def call(self, model: ir.Model) -> PassResult:
        config: LayerwiseConfig = self.config
        feeds = first_samples(self.context.calibration or [], config.samples)
        if not feeds:
            raise ValueError(
                f"the {self.name} pass needs calibration data: run with --data (an .npz of model inputs)"
            )
        candidates, skipped = select_weights(model, {"MatMul", "Gemm", "Conv", "ConvTranspose"}, config)
        layers, rest = linear_layers(model, candidates)
        if config.nm:  # a Conv's N:M groups run over input channels, not its (C, kh, kw) patch rows
            m = config.nm[1]
            rest += [(layer.weight, "N:M on a Conv kernel") for layer in layers if len(layer.weight.const_value.shape) > 2]
            layers = [layer for layer in layers if len(layer.weight.const_value.shape) == 2]
            fits = [layer for layer in layers if layer.weight.const_value.shape[layer.in_axis] % m == 0]
            rest += [(layer.weight, f"input dimension is not a multiple of {m}") for layer in layers if layer not in fits]
            layers = fits

        counts: dict[str, tuple[int, int]] = {}  # tensor -> (zeros, size)
        figures: dict[str, dict] = {}
        rows = 0
        rounds = plan_rounds(layers, config.rounds)
        # The original model, kept to capture each later layer's inputs as they were before pruning.
        reference = ir.to_proto(model) if self.wants_reference() and len(rounds) > 1 else None
        notes = []
        if config.padding_mask:  # padding is left out of the statistics: do not compute it either
            feeds, note = compact_feeds(ir.to_proto(model).SerializeToString(), feeds, config.padding_mask,
                                        self.context.threads)
            notes += [note] if note else []
        masks = padding_masks(feeds, config.padding_mask)
        self.targets, sensitivity = {}, {}
        if config.allocation == "sensitivity" and layers:
            self.targets, sensitivity = allocate(model, layers, feeds, masks, config, self.context)
        done = 0
        for group in rounds:
            # One statistic per distinct input: Q, K and V read the same value.
            shared = {key: self.reduction(key[1]) for layer in group for key in layer.inputs}
            capture(model, [(name, r) for (name, _), r in shared.items()], feeds, reference=reference,
                    row_masks=masks, threads=self.context.threads, progress=self.context.progress)
            for layer in group:
                self.context.progress(f"{self.name} pruning", done, len(layers))
                stats = [shared[key] for key in layer.inputs]
                weights = layer.weight.const_value.numpy()
                new, extra = self.solve(layer, _matrix(weights), stats)
                _store(layer.weight, new.reshape(weights.shape), counts)
                figures[layer.weight.name] = extra
                rows = max(rows, max(s.rows for s in stats))
                done += 1

        fallback = []
        for value, reason in rest:
            if reason.startswith("grouped Conv"):  # depthwise: 9 weights per channel, each one matters
                skipped.append({"tensor": value.name, "reason": f"{reason}: left dense"})
                continue
            new = _magnitude_fallback(value, config)
            if new is None:
                skipped.append({"tensor": value.name, "reason": f"{reason}; no N:M fallback for this layout"})
                continue
            _store(value, new, counts)
            fallback.append({"tensor": value.name, "reason": f"{reason}: pruned by magnitude instead"})

        total = sum(size for _, size in counts.values())
        zeros = sum(z for z, _ in counts.values())
        stats: dict[str, Any] = {
            "tensors_pruned": len(counts),
            "sparsity": round(zeros / total, 4) if total else 0.0,
            "pattern": config.pattern,
            "rounds": len(rounds),
            "calibration_rows": rows,
            "per_tensor": {n: round(z / size, 4) for n, (z, size) in counts.items()},
            **_collect(figures),
            "fallback": fallback,
            "skipped": skipped,
            **({"notes": notes} if notes else {}),
            **({"allocation": {n: round(s, 4) for n, s in self.targets.items()}, "sensitivity": sensitivity}
               if config.allocation == "sensitivity" else {}),
        }
        return PassResult(model, modified=bool(counts), stats=stats)

    def layer_sparsity(self, layer: LinearLayer) -> float:
        return self.targets.get(layer.weight.name, self.config.sparsity)


class ReconstructionConfig(LayerwiseConfig):
    damp: float = Field(0.01, gt=0.0, lt=1.0, description="Hessian damping, a fraction of its mean diagonal")
    # With rounds "sequential": solve each layer for min ||X̂W' - XW||² (X̂: its inputs with every
    # layer before it pruned, X: the original inputs), so it also absorbs the error from upstream.
    # Not with k rounds: the layers earlier in the same round correct themselves, and a later layer
    # would undo an error that is no longer there (measured: worse than no correction).
    correct_upstream: bool = True
    # After the mask is chosen, solve its kept weights exactly (kernels/hessian.py refit_kept): one
    # least-squares solve per output. all-MiniLM-L6-v2 at 50 %: every layer's output error 30-55 %
    # lower than SparseGPT's own updates (figures in benchmarks/RESULTS.md, minilm-prune).
    refit: bool = True

    @model_validator(mode="after")
    def _correction_is_sequential(self):
        if self.rounds != "sequential" and self.correct_upstream and "correct_upstream" in self.model_fields_set:
            raise ValueError("correct_upstream needs rounds: sequential")
        return self

    @property
    def corrects(self) -> bool:
        return self.correct_upstream and self.rounds == "sequential"


class ReconstructionPrune(LayerwisePrune):
    """Layer-wise pruning that also updates the kept weights from the layer's Hessian ``X^T X``:
    upstream correction, the solver's mask and update (``prune_target``), then the exact refit."""

    def reduction(self, transposed: bool) -> Reduction:
        return CrossGram(transposed) if self.config.corrects else Gram(transposed)

    def wants_reference(self) -> bool:
        return self.config.corrects

    @abstractmethod
    def prune_target(self, target: np.ndarray, hessian: np.ndarray, layout: str, cut: dict) -> tuple[np.ndarray, dict]:
        """``target`` (float64, in ``layout``) pruned as ``cut`` says — the kernels' ``sparsity``,
        ``prunen`` and ``prunem`` arguments — with the kept weights updated, and per-tensor figures."""

    def solve(self, layer, weights, stats):
        config: ReconstructionConfig = self.config
        hessian = sum(s.hessian for s in stats)  # a shared weight serves every use at once
        target = weights.astype(np.float64)
        if config.corrects:
            cross = sum(s.cross for s in stats)
            target = correct_input_error(weights, hessian, cross, layout=layer.layout, percdamp=config.damp)
        n, m = config.nm or (0, 0)
        cut = {"sparsity": self.layer_sparsity(layer), "prunen": m - n, "prunem": m}
        new, figures = self.prune_target(target, hessian, layer.layout, cut)
        if config.refit:
            n_in, n_out = hessian.shape[0], new.size // hessian.shape[0]
            kept = n_in * (n / m if config.nm else 1.0 - cut["sparsity"])
            if n_out * kept**3 / 3 <= REFIT_FLOPS:
                new = refit_kept(target, new, hessian, layout=layer.layout, percdamp=config.damp)
            else:  # one |S|³ solve per output: too slow for this layer, keep the solver's weights
                figures["refit_skipped"] = 1
        # The layer's own pruning error, relative to its (corrected) dense output.
        error = reconstruction_error(target, new, hessian, layout=layer.layout)
        return new.astype(weights.dtype), {"output_error": round(error, 6), **figures}


class SparseGPTConfig(ReconstructionConfig):
    blocksize: int = Field(128, ge=1, description="inputs per mask-selection block")


class SparseGPTPrune(ReconstructionPrune):
    name = "sparsegpt"
    config_cls = SparseGPTConfig
    summary = "one-shot pruning with Hessian-based weight updates from calibration data (SparseGPT)"

    def prune_target(self, target, hessian, layout, cut):
        return sparsegpt_prune(target, hessian, layout=layout, **cut, blocksize=self.config.blocksize,
                               percdamp=self.config.damp), {}


def _collect(figures: dict[str, dict]) -> dict[str, Any]:
    """Per-tensor figures as {key: {tensor: value}}, plus the mean of each."""
    keys = sorted({k for f in figures.values() for k in f})
    out: dict[str, Any] = {}
    for key in keys:
        values = {t: f[key] for t, f in figures.items() if key in f}
        out[f"mean_{key}"] = round(float(np.mean(list(values.values()))), 6)
        out[key] = values
    return out


def _matrix(weights: np.ndarray) -> np.ndarray:
    """A Conv kernel [O, C, kh, kw] as the [O, C·kh·kw] matrix its patches multiply; 2-D as it is."""
    return weights.reshape(weights.shape[0], -1) if weights.ndim > 2 else weights


def _store(value: ir.Value, new: np.ndarray, counts: dict[str, tuple[int, int]]) -> None:
    value.const_value = ir.Tensor(np.ascontiguousarray(new), name=value.name)
    counts[value.name] = (int(new.size - np.count_nonzero(new)), int(new.size))


def _magnitude_fallback(value: ir.Value, config: LayerwiseConfig) -> np.ndarray | None:
    weights = value.const_value.numpy()
    if config.nm is None:
        keep = magnitude_mask(weights, config.sparsity)
    else:
        n, m = config.nm
        axes = {weight_input_axis(u.node, weights.ndim) for u in value.uses()}
        axis = axes.pop() if len(axes) == 1 else None
        if axis is None or weights.shape[axis] % m:
            return None
        keep = nm_mask(np.abs(weights.astype(np.float32)), n, m, axis=axis)
    return np.where(keep, weights, np.zeros((), weights.dtype)).astype(weights.dtype)


def allocate(model: ir.Model, layers: list[LinearLayer], feeds, masks, config: LayerwiseConfig,
             context) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(tensor -> sparsity, tensor -> {level: output change}): each layer pruned alone by Wanda's
    score at ALLOCATION_LEVELS in the original model, then the mean sparsity spread where the summed
    change is least (``allocation.allocate_levels``)."""
    norms = {key: ColumnNorms(key[1]) for layer in layers for key in layer.inputs}
    capture(model, [(name, r) for (name, _), r in norms.items()], feeds, row_masks=masks,
            threads=context.threads, progress=context.progress)
    by_name = {layer.weight.name: layer for layer in layers}

    def by_wanda(value, weights, level):
        layer = by_name[value.name]
        column = np.sqrt(sum(norms[key].norms ** 2 for key in layer.inputs))
        keep = wanda_mask(_matrix(weights), column, layout=layer.layout, sparsity=level).reshape(weights.shape)
        return np.where(keep, weights, np.zeros((), weights.dtype))

    # Samples spread over the data: compacted feeds are sorted by length.
    sizes = [len(next(iter(f.values()))) for f in feeds]
    picked = np.unique(np.linspace(0, len(feeds) - 1, max(1, min(len(feeds), ALLOCATION_SAMPLES // max(1, sizes[0]))))
                       .round().astype(int))
    levels = [level for level in ALLOCATION_LEVELS if level <= config.max_layer_sparsity]
    values = [layer.weight for layer in layers]
    curves = measure_curves(model, values, levels, [feeds[i] for i in picked], by_wanda, context.threads,
                            config.padding_mask, context.progress)
    counts = {v.name: v.const_value.size for v in values}
    targets = allocate_levels(curves, counts, levels, config.sparsity * sum(counts.values()))
    report = {name: {f"{level:g}": round(c, 6) for level, c in zip(levels, curve)} for name, curve in curves.items()}
    return targets, report
