"""Low-rank factorization: a MatMul/Gemm weight W [K, N] replaced by two thinner matrices.

before: float MatMul (2-D weight as input 1) and Gemm layers.
after:  ``MatMul(x, W)`` -> ``MatMul(MatMul(x, A), B)`` with A [K, r], B [r, N] (the bias ``Add``
after it untouched); ``Gemm(x, W, C)`` -> ``Gemm(Gemm(x, A), B, C)`` with ``transA`` on the first,
``alpha``/``beta``/``C`` on the second, and for ``transB=1`` both factors stored transposed (Aᵀ
[r, K], Bᵀ [N, r]) as the original was. Names: ``<W>.lowrank_a`` / ``<W>.lowrank_b``; the
second node's output keeps the original output's name. A weight shared by several layers gets one
pair of factors used by all of them.

Rank per weight (``kernels/lowrank.py``): the fewest singular values holding ``energy`` of the
squared total, or the most that keep at most ``ratio`` of the weight's parameters, rounded to a
multiple of ``round_to``. A weight is factored only where that really saves parameters
(``r·(K+N) < K·N``); otherwise it is left and listed under ``skipped`` with the reason.

``method: svd`` fits the weight itself (no data needed); ``method: activation`` fits the layer's
outputs on the calibration data (SVD whitened by the input Gram ``XᵀX``, SVD-LLM / ASVD), which
keeps much more accuracy at the same rank. Its Grams leave out padding positions
(``padding_mask``); layers whose inputs cannot be captured (inside If/Loop bodies) get the plain SVD
and are listed under ``fallback``. Follow with ``recover`` to fine-tune A and B by distillation.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from modelpress.compressors.calibration import (
    Gram,
    capture,
    linear_layers,
    padding_masks,
    plan_rounds,
)
from modelpress.compressors.model import opset_version
from modelpress.compressors.pipeline import Pass, PassResult
from modelpress.compressors.quantize.graph_edits import (
    Names,
    initializer,
    int_attr,
    replace_output,
)
from modelpress.compressors.selection import WeightFilterConfig, select_weights
from modelpress.kernels import lowrank
from modelpress.kernels.hessian import reconstruction_error
from pydantic import Field, model_validator

DEFAULT_ENERGY = 0.9
# Gram matrices (8·K² bytes each) held at once; beyond it the layers are captured in several rounds.
GRAM_BUDGET = 1 << 30


class LowRankConfig(WeightFilterConfig):
    energy: float | None = Field(None, gt=0.0, le=1.0, description=f"share of squared singular values kept "
                                 f"(default {DEFAULT_ENERGY} when neither energy nor ratio is given)")
    ratio: float | None = Field(None, gt=0.0, lt=1.0, description="share of each weight's parameters kept")
    round_to: int = Field(8, ge=1, description="ranks are multiples of this (up for energy, down for ratio)")
    method: Literal["svd", "activation"] = Field("svd", description="svd: fit the weight; activation: fit the "
                                                 "layer outputs on the calibration data (needs --data)")
    damp: float = Field(0.01, gt=0.0, lt=1.0, description="activation: Gram eigenvalue floor, a fraction of their mean")
    padding_mask: str | None = Field(
        "attention_mask", description="activation: model input whose zeros mark padding positions, left out "
        "of the Gram matrices")

    @model_validator(mode="after")
    def _one_rule(self):
        if self.energy is not None and self.ratio is not None:
            raise ValueError("give either energy (a spectrum share) or ratio (a parameter budget), not both")
        return self


class LowRankFactorize(Pass):
    name = "lowrank"
    stage = "prune"
    config_cls = LowRankConfig
    summary = "low-rank factorization of MatMul/Gemm weights (truncated SVD, optionally activation-aware)"

    def call(self, model: ir.Model) -> PassResult:
        config: LowRankConfig = self.config
        if config.method == "activation" and not self.context.calibration:
            raise ValueError("lowrank with method: activation needs calibration data: run with --data "
                             "(an .npz of model inputs), or use method: svd")
        candidates, skipped = select_weights(model, {"MatMul", "Gemm"}, config)
        eligible = []
        for value in candidates:
            reason = _unfactorable(value, model)
            if reason:
                skipped.append({"tensor": value.name, "reason": reason})
            else:
                eligible.append(value)
        names = Names(model)
        per_tensor: dict[str, dict[str, Any]] = {}
        fallback: list[dict[str, str]] = []
        plain = eligible
        if config.method == "activation":
            layers, rest = linear_layers(model, eligible)
            fallback = [{"tensor": v.name, "reason": f"{why}: plain SVD instead"} for v, why in rest]
            plain = [v for v, _ in rest]
            self._factor_calibrated(model, layers, names, per_tensor, skipped)
        for index, value in enumerate(plain):
            self.context.progress("lowrank: factorizing", index, len(plain))
            self._factor(value, None, names, per_tensor, skipped)

        before = sum(f["params_before"] for f in per_tensor.values())
        after = sum(f["params_after"] for f in per_tensor.values())
        stats: dict[str, Any] = {
            "tensors_factored": len(per_tensor),
            "method": config.method,
            "rule": f"ratio {config.ratio}" if config.ratio is not None else f"energy {config.energy or DEFAULT_ENERGY}",
            "params_before": before,
            "params_after": after,
            "params_ratio": round(after / before, 4) if before else 1.0,
            "per_tensor": per_tensor,
            "fallback": fallback,
            "skipped": skipped,
        }
        return PassResult(model, modified=bool(per_tensor), stats=stats)

    def _factor_calibrated(self, model, layers, names, per_tensor, skipped) -> None:
        """Activation-aware: capture the input Grams (padding left out) and factor, round by round;
        a later round's inputs come from the model with the earlier rounds already factored."""
        feeds = self.context.calibration
        masks = padding_masks(feeds, self.config.padding_mask)
        inputs = {key: layer.weight.const_value.shape[layer.in_axis] for layer in layers for key in layer.inputs}
        rounds = plan_rounds(layers, max(1, -(-sum(8 * k * k for k in inputs.values()) // GRAM_BUDGET)))
        done = 0
        for group in rounds:
            grams = {key: Gram(key[1]) for layer in group for key in layer.inputs}
            capture(model, [(name, g) for (name, _), g in grams.items()], feeds, row_masks=masks,
                    threads=self.context.threads, progress=self.context.progress)
            for layer in group:
                self.context.progress("lowrank: factorizing", done, len(layers))
                # Rows of every use: a shared weight is fitted to all its inputs at once.
                gram = sum(grams[key].hessian * grams[key].rows for key in layer.inputs)
                self._factor(layer.weight, gram / max(1, sum(grams[k].rows for k in layer.inputs)),
                             names, per_tensor, skipped)
                done += 1

    def _factor(self, value: ir.Value, gram: np.ndarray | None, names: Names,
                per_tensor: dict, skipped: list) -> None:
        config: LowRankConfig = self.config
        w = value.const_value.numpy()
        transposed = _stored_transposed(value)
        w_in_out = w.T if transposed else w
        k, n = w_in_out.shape
        spec = lowrank.spectrum(w_in_out, gram, damp=config.damp)
        limit = min(k, n)
        if config.ratio is not None:
            rank = lowrank.round_rank(lowrank.rank_for_ratio(k, n, config.ratio), config.round_to, up=False, limit=limit)
        else:
            energy = config.energy if config.energy is not None else DEFAULT_ENERGY
            rank = lowrank.round_rank(lowrank.rank_for_energy(spec, energy), config.round_to, up=True, limit=limit)
        if not lowrank.saves_parameters(k, n, rank):
            skipped.append({"tensor": value.name, "reason": f"rank {rank} of a {k}x{n} weight would not save "
                            f"parameters ({rank * (k + n)} >= {k * n})"})
            return
        a, b = lowrank.factors(spec, rank)
        figures = {"shape": [k, n], "rank": rank, "params_before": k * n, "params_after": rank * (k + n),
                   "energy_kept": round(float(spec.energy[rank - 1]), 6)}
        if gram is not None:
            figures["output_error"] = round(reconstruction_error(w_in_out, a @ b, gram, layout="in_out"), 6)
        _rewrite(value, a.astype(w.dtype), b.astype(w.dtype), transposed, names)
        per_tensor[value.name] = figures


def _unfactorable(value: ir.Value, model: ir.Model) -> str | None:
    """Why the layers using ``value`` cannot be rewritten, or None."""
    if len(value.const_value.shape) != 2:
        return f"rank-{len(value.const_value.shape)} weight (batched MatMul), not a 2-D layer"
    layouts = set()
    for use in value.uses():
        node = use.node
        if node.op_type == "Gemm":
            if opset_version(model) < 11:
                return "Gemm below opset 11 needs a C input, which the first factor would not have"
            layouts.add(bool(int_attr(node, "transB")))
        elif node.op_type != "MatMul":
            return f"used by {node.op_type}"
    if len(layouts) > 1:
        return "shared by Gemm layers that store it in different layouts (transB)"
    return None


def _stored_transposed(value: ir.Value) -> bool:
    return any(u.node.op_type == "Gemm" and int_attr(u.node, "transB") for u in value.uses())


def _rewrite(value: ir.Value, a: np.ndarray, b: np.ndarray, transposed: bool, names: Names) -> None:
    """Replace every layer reading ``value`` by the two factor layers and drop ``value``."""
    first = initializer(value.graph, names(f"{value.name}.lowrank_a"), a.T if transposed else a)
    second = initializer(value.graph, names(f"{value.name}.lowrank_b"), b.T if transposed else b)
    for use in list(value.uses()):
        node, graph = use.node, use.node.graph
        if node.op_type == "MatMul":
            inner = ir.node("MatMul", [node.inputs[0], first])
            outer = ir.node("MatMul", [inner.outputs[0], second])
        else:  # Gemm: transA on the first factor, alpha / beta / C on the second
            trans_b = {"transB": 1} if transposed else {}
            inner = ir.node("Gemm", [node.inputs[0], first], {"transA": int_attr(node, "transA"), **trans_b})
            outer_attrs = {k: a.value for k, a in node.attributes.items() if k in ("alpha", "beta")}
            c = node.inputs[2] if len(node.inputs) > 2 else None
            outer = ir.node("Gemm", [inner.outputs[0], second] + ([c] if c is not None else []),
                            {**outer_attrs, **trans_b})
        inner.outputs[0].name = names(f"{value.name}.lowrank_h")
        graph.insert_before(node, [inner, outer])
        replace_output(node, outer.outputs[0])
    value.graph.initializers.pop(value.name)

