"""int8 quantization, placed per op where ONNX Runtime's CPU provider runs it fastest.

before: a float model — weights of MatMul / Gemm / Conv / ConvTranspose / Gather in the main graph
and in If/Loop/Scan subgraphs (``normalize`` has already lifted Constant-node weights).
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

Why, measured here (ORT 1.32 CPU, AVX512-VNNI + AMX, 1 thread, µs per run, median of 15
interleaved rounds; ``benchmarks/int8_placement.py`` prints these tables). Cast*scale is the
weight-only form: it measured equal to fp32 everywhere, being the same kernel after folding.

    MatMul [M,K]x[K,N]   fp32  Cast*scale  DQ->MatMul  dynamic  static
    1x64x300              8.9      9.1        12.2       13.8     12.9
    64x64x300            22.9     22.4        67.2       19.1     24.8
    64x300x100           34.1     34.1        62.1       19.8     20.6
    64x100x10             8.4      8.5        14.6       10.8     11.8
    512x256x64          116.7    112.4       256.3       74.0     73.3
    1x768x768            79.3     83.0        20.4       23.9     22.0
    128x768x768         984.8    985.2      1316.3      180.2    193.0
    128x768x3072       3966.6   3982.5      5089.1      664.6    762.6

    Conv 3x3 + ReLU (batch, Cin->Cout, HxW)  fp32  Cast*scale  DQ->Conv  ConvInteger  static
    64, 1->16, 8x8                           49.0     47.9       79.0      729.2      256.2
    1, 16->32, 8x8                           19.7     18.3       31.4       85.8       17.9
    64, 16->32, 8x8                         474.1    474.0     1151.8     4306.1      304.5
    1, 32->64, 32x32                        343.3    340.7      569.6     2989.3      150.0
    1, 64->64, 56x56                       1572.6   1562.6     2288.1    10478.6      575.9
    1, 128->128, 14x14                      371.9    370.1      593.8     2455.8      111.8

Static MatMul (QLinearMatMul) never beat dynamic, so ``auto`` uses dynamic for MatMul/Gemm.

So an int8 kernel wins for large ops and loses for small ones (fixed quantize / layout overheads,
ORT's fp32 Conv/Gemm+ReLU fusion, narrow outputs). ``mode: auto`` therefore stores every weight
int8 (``weight_only``), then switches an op to its int8 kernel (dynamic for MatMul/Gemm, static QDQ
for Conv when there is calibration data) where it pays at the shapes latency is judged on: one
sample of the first calibration feed when the batch axis is dynamic (as the benchmark times it),
else that feed (tiny models at batch 1 therefore stay weight-only: the same kernels as fp32).
Where it pays is decided by

* ``placement: rule`` (default) — by the size rule fitted to the tables above (``RULE_*``): the same
  inputs give the same bytes on every run, which the CLI promises.
* ``placement: measure`` — by timing the op alone in fp32 and with its kernel on this machine
  (interleaved rounds), keeping kernels at least ``MIN_OP_SPEEDUP`` faster: adapts to the CPU, but
  timing noise can change the result from run to run.

The whole model is then checked against the input model on the calibration feeds: top-1 agreement
and cosine of the outputs, and (``never_slower``) latency. When a check fails the int8 kernels are
dropped again (static first, then all), down to weight-only, which runs the input model's kernels.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
from pydantic import Field

from modelpress.compressors import benchmark, calibration, data
from modelpress.compressors.errors import InputError
from modelpress.compressors.model import (
    EXTERNAL_DATA_THRESHOLD,
    ensure_opset,
    iter_graphs,
    normalize,
    opset_version,
    to_bytes,
)
from modelpress.compressors.pipeline import Feed, Pass, PassResult
from modelpress.compressors.selection import WeightFilterConfig, select_weights
from modelpress.kernels import quant

SUPPORTED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather")

# Per-channel DequantizeLinear needs opset 13 (DynamicQuantizeLinear 11); models below are upgraded
# only when an int8 kernel may be used — weight-only Cast+Mul runs at any opset.
KERNEL_OPSET = 13
# ``placement: measure``: an op switches to its int8 kernel only when timed at least this much
# faster than fp32 (a kernel that merely ties costs accuracy for nothing).
MIN_OP_SPEEDUP = 1.15
# ``never_slower``: the int8 kernels go when the whole model is slower than the input model by more
# than timing noise: paired median latency ratio above this, and the best times agreeing.
SLOWER_RATIO = 1.05
# ``placement: rule``, fitted to the tables in the module docstring.
RULE_DYNAMIC_MACS = 1 << 20  # M*K*N: below, quantizing the activation costs what the kernel saves
RULE_DYNAMIC_WEIGHTS = 1 << 18  # K*N: memory-bound matrix-vector products win at any M
RULE_DYNAMIC_MIN_DIM = 32  # narrow K or N (an 8-wide input projection, a 10-class head) always lost
RULE_STATIC_MACS = 1 << 21
RULE_STATIC_DEPTH = 64  # Cin/group * kh * kw: shallower convs lose to fp32's direct kernels
# Calibration captures this many activations per ORT run, so memory stays a few layers' worth.
CAPTURE_GROUP = 16
# Samples used to check outputs against the input model, and the largest model checked (the check
# holds the serialized model and two sessions in memory).
CHECK_SAMPLES = 512
CHECK_MAX_BYTES = 512 << 20
# Timing: rounds per comparison and target seconds of runs per variant per round.
TIMING_ROUNDS = 9
TIMING_ROUND_SECONDS = 0.004


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
    calibration: Literal["minmax", "percentile"] = Field(
        "minmax", description="activation range estimator for static QDQ"
    )
    percentile: float = Field(
        99.99, gt=50.0, le=100.0, description="calibration percentile: each tail of the range loses (100 - p) %"
    )
    # include / exclude globs from WeightFilterConfig. min_elements 128: below it the per-channel
    # scales and the two extra nodes cost about what int8 saves.
    min_elements: int = Field(128, ge=1, description="smaller tensors are left as they are")
    op_types: tuple[Literal["MatMul", "Gemm", "Conv", "ConvTranspose", "Gather"], ...] = SUPPORTED_OPS
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
    min_cosine: float = Field(0.999, ge=-1.0, le=1.0, description="output cosine needed to keep int8 kernels")


# --------------------------------------------------------------------------- plan


NodeKey = tuple[int, int]  # (graph index in iter_graphs order, node index in that graph)


@dataclass
class Use:
    """One consumer of a quantized weight, and how it will consume it."""

    node: NodeKey
    node_name: str
    op_type: str
    input_index: int
    method: str = "weight_only"
    kernel: str | None = None  # the int8 kernel this use may run ("dynamic" | "static")
    why_not: str | None = None  # why it may not, if it may not


@dataclass
class Target:
    """One weight tensor to store as int8 (once, however many nodes use it)."""

    graph: int
    name: str
    axis: int | None
    uses: list[Use]

    @property
    def op_types(self) -> str:
        return "+".join(sorted({u.op_type for u in self.uses}))

    @property
    def methods(self) -> str:
        return "+".join(sorted({u.method for u in self.uses}))


@dataclass
class Profile:
    """What the calibration feeds showed: activation shapes and (for static QDQ) ranges."""

    feeds: list[Feed] = field(default_factory=list)
    latency_feed: Feed | None = None  # the input latency is judged on (see _latency_feed)
    synthesized: bool = False
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    note: str | None = None


class Int8Quantize(Pass):
    name = "int8"
    stage = "quantize"
    config_cls = Int8Config
    summary = "int8 quantization, placed per op where the CPU runs it faster"

    def call(self, model: ir.Model) -> PassResult:
        config: Int8Config = self.config
        notes: list[str] = []
        reference = _serializable_bytes(model)  # the input model, to check the result against
        if reference is None:
            notes.append(f"weights over {CHECK_MAX_BYTES >> 20} MB: outputs not checked against the input model")

        base, folded = _prepare(model, config.fold_batchnorm)
        targets, skipped = _select_targets(base, config)
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
                targets, _ = _select_targets(prepared, config)

        profile = self._profile(prepared, targets, calibrate=kernels_wanted)
        if profile.note:
            notes.append(profile.note)
        decisions: list[dict[str, Any]] = []
        if kernels_wanted:
            _mark_kernel_candidates(prepared, targets, config, profile)
            decisions = self._place(prepared, targets, profile)

        attempts: list[tuple[str, ir.Model, list[Target]]] = []
        if any(u.method != "weight_only" for t in targets for u in t.uses):
            attempts.append(("int8 kernels", prepared, targets))
            if any(u.method == "static" for t in targets for u in t.uses):
                attempts.append(("without static QDQ", prepared, _without(targets, {"static"})))
        # Weight-only needs no opset upgrade: it is built from the model as it came in.
        attempts.append(("weight-only", base, _select_targets(base, config)[0]))
        quantized, final, verification = self._build_checked(attempts, profile, reference, decisions)

        counts: dict[str, Counter] = defaultdict(Counter)
        for target in final:
            counts[target.op_types][target.methods] += 1
        bytes_before = _initializer_bytes(model)
        bytes_after = _initializer_bytes(quantized)
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
                "latency_batch": _batch(profile.latency_feed),
                "synthesized": profile.synthesized,
                "method": config.calibration,
                "activations": len(profile.ranges),
            },
            "decisions": decisions,
            "verification": verification,
            "skipped": skipped,
            "notes": notes,
        }
        return PassResult(quantized, modified=bool(final) or folded > 0, stats=stats)

    # ----------------------------------------------------------------------- calibration

    def _profile(self, model: ir.Model, targets: list[Target], calibrate: bool) -> Profile:
        """Feeds (given or synthesized), activation shapes, and ranges of static-QDQ candidates."""
        profile = Profile()
        feeds = [dict(f) for f in self.context.calibration or []]
        if not feeds:
            try:
                dataset = data.synthesize(data.model_inputs(ir.to_proto(model)), samples=1, seed=self.context.seed)
            except InputError as exc:
                profile.note = f"no calibration data, and none can be synthesized ({exc}): int8 kernels not used"
                return profile
            feeds, profile.synthesized = dataset.feeds, True
        profile.feeds = feeds
        profile.latency_feed = _latency_feed(model, feeds[0], self.config.latency_batch)
        if not calibrate:
            return profile
        proto = ir.to_proto(model)
        if proto.ByteSize() > EXTERNAL_DATA_THRESHOLD:
            profile.note = "model too large to calibrate in memory: int8 kernels not used"
            profile.feeds = []
            return profile
        profile.shapes.update(_inferred_shapes(proto, profile.latency_feed))  # subgraph values too

        # Main-graph activations: the input of every MatMul/Gemm/Conv using a target (its shape on
        # the latency feed decides the kernel), and for static-QDQ candidates the ranges of input
        # and output over all feeds.
        main_nodes = list(model.graph)
        shapes: dict[str, _FirstShape] = {}
        ranges: dict[str, quant.MinMaxObserver] = {}
        for target in targets:
            for use in target.uses:
                if use.node[0] != 0 or use.op_type not in ("MatMul", "Gemm", "Conv"):
                    continue
                node = main_nodes[use.node[1]]
                activation, out = node.inputs[0], _static_output(node)
                if activation is None or not activation.name or activation.is_initializer():
                    continue
                shapes.setdefault(activation.name, _FirstShape())
                static_possible = (use.op_type == "Conv" and self.config.mode in ("auto", "static")) or (
                    use.op_type == "MatMul" and self.config.mode == "static"
                )
                if static_possible and out is not None and not profile.synthesized:
                    for name in (activation.name, out.name):
                        ranges.setdefault(name, quant.MinMaxObserver())
        capture_options = dict(threads=self.context.threads, progress=self.context.progress, values_per_run=CAPTURE_GROUP)
        try:
            calibration.capture(model, list(shapes.items()), [profile.latency_feed], **capture_options)
            calibration.capture(model, list(ranges.items()), feeds, **capture_options)
            if self.config.calibration == "percentile":
                histograms = {n: quant.HistogramObserver(*o.range()) for n, o in ranges.items() if o.seen}
                calibration.capture(model, list(histograms.items()), feeds, **capture_options)
                profile.ranges = {n: h.percentile_range(self.config.percentile) for n, h in histograms.items()}
            else:
                profile.ranges = {n: o.range() for n, o in ranges.items() if o.seen}
        except Exception as exc:  # an ORT failure must not fail the pass: weight-only still works
            profile.note = f"calibration run failed ({type(exc).__name__}: {str(exc)[:200]}): int8 kernels not used"
            profile.feeds = []
            return profile
        profile.shapes.update({n: r.shape for n, r in shapes.items() if r.shape is not None})
        return profile

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
                faster, why = _rule_prefers_kernel(node, use.kernel, shape)
                use.method = use.kernel if faster else "weight_only"
                record["reason"] = why
            else:
                micro = _micro_model(model, node, use, shape)
                if micro is None:
                    use.method, record["reason"] = "weight_only", "op not timeable alone (non-constant side inputs or unknown shape)"
                else:
                    micro_model, epilogue = micro
                    signature = _signature(node, target, shape, use.kernel, epilogue)
                    if signature not in timings:
                        timings[signature] = self._time_kernel(micro_model, target, use, shape, profile)
                    fp32_us, int8_us, speedup = timings[signature]
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
        _apply(int8_model, [kernel_target], profile.ranges, self.config)
        rng = np.random.default_rng(self.context.seed)
        feed = {micro.graph.inputs[0].name: rng.standard_normal(shape).astype(np.float32)}
        timings = time_models({"fp32": fp32_bytes, "int8": to_bytes(int8_model)}, feed, self.context.threads)
        return timings["fp32"].median_us, timings["int8"].median_us, timings["int8"].speedup

    # ----------------------------------------------------------------------- build + verify

    def _build_checked(self, attempts, profile: Profile, reference: bytes | None, decisions: list[dict[str, Any]]):
        """Build each attempt in turn (int8 kernels, then without static QDQ, then weight-only) and
        keep the first whose outputs agree with the input model and (``never_slower``) that is not
        slower than it. Weight-only is last and always kept: it runs the input model's fp32 kernels."""
        config: Int8Config = self.config
        verification: dict[str, Any] = {"checked": False, "reverted": []}
        for label, source, plan in attempts:
            built = source.clone()
            _apply(built, plan, profile.ranges, config)
            if reference is None or not profile.feeds:
                return built, plan, verification
            candidate = to_bytes(built)
            fidelity = _fidelity(reference, candidate, profile.feeds, self.context.threads)
            verification.update(fidelity, checked=True)
            if label == "weight-only":
                return built, plan, verification
            missed = _missed(fidelity, config)
            if missed is None and config.never_slower and config.mode == "auto":
                missed = self._slower(reference, candidate, profile.latency_feed, verification)
            if missed is None:
                return built, plan, verification
            verification["reverted"].append(f"{label}: {missed}")
            dropped = {"static"} if label == "int8 kernels" and len(attempts) == 3 else {"static", "dynamic"}
            for record in decisions:
                if record["method"] in dropped:
                    record["method"] = "weight_only"
                    record["reason"] += f"; dropped: {missed}"
        raise AssertionError("the weight-only attempt always returns")

    def _slower(self, reference: bytes, candidate: bytes, feed: Feed, verification: dict[str, Any]) -> str | None:
        """Why the candidate is slower than the reference, or None. A first verdict of "slower" is
        timed again and must repeat: a burst of load from other processes must not cost the kernels."""
        for _ in range(2):
            timings = time_models({"original": reference, "int8": candidate}, feed, self.context.threads)
            int8 = timings["int8"]
            verification["latency_us"] = {k: round(t.median_us, 2) for k, t in timings.items()}
            verification["latency_ratio"] = round(int8.ratio, 3)
            if not (int8.ratio > SLOWER_RATIO and int8.min_ratio > 1.0):
                return None
        return f"whole model {int8.ratio:.2f}x the input model's latency (> {SLOWER_RATIO})"


def _missed(fidelity: dict[str, Any], config: Int8Config) -> str | None:
    agreement = fidelity.get("agreement")
    if agreement is not None and agreement < config.min_agreement:
        return f"top-1 agreement {agreement:.4f} < {config.min_agreement}"
    if fidelity["cosine"] < config.min_cosine:
        return f"output cosine {fidelity['cosine']:.5f} < {config.min_cosine}"
    return None


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


def _prepare(model: ir.Model, fold_batchnorm: bool) -> tuple[ir.Model, int]:
    """A copy of the model (tensors shared, never mutated) with weights lifted and BN folded."""
    work = model.clone()
    normalize(work)
    if not fold_batchnorm:
        return work, 0
    names = _Names(work)
    return work, sum(_fold_batchnorm(graph, names) for graph in list(iter_graphs(work)))


def _fold_batchnorm(graph: ir.Graph, names: _Names) -> int:
    """Fold inference BatchNormalization into the Conv feeding it: W' = W*f, b' = (b-mean)*f + beta
    with f = gamma / sqrt(var + eps). Exact up to float rounding; ORT does the same at load time, so
    this only removes bytes and lets QDQ groups form around the Conv."""
    folded = 0
    for bn in list(graph):
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
            continue
        conv = bn.inputs[0].producer() if bn.inputs[0] is not None else None
        if conv is None or conv.op_type != "Conv" or conv.graph is not graph:
            continue
        if len(bn.outputs) > 1 and any(o.uses() for o in bn.outputs[1:]):
            continue
        training = bn.attributes.get("training_mode")
        if training is not None and training.value:
            continue
        conv_out = conv.outputs[0]
        if len(conv_out.uses()) != 1 or conv_out.is_graph_output():
            continue
        params = [_const(v) for v in bn.inputs[1:5]]
        weight = conv.inputs[1]
        bias = conv.inputs[2] if len(conv.inputs) > 2 else None
        w = _const(weight)
        if any(p is None for p in params) or w is None or w.dtype != np.float32:
            continue
        if len(weight.uses()) != 1 or (bias is not None and (_const(bias) is None or len(bias.uses()) != 1)):
            continue
        gamma, beta, mean, var = (p.astype(np.float32) for p in params)
        eps = bn.attributes["epsilon"].value if "epsilon" in bn.attributes else 1e-5
        factor = gamma / np.sqrt(var + np.float32(eps))
        b = _const(bias).astype(np.float32) if bias is not None else np.zeros(w.shape[0], np.float32)
        new_w = (w * factor.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
        new_b = ((b - mean) * factor + beta).astype(np.float32)
        weight.const_value = ir.Tensor(new_w, name=weight.name)
        if bias is None:
            bias = _initializer(graph, names(f"{weight.name}_bias"), new_b)
            conv.resize_inputs(3)
            conv.replace_input_with(2, bias)
        else:
            bias.const_value = ir.Tensor(new_b, name=bias.name)
        bn_out = bn.outputs[0]
        out_name = bn_out.name
        bn_out.replace_all_uses_with(conv_out, replace_graph_outputs=True)
        params_values = list(bn.inputs[1:5])
        graph.remove(bn, safe=True)
        conv_out.name = out_name  # keeps graph output names stable
        for value in params_values:
            if value is not None and value.is_initializer() and not value.uses() and value.name in graph.initializers:
                graph.initializers.pop(value.name)
        folded += 1
    return folded


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or not value.is_initializer():
        return None
    return value.const_value.numpy()


# --------------------------------------------------------------------------- selection


FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def _select_targets(model: ir.Model, config: Int8Config) -> tuple[list[Target], list[dict[str, str]]]:
    """The weights to quantize, and every float initializer left alone with the reason."""
    graphs = list(iter_graphs(model))
    graph_index = {id(g): i for i, g in enumerate(graphs)}
    node_key = {id(n): (gi, ni) for gi, g in enumerate(graphs) for ni, n in enumerate(g)}
    chosen, skipped = select_weights(model, set(config.op_types), config)
    targets: list[Target] = []
    for value in chosen:
        uses = sorted(
            (Use(node_key[id(u.node)], u.node.name or u.node.op_type, u.node.op_type, u.idx) for u in value.uses()),
            key=lambda u: u.node,
        )
        first = next(u.node for u in value.uses() if node_key[id(u.node)] == uses[0].node)
        rank = len(value.const_value.shape)
        axis = _channel_axis(first, rank) if config.per_channel else None
        targets.append(Target(graph_index[id(value.graph)], value.name, axis, uses))
    # Vectors and scalars are never weight matrices; list them too, so every float tensor left
    # float is accounted for.
    for graph in graphs:
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if tensor is not None and tensor.dtype in FLOAT_TYPES and len(tensor.shape) < 2:
                skipped.append({"tensor": name, "reason": f"rank-{len(tensor.shape)} tensor (bias, scale or constant), kept float"})
    return targets, skipped


def _channel_axis(node: ir.Node, rank: int) -> int:
    """The weight axis of the consumer's output channels (or gathered rows)."""
    op = node.op_type
    if op == "Gemm":
        return 0 if _int_attr(node, "transB") else 1
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    if op == "Gather":
        return _int_attr(node, "axis") % rank
    return rank - 1  # MatMul: [..., K, N]


def _int_attr(node: ir.Node, name: str, default: int = 0) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def _float_attr(node: ir.Node, name: str, default: float = 1.0) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.value)


def _mark_kernel_candidates(model: ir.Model, targets: list[Target], config: Int8Config, profile: Profile) -> None:
    """Set ``use.kernel`` to the int8 kernel each use could run, or ``use.why_not``."""
    graphs = list(iter_graphs(model))
    nodes = [list(g) for g in graphs]
    for target in targets:
        weight = graphs[target.graph].initializers[target.name].const_value
        for use in target.uses:
            node = nodes[use.node[0]][use.node[1]]
            use.kernel, use.why_not = None, None
            if use.op_type in ("MatMul", "Gemm"):
                static_matmul = config.mode == "static" and use.op_type == "MatMul"
                why = _static_blocker(node, use, target, weight, profile) if static_matmul else None
                if static_matmul and why is None:
                    use.kernel = "static"
                else:
                    use.why_not = _dynamic_blocker(node, use, target, weight, profile)
                    use.kernel = "dynamic" if use.why_not is None else None
            elif use.op_type == "Conv" and config.mode in ("auto", "static"):
                use.why_not = _static_blocker(node, use, target, weight, profile)
                use.kernel = "static" if use.why_not is None else None
            elif use.op_type == "Conv":
                use.why_not = "mode dynamic: ConvInteger is slower than fp32 Conv on CPU, so Conv stays weight-only"


def _dynamic_blocker(node: ir.Node, use: Use, target: Target, weight, profile: Profile) -> str | None:
    if use.input_index != 1:
        return "weight is not input B"
    if weight.dtype != ir.DataType.FLOAT or len(weight.shape) != 2:
        return "dynamic int8 needs a float32 rank-2 weight"
    activation = node.inputs[0]
    if activation is None or (activation.dtype is not None and activation.dtype != ir.DataType.FLOAT):
        return "activation is not float32"
    shape = profile.shapes.get(activation.name)
    if shape is None or len(shape) < 2:
        return "activation shape unknown or rank < 2"
    n_axis = 1
    if node.op_type == "Gemm":
        if _int_attr(node, "transA"):
            return "Gemm with transA"
        n_axis = 0 if _int_attr(node, "transB") else 1
        if len(node.inputs) > 2 and node.inputs[2] is not None and _float_attr(node, "beta") != 1.0:
            if _const(node.inputs[2]) is None:
                return "Gemm with a non-constant C and beta != 1"
    if target.axis is not None and target.axis != n_axis:
        return "weight shared with an op that needs another channel axis"
    return None


def _static_blocker(node: ir.Node, use: Use, target: Target, weight, profile: Profile) -> str | None:
    if use.node[0] != 0:
        return "static QDQ needs calibration; activations inside subgraphs are not captured"
    if profile.synthesized or not profile.feeds:
        return "no calibration data for static activation ranges"
    if use.input_index != 1 or weight.dtype != ir.DataType.FLOAT:
        return "static int8 needs a float32 weight as input 1"
    if node.op_type == "Conv" and len(weight.shape) != 4:
        return "QLinearConv kernel is 2-D only"
    if node.op_type == "MatMul" and len(weight.shape) != 2:
        return "static MatMul needs a rank-2 weight"
    wanted_axis = 0 if node.op_type == "Conv" else 1
    if target.axis is not None and target.axis != wanted_axis:
        return "weight shared with an op that needs another channel axis"
    out = _static_output(node)
    if out is None:
        return "output is a graph output (no room for the output QDQ that makes the op integer)"
    activation = node.inputs[0]
    if activation is None or activation.name not in profile.ranges or out.name not in profile.ranges:
        return "activation range not calibrated"
    return None


def _static_output(node: ir.Node) -> ir.Value | None:
    """The tensor whose QDQ closes a static group: the op's output, or the ReLU after it (ORT
    absorbs the ReLU into QLinearConv when the output zero point is the range minimum)."""
    out = node.outputs[0]
    if out.is_graph_output():
        return None
    uses = list(out.uses())
    if len(uses) == 1 and uses[0].node.op_type == "Relu" and uses[0].node.graph is node.graph:
        relu_out = uses[0].node.outputs[0]
        return None if relu_out.is_graph_output() else relu_out
    return out


def _rule_prefers_kernel(node: ir.Node, kernel: str, shape) -> tuple[bool, str]:
    """``placement: rule``: does the int8 kernel pay at this size (see the tables above)?"""
    rows = int(np.prod(shape[:-1])) if shape else 1
    if kernel == "dynamic":
        w = node.inputs[1].const_value.shape
        k, n = (w[1], w[0]) if node.op_type == "Gemm" and _int_attr(node, "transB") else (w[0], w[1])
        macs = rows * k * n
        ok = min(k, n) >= RULE_DYNAMIC_MIN_DIM and (macs >= RULE_DYNAMIC_MACS or k * n >= RULE_DYNAMIC_WEIGHTS)
        return ok, f"size rule: M*K*N={macs}, K*N={k * n}, N={n}"
    w = node.inputs[1].const_value.shape
    depth = w[1] * w[2] * w[3]
    macs = (shape[0] if shape else 1) * w[0] * depth * (int(np.prod(shape[2:])) if shape else 1)
    ok = depth >= RULE_STATIC_DEPTH and macs >= RULE_STATIC_MACS
    return ok, f"size rule: Cin*kh*kw={depth}, MACs~{macs}"


# --------------------------------------------------------------------------- graph edits


class _Names:
    """Fresh, deterministic value names, unique across all graphs of a model (a subgraph may not
    shadow an outer name). Nodes the pass adds stay unnamed: their outputs' names say what they
    are, and on small models every name is bytes."""

    def __init__(self, model: ir.Model):
        self.taken: set[str] = set()
        for graph in iter_graphs(model):
            self.taken.update(graph.initializers)
            self.taken.update(v.name for v in graph.inputs if v.name)
            for node in graph:
                self.taken.update(v.name for v in node.outputs if v.name)
                if node.name:
                    self.taken.add(node.name)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


@dataclass
class _Stored:
    """A weight's int8 form inside the model."""

    graph: ir.Graph
    name: str
    dtype: ir.DataType
    q: ir.Value
    params: quant.QParams
    transposed: bool
    ndim: int
    scale_1d: ir.Value | None = None
    zero_point: ir.Value | None = None
    dequantized: ir.Value | None = None  # Cast+Mul output (weight-only uses)
    dq: ir.Value | None = None  # DequantizeLinear output (static uses)
    kn: ir.Value | None = None  # int8 [K, N] for dynamic uses


def _apply(model: ir.Model, targets: list[Target], ranges: dict[str, tuple[float, float]], config: Int8Config) -> None:
    """Store each target as int8 and rewire its uses by their methods (in place)."""
    graphs = list(iter_graphs(model))
    nodes = [list(g) for g in graphs]
    names = _Names(model)
    head: dict[int, list[ir.Node]] = defaultdict(list)  # nodes to prepend to each graph (weights only)
    dynamic: list[tuple[ir.Node, Use, _Stored]] = []
    static: list[tuple[ir.Node, Use, _Stored]] = []
    for target in targets:
        graph = graphs[target.graph]
        value = graph.initializers[target.name]
        weights = value.const_value.numpy()
        use_nodes = [(nodes[u.node[0]][u.node[1]], u) for u in target.uses]
        transposed = all(u.method == "dynamic" and _int_attr(n, "transB") for n, u in use_nodes)
        stored_w = weights.T if transposed else weights
        axis = None if target.axis is None else (1 - target.axis if transposed else target.axis)
        q, params = quant.quantize_weights(np.asarray(stored_w, np.float32), axis, config.symmetric)
        stored = _Stored(graph, target.name, value.dtype, _initializer(graph, names(f"{target.name}_int8"), q),
                         params, transposed, weights.ndim)
        for node, use in use_nodes:
            if use.method == "weight_only":
                node.replace_input_with(use.input_index, _dequantized(stored, head[target.graph], names))
            elif use.method == "static":
                node.replace_input_with(use.input_index, _weight_dq(stored, head[target.graph], names))
                static.append((node, use, stored))
            else:
                dynamic.append((node, use, stored))
        graph.initializers.pop(target.name)
        if stored.dequantized is not None:
            stored.dequantized.name = target.name  # the graph reads as before: W = Cast(Wq) * scale
    for gi, new_nodes in head.items():
        graph = graphs[gi]
        first = next(iter(graph), None)
        if first is None:
            graph.extend(new_nodes)
        else:
            graph.insert_before(first, new_nodes)
    order = {id(n): (gi, ni) for gi, g in enumerate(nodes) for ni, n in enumerate(g)}
    activation_dq: dict[int, ir.Value] = {}
    for node, use, stored in sorted(static, key=lambda item: order[id(item[0])]):
        _rewrite_static(node, stored, ranges, activation_dq, names)
    dql_cache: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}
    for node, use, stored in sorted(dynamic, key=lambda item: order[id(item[0])]):
        _rewrite_dynamic(node, stored, dql_cache, names)


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    # No type/shape on the Value: the tensor carries both, and onnx-ir would otherwise write a
    # redundant value_info entry per initializer (bytes that matter on small models).
    value = ir.Value(name=name, const_value=ir.Tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value


def _scale_1d(stored: _Stored, names: _Names) -> ir.Value:
    if stored.scale_1d is None:
        stored.scale_1d = _initializer(stored.graph, names(f"{stored.name}_scale"), stored.params.scale)
    return stored.scale_1d


def _zero_point(stored: _Stored, names: _Names) -> ir.Value | None:
    if stored.params.symmetric:
        return None
    if stored.zero_point is None:
        stored.zero_point = _initializer(stored.graph, names(f"{stored.name}_zp"), stored.params.zero_point)
    return stored.zero_point


def _dequantized(stored: _Stored, head: list[ir.Node], names: _Names) -> ir.Value:
    """W = (Cast(q) - zero_point) * scale, in the weight's float type: ORT folds it at load."""
    if stored.dequantized is not None:
        return stored.dequantized
    if stored.transposed:
        raise AssertionError("weight-only use of a weight stored transposed")
    params = stored.params
    float_np = stored.dtype.numpy()
    shape = quant.broadcast_shape(params.scale, params.axis, stored.ndim)
    if shape and params.axis == stored.ndim - 1 and float_np == np.float32:
        scale = _scale_1d(stored, names)  # [N] broadcasts against [..., N]: share the kernels' scale
    else:
        scale = _initializer(stored.graph, names(f"{stored.name}_scale_w"), params.scale.reshape(shape).astype(float_np))
    cast = ir.node("Cast", [stored.q], {"to": stored.dtype})
    cast.outputs[0].name = names(f"{stored.name}_cast")
    value = cast.outputs[0]
    head.append(cast)
    if not params.symmetric:
        zero = _initializer(stored.graph, names(f"{stored.name}_zp_w"),
                            params.zero_point.astype(np.float32).reshape(shape).astype(float_np))
        sub = ir.node("Sub", [value, zero])
        sub.outputs[0].name = names(f"{stored.name}_centred")
        head.append(sub)
        value = sub.outputs[0]
    mul = ir.node("Mul", [value, scale])
    mul.outputs[0].name = names(f"{stored.name}_dequantized")
    head.append(mul)
    stored.dequantized = mul.outputs[0]
    return stored.dequantized


def _weight_dq(stored: _Stored, head: list[ir.Node], names: _Names) -> ir.Value:
    if stored.dq is None:
        inputs = [stored.q, _scale_1d(stored, names)]
        zero = _zero_point(stored, names)
        if zero is not None:
            inputs.append(zero)
        attrs = {} if stored.params.axis is None else {"axis": stored.params.axis}
        dq = ir.node("DequantizeLinear", inputs, attrs)
        dq.outputs[0].name = names(f"{stored.name}_dq")
        head.append(dq)
        stored.dq = dq.outputs[0]
    return stored.dq


def _kn(node: ir.Node, stored: _Stored, names: _Names) -> ir.Value:
    """The int8 weight as [K, N] for MatMulInteger. A Gemm transB weight is stored transposed
    when all its uses are dynamic; when it is shared with a weight-only use, a Transpose (which ORT
    constant-folds at load) turns the stored [N, K] around."""
    if node.op_type != "Gemm" or not _int_attr(node, "transB") or stored.transposed:
        return stored.q
    if stored.kn is None:
        transpose = ir.node("Transpose", [stored.q], {"perm": [1, 0]})
        transpose.outputs[0].name = names(f"{stored.name}_kn")
        stored.graph.insert_before(next(iter(stored.graph)), transpose)
        stored.kn = transpose.outputs[0]
    return stored.kn


def _rewrite_dynamic(node: ir.Node, stored: _Stored, cache: dict, names: _Names) -> None:
    """MatMul/Gemm -> DynamicQuantizeLinear + MatMulInteger + Cast + Mul(scales) [+ Add(bias)]."""
    graph = node.graph
    base = node.name or node.op_type
    x = node.inputs[0]
    key = (id(graph), id(x))  # an outer-scope input is quantized once per subgraph reading it
    if key not in cache:
        dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3)
        for output, suffix in zip(dql.outputs, ("q", "scale", "zp")):
            output.name = names(f"{x.name}_{suffix}")
        graph.insert_before(node, dql)
        cache[key] = tuple(dql.outputs)
    xq, xs, xz = cache[key]
    inputs = [xq, _kn(node, stored, names), xz]
    zero = _zero_point(stored, names)
    if zero is not None:
        inputs.append(zero)
    new: list[ir.Node] = []
    matmul = ir.node("MatMulInteger", inputs)
    matmul.outputs[0].name = names(f"{base}_int32")
    cast = ir.node("Cast", [matmul.outputs[0]], {"to": ir.DataType.FLOAT})
    cast.outputs[0].name = names(f"{base}_float")
    weight_scale = _scale_1d(stored, names)
    alpha = _float_attr(node, "alpha") if node.op_type == "Gemm" else 1.0
    if alpha != 1.0:
        weight_scale = _initializer(stored.graph, names(f"{base}_alpha_scale"),
                                    (stored.params.scale * np.float32(alpha)).astype(np.float32))
    scale = ir.node("Mul", [xs, weight_scale])
    scale.outputs[0].name = names(f"{base}_scale")
    product = ir.node("Mul", [cast.outputs[0], scale.outputs[0]])
    product.outputs[0].name = names(f"{base}_rescaled")
    new += [matmul, cast, scale, product]
    result = product.outputs[0]
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        c = node.inputs[2]
        beta = _float_attr(node, "beta")
        if beta != 1.0:
            c = _initializer(graph, names(f"{base}_beta_c"), (_const(c) * np.float32(beta)).astype(np.float32))
        add = ir.node("Add", [result, c])
        add.outputs[0].name = names(f"{base}_biased")
        new.append(add)
        result = add.outputs[0]
    graph.insert_before(node, new)
    _replace_output(node, result)


def _rewrite_static(node: ir.Node, stored: _Stored, ranges, activation_dq: dict[int, ir.Value], names: _Names) -> None:
    """Q/DQ on the op's input and on its output (or its ReLU's): ORT fuses QLinearConv/QLinearMatMul."""
    graph = node.graph
    x = node.inputs[0]
    if id(x) not in activation_dq:
        q, dq = _qdq_nodes(graph, x, ranges[x.name], names)
        graph.insert_before(node, [q, dq])
        activation_dq[id(x)] = activation_dq[id(dq.outputs[0])] = dq.outputs[0]
    node.replace_input_with(0, activation_dq[id(x)])
    out = _static_output(node)
    q, dq = _qdq_nodes(graph, out, ranges[out.name], names)
    graph.insert_after(out.producer(), [q, dq])
    for use in list(out.uses()):
        if use.node is not q:
            use.node.replace_input_with(use.idx, dq.outputs[0])
    activation_dq[id(out)] = activation_dq[id(dq.outputs[0])] = dq.outputs[0]


def _qdq_nodes(graph: ir.Graph, x: ir.Value, value_range: tuple[float, float], names: _Names) -> tuple[ir.Node, ir.Node]:
    params = quant.activation_qparams(*value_range)
    scale = _initializer(graph, names(f"{x.name}_scale"), params.scale)
    zero = _initializer(graph, names(f"{x.name}_zp"), params.zero_point)
    q = ir.node("QuantizeLinear", [x, scale, zero])
    q.outputs[0].name = names(f"{x.name}_q")
    dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero])
    dq.outputs[0].name = names(f"{x.name}_dq")
    return q, dq


def _replace_output(node: ir.Node, new: ir.Value) -> None:
    old = node.outputs[0]
    name = old.name
    new.type, new.shape = old.type, old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    node.graph.remove(node, safe=True)
    new.name = name


# --------------------------------------------------------------------------- micro models


def _micro_model(model: ir.Model, node: ir.Node, use: Use, shape) -> tuple[ir.Model, tuple[str, ...]] | None:
    """The op alone (plus the ReLU / bias Add ORT would fuse into it), as a one-input model."""
    if shape is None or any(not isinstance(d, int) or d <= 0 for d in shape):
        return None
    chain = [node]
    if use.kernel == "static":
        out = _static_output(node)
        if out is not None and out is not node.outputs[0]:
            chain.append(out.producer())
    else:
        for op in ("Add", "Relu"):
            uses = list(chain[-1].outputs[0].uses())
            if len(uses) != 1 or uses[0].node.op_type != op or uses[0].node.graph is not node.graph:
                break
            nxt = uses[0].node
            if op == "Add" and not any(_const(v) is not None for v in nxt.inputs):
                break
            chain.append(nxt)
    mapping: dict[int, ir.Value] = {}
    x = node.inputs[0]
    x_new = ir.Value(name=x.name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))
    mapping[id(x)] = x_new
    initializers: list[ir.Value] = []
    new_nodes: list[ir.Node] = []
    for old in chain:
        inputs = []
        for value in old.inputs:
            if value is None:
                inputs.append(None)
            elif id(value) in mapping:
                inputs.append(mapping[id(value)])
            elif value.const_value is not None and value.is_initializer():
                copy = ir.Value(name=value.name, const_value=value.const_value, type=value.type, shape=value.shape)
                mapping[id(value)] = copy
                initializers.append(copy)
                inputs.append(copy)
            else:
                return None
        attrs = [ir.Attr(a.name, a.type, a.value) for a in old.attributes.values()]
        new = ir.Node(old.domain, old.op_type, inputs, attrs, num_outputs=1, name=old.name)
        new.outputs[0].name = old.outputs[0].name
        mapping[id(old.outputs[0])] = new.outputs[0]
        new_nodes.append(new)
    # An Identity as the graph output keeps the op's own output internal, as it is in the model
    # (a static group needs a QDQ on it).
    identity = ir.node("Identity", [new_nodes[-1].outputs[0]], name="micro_output")
    identity.outputs[0].name = "micro_output"
    new_nodes.append(identity)
    graph = ir.Graph([x_new], [identity.outputs[0]], nodes=new_nodes, initializers=initializers,
                     opset_imports=dict(model.opset_imports), name="micro")
    micro = ir.Model(graph, ir_version=model.ir_version)
    return micro, tuple(n.op_type for n in chain[1:])


def _signature(node: ir.Node, target: Target, shape, kernel: str, epilogue) -> tuple:
    """Ops with the same signature time alike: timed once, decided alike (q/k/v projections)."""
    attrs = tuple(sorted((a.name, repr(a.value)) for a in node.attributes.values()))
    weight = tuple(node.inputs[1].const_value.shape)
    return (node.op_type, attrs, weight, tuple(shape), kernel, epilogue, target.axis)


# --------------------------------------------------------------------------- running ORT


def _session(model_bytes: bytes, threads: int):
    import onnxruntime as ort

    return ort.InferenceSession(model_bytes, benchmark.session_options(threads), providers=["CPUExecutionProvider"])


def _model_feed(session, feed: Feed) -> Feed:
    names = {i.name for i in session.get_inputs()}
    return {k: v for k, v in feed.items() if k in names}


@dataclass(frozen=True)
class Timing:
    """Timings of one model against the first model of a ``time_models`` call."""

    median_us: float
    min_us: float
    ratio: float  # median over rounds of (this model's time / the first model's time that round)
    min_ratio: float  # best time / the first model's best time

    @property
    def speedup(self) -> float:
        """The first model's time over this one's, by the more pessimistic of the two estimators:
        the paired median resists short load spikes, the minimum resists sustained load."""
        return 1.0 / max(self.ratio, self.min_ratio)


def time_models(models: dict[str, bytes], feed: Feed, threads: int, rounds: int = TIMING_ROUNDS) -> dict[str, Timing]:
    """Time each model on ``feed``; rounds are interleaved (A, B, A, B, ...), so load from other
    processes hits all variants alike instead of biasing one."""
    sessions = {k: _session(b, threads) for k, b in models.items()}
    feeds = {k: _model_feed(s, feed) for k, s in sessions.items()}
    reps = 1
    for key, session in sessions.items():
        for _ in range(2):
            session.run(None, feeds[key])  # warm-up (allocations, first-run caches)
        start = time.perf_counter()
        session.run(None, feeds[key])
        once = max(time.perf_counter() - start, 1e-6)
        reps = max(reps, min(1000, int(TIMING_ROUND_SECONDS / once) + 1))
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for key, session in sessions.items():
            start = time.perf_counter()
            for _ in range(reps):
                session.run(None, feeds[key])
            times[key].append((time.perf_counter() - start) / reps * 1e6)
    first = np.array(times[next(iter(times))])
    result = {}
    for key, values in times.items():
        v = np.array(values)
        result[key] = Timing(float(np.median(v)), float(v.min()), float(np.median(v / first)), float(v.min() / first.min()))
    return result


def _fidelity(reference: bytes, candidate: bytes, feeds: list[Feed], threads: int) -> dict[str, Any]:
    """Top-1 agreement (outputs shaped [..., classes]) and cosine of all outputs vs the reference."""
    ref_session, cand_session = _session(reference, threads), _session(candidate, threads)
    agree, counted, samples = 0.0, 0, 0
    dot = ref_norm = cand_norm = 0.0
    for feed in feeds:
        if samples >= CHECK_SAMPLES:
            break
        refs = ref_session.run(None, _model_feed(ref_session, feed))
        cands = cand_session.run(None, _model_feed(cand_session, feed))
        samples += max((len(v) for v in feed.values() if np.ndim(v) > 0), default=1)
        for r, c in zip(refs, cands):
            r, c = np.asarray(r), np.asarray(c)
            if not np.issubdtype(r.dtype, np.floating):
                continue
            a = quant.agreement(r, c)
            if a is not None:
                rows = int(np.prod(r.shape[:-1]))
                agree += a * rows
                counted += rows
            r64, c64 = r.astype(np.float64).ravel(), c.astype(np.float64).ravel()
            dot += float(r64 @ c64)
            ref_norm += float(r64 @ r64)
            cand_norm += float(c64 @ c64)
    norm = np.sqrt(ref_norm * cand_norm)
    return {
        "samples": samples,
        "agreement": round(agree / counted, 6) if counted else None,
        "cosine": round(float(dot / norm), 6) if norm > 0 else 1.0,
    }


def _latency_feed(model: ir.Model, feed: Feed, batch: int | None = None) -> Feed:
    """What latency is judged on, as the benchmark does (``Dataset.latency_feed``): one sample (or
    ``batch`` samples, repeating the feed if it is shorter) of the first feed when every input has
    the same dynamic leading (batch) axis, else the feed as is. Int8 kernels that pay on a batch
    of 64 can lose on one sample, where their fixed overheads dominate."""
    inputs = [v for v in model.graph.inputs if v.name in feed]
    leading = {np.shape(feed[v.name])[0] if np.ndim(feed[v.name]) else None for v in inputs}
    dynamic = all(v.shape is not None and len(v.shape) > 0 and not isinstance(v.shape[0], int) for v in inputs)
    if not (inputs and dynamic and len(leading) == 1 and None not in leading):
        return feed
    rows = np.arange(batch or 1) % leading.pop()
    return {name: np.asarray(array)[rows] for name, array in feed.items()}


def _batch(feed: Feed | None) -> int | None:
    if not feed:
        return None
    return int(max((np.shape(a)[0] for a in feed.values() if np.ndim(a)), default=1))


def _inferred_shapes(proto: onnx.ModelProto, feed: Feed) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of every value (subgraphs included) by ONNX shape inference with the graph
    inputs fixed to ``feed``'s shapes; values whose shape stays symbolic are left out."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    for value in model.graph.input:
        if value.name in feed:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for d in np.shape(feed[value.name]):
                dims.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference is a convenience here: without it subgraph ops keep weight-only
        return {}
    shapes: dict[str, tuple[int, ...]] = {}

    def visit(graph: onnx.GraphProto) -> None:
        for info in list(graph.value_info) + list(graph.output) + list(graph.input):
            tensor = info.type.tensor_type
            if tensor.HasField("shape") and all(d.HasField("dim_value") for d in tensor.shape.dim):
                shapes[info.name] = tuple(int(d.dim_value) for d in tensor.shape.dim)
        for node in graph.node:
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
                    visit(sub)

    visit(inferred.graph)
    return shapes


class _FirstShape:
    """A calibration reduction that keeps only the shape of the first array it sees."""

    def __init__(self) -> None:
        self.shape: tuple[int, ...] | None = None

    def update(self, batch: np.ndarray) -> None:
        if self.shape is None:
            self.shape = tuple(int(d) for d in np.shape(batch))


def _serializable_bytes(model: ir.Model) -> bytes | None:
    """The input model's bytes for checks, or None when checking would hold too much in memory
    (the bytes plus two ORT sessions: several times the model)."""
    if _initializer_bytes(model) > CHECK_MAX_BYTES:
        return None
    return to_bytes(model)


def _initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for g in iter_graphs(model) for v in g.initializers.values() if v.const_value is not None)
