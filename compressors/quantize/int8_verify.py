"""The int8 pass's safety net: each attempt (int8 kernels, then without static QDQ, then weight-only)
is built and checked against the input model on the calibration feeds, and the first that agrees
(and, with ``never_slower``, is not slower) is kept.

When the int8 kernels miss the output check, attempts that give the fp32 kernel back to only the
layers adding the most output error come before the coarser fallbacks. Weight-only is last and
always kept: it runs the input model's fp32 kernels.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from modelpress.compressors.model import to_bytes
from modelpress.compressors.pipeline import Feed
from modelpress.compressors.quantize.int8_emit import apply_plan
from modelpress.compressors.quantize.int8_place import Target
from modelpress.compressors.quantize.ort_probe import fidelity, latency_feed, time_models, value_errors

if TYPE_CHECKING:  # the pass module imports this one
    from modelpress.compressors.quantize.int8 import Int8Config
    from modelpress.compressors.quantize.int8_profile import Profile

# ``never_slower``: the int8 kernels go when the whole model is slower than the input model by more
# than timing noise: paired median latency ratio above this, and the best times agreeing.
SLOWER_RATIO = 1.05
# Partial fallback: the shares of kernel layers (largest added error first) given back their fp32
# kernel, in turn, when the int8 kernels miss the output check; ranked on this many samples. The
# first share that passes is kept, so the ladder starts small: on all-MiniLM-L6-v2 one FFN output
# projection adds three times the error of any other layer.
FALLBACK_SHARES = (0.05, 0.125, 0.25, 0.5)
FALLBACK_SAMPLES = 8


def build_checked(attempts, profile: Profile, reference: bytes | None, decisions: list[dict[str, Any]],
                  config: Int8Config, threads: int, reduce_range: bool):
    """Build each attempt in turn (int8 kernels, then without static QDQ, then weight-only) and
    keep the first whose outputs agree with the input model and (``never_slower``) that is not
    slower than it. When the outputs of the first attempt miss, attempts that keep the fp32
    kernel only for the layers adding the most output error (a twentieth, an eighth, a quarter, then half of them) come
    first. Weight-only is last and always kept: it runs the input model's fp32 kernels.
    Returns ``(model, plan, verification)``."""
    verification: dict[str, Any] = {"checked": False, "reverted": []}
    queue = list(attempts)
    why: dict[tuple[str, str], str] = {}  # (tensor, node) -> why its kernel went, for partial fallbacks
    partial_tried = False
    missed = None
    while queue:
        label, source, plan = queue.pop(0)
        built = source.clone()
        emitted = apply_plan(built, plan, profile.ranges, config, profile.channel_max, reduce_range,
                             profile.channel_mean)
        verification["smoothed"] = emitted["smoothed"]
        verification["bias_corrected"] = emitted["bias_corrected"]
        verification["per_tensor"] = emitted["per_tensor"]
        if reference is None or not profile.feeds:
            return built, plan, verification
        candidate = to_bytes(built)
        agreement = fidelity(reference, candidate, profile.feeds, threads)
        verification.update(agreement, checked=True)
        outputs_missed = _missed(agreement, config)
        if label == "weight-only":
            outputs_missed = None
        elif outputs_missed is None and config.never_slower and config.mode == "auto":
            missed = _slower(reference, candidate, profile.latency_feed, verification, threads)
        else:
            missed = outputs_missed
        if label == "weight-only" or missed is None:
            _settle(decisions, plan, why, missed_before=verification["reverted"])
            return built, plan, verification
        verification["reverted"].append(f"{label}: {missed}")
        if outputs_missed is not None and not partial_tried:
            partial_tried = True
            queue[0:0] = _partial_fallbacks(source, plan, reference, candidate, profile, verification, why, threads)
    raise AssertionError("the weight-only attempt always returns")


def _partial_fallbacks(source: ir.Model, plan: list[Target], reference: bytes, candidate: bytes,
                       profile: Profile, verification: dict[str, Any], why: dict[tuple[str, str], str],
                       threads: int):
    """Attempts that give the fp32 kernel back to the main-graph layers adding the most output
    error: each layer's relative output error minus its input's (what it adds, not what it
    inherits), measured on a few calibration samples."""
    nodes = list(source.graph)
    kernel_uses = [(t, u) for t in plan for u in t.uses if u.method != "weight_only" and u.node[0] == 0]
    if len(kernel_uses) < 2:
        return []
    pairs = {}
    for target, use in kernel_uses:
        node = nodes[use.node[1]]
        pairs[(target.name, use.node_name)] = (node.inputs[0].name, node.outputs[0].name)
    feed = latency_feed(source, profile.feeds[0], FALLBACK_SAMPLES)
    names = sorted({n for pair in pairs.values() for n in pair})
    try:
        errors = value_errors(reference, candidate, names, feed, threads)
    except Exception:  # the ranking is an optimisation: without it, weight-only follows
        return []
    added = {key: errors.get(out, 0.0) - errors.get(inp, 0.0) for key, (inp, out) in pairs.items()}
    ranked = sorted(added, key=lambda key: (-added[key], key))
    verification["layer_added_error"] = {f"{node} ({tensor})": round(added[(tensor, node)], 5)
                                         for tensor, node in ranked[:10]}
    attempts, taken = [], set()
    for share in FALLBACK_SHARES:
        count = max(1, int(np.ceil(len(ranked) * share)))
        if count >= len(ranked) or count in taken:
            continue
        taken.add(count)
        worst = set(ranked[:count])
        for key in worst:
            why.setdefault(key, f"fp32 kernel kept: among the {count} layers adding the most output error "
                                f"({added[key]:.4f})")
        partial = [replace(t, uses=[replace(u, method="weight_only") if (t.name, u.node_name) in worst else u
                                    for u in t.uses]) for t in plan]
        attempts.append((f"int8 kernels except the {count} layers adding the most error", source, partial))
    return attempts


def _slower(reference: bytes, candidate: bytes, feed: Feed, verification: dict[str, Any], threads: int) -> str | None:
    """Why the candidate is slower than the reference, or None: the verdict of two timings that agree,
    else of the third. One short timing is a few dozen runs; a burst of load from other processes
    flipped it both ways (SqueezeNet's static int8 kernels, 1.6x slower on AVX2 without VNNI, once
    timed 0.97x and were kept)."""
    verdicts = []
    while len(verdicts) < 2 or (len(verdicts) == 2 and verdicts[0] != verdicts[1]):
        timings = time_models({"original": reference, "int8": candidate}, feed, threads)
        int8 = timings["int8"]
        verification["latency_us"] = {k: round(t.median_us, 2) for k, t in timings.items()}
        verification["latency_ratio"] = round(int8.ratio, 3)
        verdicts.append(int8.ratio > SLOWER_RATIO and int8.min_ratio > 1.0)
    # One list per attempt timed, in order: a later attempt must not hide why an earlier one went.
    verification.setdefault("latency_verdicts", []).append(["slower" if v else "not slower" for v in verdicts])
    if sum(verdicts) * 2 < len(verdicts):
        return None
    return f"whole model {int8.ratio:.2f}x the input model's latency (> {SLOWER_RATIO}; {sum(verdicts)} of {len(verdicts)} timings)"


def _missed(fidelity: dict[str, Any], config: Int8Config) -> str | None:
    agreement = fidelity.get("agreement")
    if agreement is not None and agreement < config.min_agreement:
        return f"top-1 agreement {agreement:.4f} < {config.min_agreement}"
    features = fidelity.get("outputs") == "features"
    limit = config.min_feature_cosine if features else config.min_cosine
    if fidelity["cosine"] < limit:
        return f"{'feature' if features else 'output'} cosine {fidelity['cosine']:.5f} < {limit}"
    return None


def _settle(decisions: list[dict[str, Any]], plan: list[Target], why: dict[tuple[str, str], str],
            missed_before: list[str]) -> None:
    """Make the decision records say what the kept plan does, and why a kernel was given up."""
    final = {(t.name, u.node_name): u.method for t in plan for u in t.uses}
    for record in decisions:
        method = final.get((record["tensor"], record["node"]))
        if method is None or method == record["method"]:
            continue
        reason = why.get((record["tensor"], record["node"])) or (missed_before[-1] if missed_before else "reverted")
        record["method"] = method
        record["reason"] += f"; dropped: {reason}"
