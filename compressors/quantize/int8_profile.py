"""What the int8 pass learns from the calibration feeds before it places kernels: the feed that
latency is judged on, activation shapes, static-QDQ ranges (by the recipe's calibration method),
per-channel maxima of normalization outputs (for smoothing) and per-channel means of biased layers'
inputs (for bias correction, padding left out)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from modelpress.compressors import calibration, synthetic
from modelpress.compressors.errors import InputError
from modelpress.compressors.model import EXTERNAL_DATA_THRESHOLD
from modelpress.compressors.model_inputs import model_inputs
from modelpress.compressors.pipeline import Feed, PassContext
from modelpress.compressors.quantize import bias_correction, smoothing
from modelpress.compressors.quantize.int8_place import Target, static_output
from modelpress.compressors.quantize.ort_probe import FirstShape, inferred_shapes, latency_feed
from modelpress.kernels import quant

if TYPE_CHECKING:
    from modelpress.compressors.quantize.int8 import Int8Config

# Calibration captures this many activations per ORT run, so memory stays a few layers' worth.
CAPTURE_GROUP = 16


@dataclass
class Profile:
    """What the calibration feeds showed: activation shapes and (for static QDQ) ranges."""

    feeds: list[Feed] = field(default_factory=list)
    latency_feed: Feed | None = None  # the input latency is judged on (see latency_feed)
    synthesized: bool = False
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    channel_max: dict[str, np.ndarray] = field(default_factory=dict)  # normalization outputs, for smoothing
    channel_mean: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)  # biased layers' inputs
    note: str | None = None


def build_profile(model: ir.Model, targets: list[Target], config: Int8Config, context: PassContext,
                  calibrate: bool) -> Profile:
    """Feeds (given or synthesized), activation shapes, and ranges of static-QDQ candidates."""
    profile = Profile()
    feeds = [dict(f) for f in context.calibration or []]
    if not feeds:
        try:
            dataset = synthetic.synthesize(model_inputs(ir.to_proto(model)), samples=1, seed=context.seed)
        except InputError as exc:
            profile.note = f"no calibration data, and none can be synthesized ({exc}): int8 kernels not used"
            return profile
        feeds, profile.synthesized = dataset.feeds, True
    profile.feeds = feeds
    profile.latency_feed = latency_feed(model, feeds[0], config.latency_batch)
    if not calibrate:
        return profile
    proto = ir.to_proto(model)
    if proto.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        profile.note = "model too large to calibrate in memory: int8 kernels not used"
        profile.feeds = []
        return profile
    profile.shapes.update(inferred_shapes(proto, profile.latency_feed))  # subgraph values too

    # Main-graph activations: the input of every MatMul/Gemm/Conv using a target (its shape on
    # the latency feed decides the kernel), and for static-QDQ candidates the ranges of input
    # and output over all feeds.
    main_nodes = list(model.graph)
    shapes: dict[str, FirstShape] = {}
    ranges: dict[str, quant.MinMaxObserver] = {}
    channel_max: dict[str, smoothing.ChannelAbsMax] = {}
    channel_mean: dict[tuple[str, int], bias_correction.ChannelMean] = {}
    for target in targets:
        for use in target.uses:
            if use.node[0] != 0 or use.op_type not in ("MatMul", "Gemm", "Conv"):
                continue
            node = main_nodes[use.node[1]]
            activation, out = node.inputs[0], static_output(node)
            if activation is None or not activation.name or activation.is_initializer():
                continue
            if config.bias_correction and not profile.synthesized \
                    and bias_correction.bias_of(node, use.input_index) is not None:
                axis = bias_correction.channel_axis(use.op_type)
                channel_mean.setdefault((activation.name, axis), bias_correction.ChannelMean(axis))
            shapes.setdefault(activation.name, FirstShape())
            static_possible = (use.op_type == "Conv" and config.mode in ("auto", "static")) or (
                use.op_type == "MatMul" and config.mode == "static"
            )
            if static_possible and out is not None and not profile.synthesized:
                for name in (activation.name, out.name):
                    ranges.setdefault(name, quant.MinMaxObserver())
            smoothable = use.op_type in ("MatMul", "Gemm") and config.mode in ("auto", "dynamic")
            if smoothable and config.smoothing is not None and not profile.synthesized \
                    and smoothing.normalization_output(activation):
                channel_max.setdefault(activation.name, smoothing.ChannelAbsMax())
    capture_options = dict(threads=context.threads, progress=context.progress, values_per_run=CAPTURE_GROUP)
    try:
        calibration.capture(model, list(shapes.items()), [profile.latency_feed], **capture_options)
        calibration.capture(model, list(ranges.items()) + list(channel_max.items()), feeds, **capture_options)
        if channel_mean:  # a run of its own: its means leave padding out, the ranges keep it
            masks = calibration.padding_masks(feeds, config.padding_mask)
            calibration.capture(model, [(name, mean) for (name, _), mean in channel_mean.items()], feeds,
                                row_masks=masks, **capture_options)
        if config.calibration != "minmax":
            histograms = {n: quant.HistogramObserver(*o.range()) for n, o in ranges.items() if o.seen}
            calibration.capture(model, list(histograms.items()), feeds, **capture_options)
            profile.ranges = {n: h.range(config.calibration, config.percentile)
                              for n, h in histograms.items()}
        else:
            profile.ranges = {n: o.range() for n, o in ranges.items() if o.seen}
    except Exception as exc:  # an ORT failure must not fail the pass: weight-only still works
        profile.note = f"calibration run failed ({type(exc).__name__}: {str(exc)[:200]}): int8 kernels not used"
        profile.feeds = []
        return profile
    profile.shapes.update({n: r.shape for n, r in shapes.items() if r.shape is not None})
    profile.channel_max = {n: r.value for n, r in channel_max.items() if r.value is not None}
    profile.channel_mean = {key: r.value for key, r in channel_mean.items() if r.value is not None}
    return profile
