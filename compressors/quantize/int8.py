"""int8 quantization, placed per op where ONNX Runtime's CPU provider runs it fastest.

before: a float model — weights of MatMul / Gemm / Conv / ConvTranspose / Gather (and W, R of LSTM /
GRU / RNN, weight-only) in the main graph and in If/Loop/Scan subgraphs (``normalize`` has already lifted Constant-node weights).
after:  every selected weight stored once as int8 (per output channel by default) with float
scales, feeding one of three forms chosen per op:

* ``weight_only`` — ``Cast(int8) -> Mul(scale)``. ORT constant-folds the pair when the session
  loads, so the op runs the very fp32 kernel it ran before: the same speed, a 4x smaller file and
  only the weights' rounding error. Deliberately not ``DequantizeLinear``: ORT keeps DQ nodes out of
  constant folding (to find QDQ groups), so DQ->Conv/Gemm/Gather dequantizes on every run, and
  DQ->MatMul becomes an 8-bit ``MatMulNBits`` that is slower than fp32 for batches > 1.
* ``dynamic`` (MatMul, Gemm) — DynamicQuantizeLinear + MatMulInteger + scale Muls (+ bias Add),
  the standard-ONNX form ORT fuses into DynamicQuantizeMatMul / MatMulIntegerToFloat (u8 x s8).
  The activation scale is taken at run time over the whole input tensor, so, as with ORT's
  ``quantize_dynamic``, a sample's output can differ slightly with the batch it runs in.
* ``static`` (Conv; also MatMul in ``mode: static``) — QDQ with uint8 activations calibrated on
  the calibration feeds, fused by ORT into QLinearConv / QLinearMatMul (ReLU absorbed).
  Never ``ConvInteger`` (what ``quantize_dynamic`` emits for Conv): 5-10x slower than fp32 on CPU.

Why: a weight-only op is the very fp32 kernel after ORT's constant folding, while an int8 kernel
wins for large ops and loses for small ones (fixed quantize / layout overheads, ORT's fp32
Conv/Gemm+ReLU fusion, narrow outputs) — measured tables in ``int8_place``'s docstring. So
``mode: auto`` stores every weight int8 (``weight_only``), then switches an op to its int8 kernel
(dynamic for MatMul/Gemm, static QDQ for Conv when there is calibration data) where it pays at the
shapes latency is judged on: one sample of the first calibration feed when the batch axis is
dynamic (as the benchmark times it), else that feed (tiny models at batch 1 therefore stay
weight-only: the same kernels as fp32). Where it pays is decided by

* ``placement: rule`` (default) — by the size rule fitted to those tables (``RULE_*`` in
  ``int8_place``): the same inputs give the same bytes on every run, which the CLI promises.
* ``placement: measure`` — by timing the op alone in fp32 and with its kernel on this machine
  (interleaved rounds), keeping kernels at least ``MIN_OP_SPEEDUP`` faster: adapts to the CPU, but
  timing noise can change the result from run to run.

Before the dynamic kernels are emitted, activations that come out of a normalization layer have
their outlier channels' scale migrated into the weights (``smoothing``, SmoothQuant): a dynamic
kernel quantizes its whole input with one scale, which those outliers would otherwise set.

The whole model is then checked against the input model on the calibration feeds (see
``compressors.fidelity``): for class scores, top-1 agreement and per-sample cosine; for feature
outputs such as token embeddings, per-sample cosine with padded positions left out; and
(``never_slower``) latency. When a check fails the int8 kernels are dropped again (static first,
then all), down to weight-only, which runs the input model's kernels (``int8_verify``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from modelpress.compressors.environment import int8_pairs_saturate
from modelpress.compressors.errors import InputError
from modelpress.compressors.model import ensure_opset, iter_graphs, normalize, opset_version, to_bytes
from modelpress.compressors.pipeline import Pass, PassResult
from modelpress.compressors.quantize.graph_edits import Names, fold_batchnorm, initializer_bytes
from modelpress.compressors.quantize.int8_emit import apply_plan
from modelpress.compressors.quantize.int8_profile import Profile, build_profile
from modelpress.compressors.quantize.int8_place import (
    Target, Use, mark_kernel_candidates, micro_model, rule_prefers_kernel, select_targets, signature)
from modelpress.compressors.quantize.int8_verify import build_checked
from modelpress.compressors.quantize.ort_probe import (  # noqa: F401  (Timing, TIMING_ROUNDS: re-exported)
    TIMING_ROUNDS, Timing, batch_of, time_models)
from modelpress.compressors.selection import WeightFilterConfig

# Recurrent ops (W and R) are weight-only: ORT has no int8 kernel for them in standard ONNX.
SUPPORTED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "LSTM", "GRU", "RNN")

# Per-channel DequantizeLinear needs opset 13 (DynamicQuantizeLinear 11); models below are upgraded
# only when an int8 kernel may be used — weight-only Cast+Mul runs at any opset.
KERNEL_OPSET = 13
# ``placement: measure``: an op switches to its int8 kernel only when timed at least this much
# faster than fp32 (a kernel that merely ties costs accuracy for nothing).
MIN_OP_SPEEDUP = 1.15
CHECK_MAX_BYTES = 512 << 20


class Int8Config(WeightFilterConfig):
    mode: Literal["auto", "weight_only", "dynamic", "static"] = Field(
        "auto",
        description="auto: int8 kernels only where they pay; dynamic: MatMul/Gemm dynamic; static: QDQ on "
        "Conv and MatMul (Gemm dynamic: ORT does not fuse QDQ Gemm); Conv is never dynamic (ConvInteger)",
    )
    placement: Literal["rule", "measure"] = Field(
        "rule", description="auto: place kernels by the measured size rule (reproducible) or by timing each op here"
    )
    per_channel: bool = Field(True, description="one weight scale per output channel (else per tensor)")
    symmetric: bool = Field(True, description="weights in [-127, 127] with zero point 0 (else asymmetric)")
    calibration: Literal["minmax", "percentile", "mse", "entropy"] = Field(
        "minmax", description="activation range estimator for static QDQ: observed min/max, a percentile of a "
        "histogram, the range of least expected squared error, or of least KL divergence (TensorRT's entropy)",
    )
    percentile: float = Field(
        99.99, gt=50.0, le=100.0, description="calibration percentile: each tail of the range loses (100 - p) %"
    )
    # include / exclude globs from WeightFilterConfig. min_elements 128: below it the per-channel
    # scales and the two extra nodes cost about what int8 saves.
    min_elements: int = Field(128, ge=1, description="smaller tensors are left as they are")
    op_types: tuple[Literal["MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "LSTM", "GRU", "RNN"], ...] = (
        SUPPORTED_OPS)
    latency_batch: int | None = Field(
        None, ge=1, description="samples per run to place kernels for; default what the benchmark times "
        "(one sample when the batch axis is dynamic)",
    )
    never_slower: bool = Field(
        True, description="auto: time the result against the input model and drop int8 kernels if slower"
    )
    fold_batchnorm: bool = Field(True, description="fold inference BatchNormalization into the Conv before it")
    min_agreement: float = Field(
        0.995, ge=0.0, le=1.0, description="top-1 agreement with the input model needed to keep int8 kernels"
    )
    min_cosine: float = Field(
        0.999, ge=-1.0, le=1.0, description="mean per-sample cosine of class-score outputs needed to keep int8 kernels"
    )
    min_feature_cosine: float = Field(
        0.996, ge=-1.0, le=1.0, description="the same for feature outputs (rank >= 3, e.g. token embeddings; padding "
        "positions left out), which have no decisions to agree on. all-MiniLM-L6-v2: all 36 dynamic kernels give "
        "0.995, and nearest-neighbour search then changes for ~9 % of sentences; at 0.996 the fallback gives the 5 layers "
        "adding the most error their fp32 kernel back: 94 % agreement (benchmarks/minilm.py for the latency)",
    )
    reduce_range: bool | Literal["auto"] = Field(
        "auto", description="7-bit weights for int8 kernels (no u8 x s8 saturation); auto: on x86 CPUs with AVX2 "
        "and no VNNI, as ORT documents",
    )
    bias_correction: bool = Field(
        True, description="move each main-graph layer's bias (Conv, Gemm, MatMul+Add) by the mean output shift its "
        "rounded weights cause on the calibration data (Nagel et al., 2019); needs --data",
    )
    padding_mask: str | None = Field(
        "attention_mask", description="input whose zeros mark padding positions, left out of the bias-correction "
        "means (sentences padded to a fixed length are mostly padding)",
    )
    smoothing: float | None = Field(
        0.75, ge=0.0, le=1.0, description="SmoothQuant migration strength alpha for dynamic MatMul/Gemm fed by a "
        "normalization layer (null: off)",
    )


class Int8Quantize(Pass):
    name = "int8"
    stage = "quantize"
    config_cls = Int8Config
    summary = "int8 quantization, placed per op where the CPU runs it faster"

    def call(self, model: ir.Model) -> PassResult:
        config: Int8Config = self.config
        notes: list[str] = []
        self._reduce = _reduce_range(config)  # reads the CPU's features once per run
        reference = _serializable_bytes(model)  # the input model, to check the result against
        if reference is None:
            notes.append(f"weights over {CHECK_MAX_BYTES >> 20} MB: outputs not checked against the input model")

        base, folded = _prepare(model, config.fold_batchnorm)
        targets, skipped = select_targets(base, config)
        prepared = base
        kernels_wanted = config.mode != "weight_only" and any(
            u.op_type in ("MatMul", "Gemm", "Conv") for t in targets for u in t.uses
        )
        if kernels_wanted and opset_version(base) < KERNEL_OPSET:
            try:
                prepared = ensure_opset(base, KERNEL_OPSET)
            except InputError as exc:
                notes.append(f"int8 kernels not used: {exc}")
                kernels_wanted = False
            else:
                notes.append(f"opset upgraded {opset_version(base)} -> {KERNEL_OPSET} for int8 kernels")
                targets, _ = select_targets(prepared, config)

        correct_biases = config.bias_correction and bool(self.context.calibration)
        profile = build_profile(prepared, targets, config, self.context, calibrate=kernels_wanted or correct_biases)
        if profile.note:
            notes.append(profile.note)
        decisions: list[dict[str, Any]] = []
        if kernels_wanted:
            mark_kernel_candidates(prepared, targets, config, profile)
            decisions = self._place(prepared, targets, profile)

        attempts: list[tuple[str, ir.Model, list[Target]]] = []
        if any(u.method != "weight_only" for t in targets for u in t.uses):
            attempts.append(("int8 kernels", prepared, targets))
            if any(u.method == "static" for t in targets for u in t.uses):
                attempts.append(("without static QDQ", prepared, _without(targets, {"static"})))
        # Weight-only needs no opset upgrade: it is built from the model as it came in.
        attempts.append(("weight-only", base, select_targets(base, config)[0]))
        quantized, final, verification = build_checked(attempts, profile, reference, decisions, config,
                                                       self.context.threads, self._reduce["used"])

        counts: dict[str, Counter] = defaultdict(Counter)
        for target in final:
            counts[target.op_types][target.methods] += 1
        bytes_before = initializer_bytes(model)
        bytes_after = initializer_bytes(quantized)
        stats = {
            "mode": config.mode,
            "placement": _placement(config, kernels_wanted),
            "tensors_quantized": len(final),
            "quantized": {op: dict(sorted(c.items())) for op, c in sorted(counts.items())},
            "bytes_before": bytes_before,
            "bytes_after": bytes_after,
            "size_ratio": round(bytes_before / bytes_after, 3) if bytes_after else None,
            "batchnorm_folded": folded,
            "opset": opset_version(quantized),
            "calibration": {
                "feeds": len(profile.feeds),
                "latency_batch": batch_of(profile.latency_feed),
                "synthesized": profile.synthesized,
                "method": config.calibration,
                "activations": len(profile.ranges),
            },
            "decisions": decisions,
            "smoothed": verification.pop("smoothed", []),
            "bias_corrected": len(verification.pop("bias_corrected", [])),
            "per_tensor": verification.pop("per_tensor", {}),
            "reduce_range": self._reduce,
            "verification": verification,
            "skipped": skipped,
            "notes": notes,
        }
        return PassResult(quantized, modified=bool(final) or folded > 0, stats=stats)

    # ----------------------------------------------------------------------- placement

    def _place(self, model: ir.Model, targets: list[Target], profile: Profile) -> list[dict[str, Any]]:
        """Choose each use's method; return one decision record per int8-kernel candidate."""
        config: Int8Config = self.config
        graphs = list(iter_graphs(model))
        nodes = [list(g) for g in graphs]
        decisions: list[dict[str, Any]] = []
        timings: dict[tuple, tuple[float, float, float]] = {}  # signature -> (fp32 µs, int8 µs, speedup)
        for target in targets:
            for use in target.uses:
                if use.kernel is None and use.why_not is not None:
                    decisions.append({"node": use.node_name, "op_type": use.op_type, "tensor": target.name,
                                      "kernel": None, "method": use.method, "reason": use.why_not})
        candidates = [(t, u) for t in targets for u in t.uses if u.kernel is not None]
        for index, (target, use) in enumerate(candidates):
            self.context.progress("int8: timing kernels", index, len(candidates))
            node = nodes[use.node[0]][use.node[1]]
            shape = profile.shapes.get(node.inputs[0].name)
            record: dict[str, Any] = {"node": use.node_name, "op_type": use.op_type, "tensor": target.name,
                                      "kernel": use.kernel, "input_shape": list(shape) if shape else None}
            if config.mode in ("dynamic", "static"):
                use.method, record["reason"] = use.kernel, f"mode: {config.mode}"
            elif config.placement == "rule":
                faster, why = rule_prefers_kernel(node, use.kernel, shape)
                use.method = use.kernel if faster else "weight_only"
                record["reason"] = why
            else:
                micro = micro_model(model, node, use, shape)
                if micro is None:
                    use.method, record["reason"] = "weight_only", "op not timeable alone (non-constant side inputs or unknown shape)"
                else:
                    alone, epilogue = micro
                    key = signature(node, target, shape, use.kernel, epilogue)
                    if key not in timings:
                        timings[key] = self._time_kernel(alone, target, use, shape, profile)
                    fp32_us, int8_us, speedup = timings[key]
                    record.update(fp32_us=round(fp32_us, 2), int8_us=round(int8_us, 2), speedup=round(speedup, 3))
                    if speedup >= MIN_OP_SPEEDUP:
                        use.method, record["reason"] = use.kernel, f"{speedup:.2f}x faster than fp32"
                    else:
                        use.method = "weight_only"
                        record["reason"] = f"int8 kernel {speedup:.2f}x vs fp32 (< {MIN_OP_SPEEDUP}x)"
            record["method"] = use.method
            decisions.append(record)
        return decisions

    def _time_kernel(self, micro: ir.Model, target: Target, use: Use, shape, profile: Profile) -> tuple[float, float, float]:
        """Median µs of the op alone in fp32 and with its int8 kernel, and the kernel's speedup."""
        kernel_target = replace(target, graph=0, uses=[replace(use, node=(0, 0), method=use.kernel)])
        fp32_bytes = to_bytes(micro)
        int8_model = micro.clone()
        apply_plan(int8_model, [kernel_target], profile.ranges, self.config,
                   reduce_range=self._reduce["used"])
        rng = np.random.default_rng(self.context.seed)
        feed = {micro.graph.inputs[0].name: rng.standard_normal(shape).astype(np.float32)}
        timings = time_models({"fp32": fp32_bytes, "int8": to_bytes(int8_model)}, feed, self.context.threads)
        return timings["fp32"].median_us, timings["int8"].median_us, timings["int8"].speedup


def _reduce_range(config: Int8Config) -> dict[str, Any]:
    """Whether kernel weights are 7-bit, and why (reported: the same recipe gives other bytes on
    a CPU without VNNI)."""
    if config.reduce_range != "auto":
        return {"used": bool(config.reduce_range), "why": "set in the recipe"}
    if int8_pairs_saturate():
        return {"used": True, "why": "AVX2 without VNNI: u8 x s8 pair sums saturate int16 (VPMADDUBSW)"}
    return {"used": False, "why": "this CPU has int8 dot products (VNNI/AMX) or no AVX2: no saturation"}


def _placement(config: Int8Config, kernels_wanted: bool) -> str:
    if config.mode == "weight_only" or not kernels_wanted:
        return "weight_only"
    if config.mode != "auto":
        return config.mode
    return "measured" if config.placement == "measure" else "rule"


def _without(targets: list[Target], methods: set[str]) -> list[Target]:
    return [
        replace(t, uses=[replace(u, method="weight_only") if u.method in methods else u for u in t.uses])
        for t in targets
    ]


# --------------------------------------------------------------------------- preparation


def _prepare(model: ir.Model, fold_bn: bool) -> tuple[ir.Model, int]:
    """A copy of the model (tensors shared, never mutated) with weights lifted and BN folded."""
    work = model.clone()
    normalize(work)
    if not fold_bn:
        return work, 0
    names = Names(work)
    return work, sum(fold_batchnorm(graph, names) for graph in list(iter_graphs(work)))


def _serializable_bytes(model: ir.Model) -> bytes | None:
    """The input model's bytes for checks, or None when checking would hold too much in memory
    (the bytes plus two ORT sessions: several times the model)."""
    if initializer_bytes(model) > CHECK_MAX_BYTES:
        return None
    return to_bytes(model)


