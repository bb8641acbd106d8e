"""Structured pruning: remove whole output channels / hidden units, so tensors really shrink.

before: a model with Conv / Gemm / MatMul layers (e.g. Conv-BN-ReLU stacks, MLP hidden layers,
transformer FFN intermediate units, attention heads).
after:  the same graph with the least important channels of every prunable dependency group
removed: the producing weights lose rows (and biases, BatchNorm entries, per-channel constants),
the consuming Conv / Gemm / MatMul weights lose the matching input slices (``Flatten``ed features
included), depthwise Convs lose the matching channels and their ``group``. Attention heads (q/k/v
projections reshaped to [.., heads, head_dim]) are removed whole, with the Reshape targets updated
(``head_ratio``): constant targets, and targets torch computes at run time with dynamic axes
(Shape -> Gather -> Unsqueeze -> Concat: the constant heads pieces change, -1 stays). Fewer FLOPs
and bytes; the model still passes the ONNX checker and runs in stock onnxruntime. Groups are
found by ``structured_groups.py``; groups that cannot be pruned safely are listed in ``skipped``
with why; constants shared with untouched nodes are copied (``copied``).

Importance of channel c in a group (higher = kept):
- ``l1`` / ``l2``: the norm of c's producing weights (scaled by a following BatchNorm's
  |gamma|/sqrt(var+eps), which is what the channel really outputs), each source normalized by its
  mean so tied layers weigh alike;
- ``activation`` (needs --data, else falls back to ``l2`` with a note): ||x_c|| over the calibration
  data times the norm of the consumer weights c multiplies — the size of c's contribution to the
  next layer (Wanda's criterion at channel granularity).
Ties are broken by position, so the result is deterministic.

How many channels each group loses: ``ratio`` of every group (``allocation: uniform``), or with --data
(``allocation: sensitivity``, ``structured_allocation.py``) each group's own share, from the output
change measured when it alone is cut at 25 / 50 / 75 %, leaving no more estimated time (or
multiply-adds, or parameters: ``allocation_cost``) than the uniform ratio would.

With --data (``compensate``), each removed channel's mean output is folded into the next layer's
bias (``structured_bias.py``) and the activation criterion ranks channels by their variation around
that mean; at ratio 0.5 this kept 5.5 pp more of the digits MLP's accuracy before recovery and 2 pp
of the CNN's. Attention heads are not compensated (it cost accuracy there).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import onnx_ir as ir
from modelpress.compressors.pipeline import Pass, PassResult
from modelpress.compressors.prune.structured_bias import (
    ChannelStats,
    drop_if_unused,
    fold_means,
    unique_name,
)
from modelpress.compressors.prune.structured_constants import slice_constants
from modelpress.compressors.prune.structured_groups import ChannelGroup, find_groups
from modelpress.compressors.prune.structured_split import apply_split_sizes
from modelpress.compressors.prune.structured_walk import (
    Consumer,
    Place,
    attr_value,
    constant,
)
from modelpress.compressors.selection import WeightFilterConfig, matches
from pydantic import Field


class StructuredConfig(WeightFilterConfig):
    ratio: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of each group's channels / units removed")
    head_ratio: float | None = Field(None, ge=0.0, lt=1.0, description="fraction of attention heads removed; None: ratio")
    criterion: Literal["l1", "l2", "activation"] = Field(
        "activation", description="importance: weight norm (l1, l2) or activation x weight (needs --data)")
    # Measured on the digits CNN (ORT 1.32, AVX-512 CPU, batch 64): Convs keeping 26/28 channels ran
    # 1.5x slower than the same Convs keeping 32 (ORT's blocked NCHWc kernels work in blocks of 8 or
    # 16 channels); 16 was no faster than 8; for MatMul/Gemm the rounding made no difference.
    round_to: int = Field(8, ge=1, description="kept channel counts are rounded up to a multiple of this")
    min_channels: int = Field(1, ge=1, description="every group keeps at least this many channels")
    # Unlike unstructured passes, a small layer (a first 3x3 conv) is worth pruning: its outputs feed
    # the next, larger layer, which shrinks with it.
    min_elements: int = Field(1, ge=1, description="groups whose producing weights are smaller are left alone")
    compensate: bool = Field(True, description="with --data: fold removed channels' mean outputs into the next biases")
    # sensitivity: each group is measured alone at 25 / 50 / 75 % (structured_allocation.py) and the
    # shares leave what uniform ``ratio`` would (allocation_cost); attention heads keep head_ratio.
    allocation: Literal["uniform", "sensitivity"] = Field(
        "uniform", description="every group loses ratio of its channels, or (with --data) each its own share by measured sensitivity")
    # latency: multiply-adds plus memory traffic of the cut values (structured_allocation.py). By
    # parameters the allocation kept YOLOv8n's high-resolution layers wide (p50 0.73x of the original,
    # uniform 0.50x, same size); by multiply-adds alone PP-LCNet ran 0.54x against uniform's 0.29x.
    allocation_cost: Literal["latency", "flops", "parameters"] = Field(
        "latency", description="what allocation: sensitivity keeps at the uniform ratio's level: estimated "
        "time (multiply-adds + memory traffic), multiply-adds or parameters")
    padding_mask: str | None = Field("attention_mask", description="a [batch, seq] 0/1 input marking real positions: "
                                      "sensitivity is measured on them only")


def kept_count(channels: int, config: StructuredConfig, unit: int = 1, ratio: float | None = None) -> int:
    """Units (channels, or heads of ``unit`` channels) kept: kept channels are a multiple of round_to."""
    if ratio is None:
        ratio = config.head_ratio if unit > 1 and config.head_ratio is not None else config.ratio
    keep = channels - math.floor(ratio * channels + 1e-9)
    keep = max(keep, min(config.min_channels, channels))
    step = config.round_to // math.gcd(config.round_to, unit)
    return min(channels, -(-keep // step) * step)


class StructuredPrune(Pass):
    name = "structured"
    stage = "prune"
    config_cls = StructuredConfig
    summary = "remove whole channels / hidden units (Conv, Gemm, MatMul chains); tensors and FLOPs shrink"

    def call(self, model: ir.Model) -> PassResult:
        config: StructuredConfig = self.config
        groups, skipped = find_groups(model)
        chosen: list[ChannelGroup] = []
        for group in groups:
            reason = group.reason or self._filtered(group)
            if reason:
                skipped.append({"group": group.label, "reason": reason})
            else:
                chosen.append(group)
        notes: list[str] = []
        criterion = config.criterion
        if criterion == "activation" and not self.context.calibration:
            criterion = "l2"
            notes.append("criterion activation needs --data: used l2 weight norms")
        compensate = config.compensate and bool(self.context.calibration)
        captured = self._capture(model, chosen) if criterion == "activation" or compensate else {}
        deltas: dict[tuple[int, int], tuple[ir.Node, int, np.ndarray]] = {}

        params_before = _parameters(model)
        scores = {}
        for group in chosen:
            if criterion == "activation":  # compensated channels are ranked by their variation only
                scores[id(group)] = _activation_importance(group, captured, centered=compensate and group.sources[0].unit == 1)
            else:
                scores[id(group)] = _weight_importance(group, criterion)
        ratios, allocation = self._allocate(model, chosen, scores, captured, compensate, notes)
        # (node, input index) -> (node, index, {axis: removed positions}), in original coordinates
        removals: dict[tuple[int, int], tuple[ir.Node, int, dict[int, set[int]]]] = {}
        per_group: dict[str, list[int]] = {}
        removed_units: dict[int, int] = {}
        for index, group in enumerate(chosen):
            self.context.progress("structured pruning", index, len(chosen))
            keep = kept_count(group.count, config, group.sources[0].unit, ratios.get(id(group)))
            if keep == group.count:
                per_group[group.label] = [keep, group.count]
                continue
            # Heads are not compensated: on the digits transformer folding a removed head's mean output
            # into the projection bias lost 1.8 pp more than dropping it (its output follows its attention).
            folds = compensate and group.sources[0].unit == 1
            order = np.argsort(scores[id(group)], kind="stable")  # lowest first; equal scores: lowest index first
            removed = np.sort(order[: group.count - keep])
            removed_units[id(group)] = len(removed)
            per_group[group.label] = [keep, group.count]
            for source in group.sources:
                for edit in source.edits:
                    key = (id(edit.node), edit.index)
                    *_, axes = removals.setdefault(key, (edit.node, edit.index, {}))
                    axes.setdefault(edit.place.axis, set()).update(edit.place.positions(removed).tolist())
            if folds:
                for consumer in _consumers(group):
                    note = fold_means(model, consumer, removed, captured[(consumer.value.name, consumer.place)], deltas)
                    if note and note not in notes:
                        notes.append(note)
        pruned = [g for g in chosen if per_group[g.label][0] < g.count]
        copied = _apply(model, removals, deltas, pruned, removed_units)
        params_after = _parameters(model)
        stats = {
            "groups_pruned": len(pruned),
            "channels_before": sum(g.count for g in chosen),
            "channels_after": sum(per_group[g.label][0] for g in chosen),
            "parameters_before": params_before,
            "parameters_after": params_after,
            "criterion": criterion,
            "compensated_biases": len(deltas),
            "per_group": {label: f"{k}/{n}" for label, (k, n) in per_group.items()},
            "skipped": skipped,
            "copied": copied,
            "notes": notes,
            **({"allocation": allocation} if allocation else {}),
        }
        return PassResult(model, modified=bool(pruned), stats=stats)

    def _allocate(self, model: ir.Model, chosen: list[ChannelGroup], scores: dict, captured: dict, compensate: bool,
                  notes: list[str]) -> tuple[dict[int, float], dict]:
        """id(group) -> ratio under ``allocation: sensitivity`` (channel groups; heads keep head_ratio)."""
        config: StructuredConfig = self.config
        channels = [g for g in chosen if g.sources[0].unit == 1]
        if config.allocation != "sensitivity" or not channels:
            return {}, {}
        if not self.context.calibration:
            notes.append("allocation: sensitivity needs --data: every group lost the same ratio")
            return {}, {}
        from modelpress.compressors.prune.structured_allocation import allocate_ratios

        def keep(group: ChannelGroup, ratio: float | None) -> int:
            return kept_count(group.count, config, group.sources[0].unit, ratio)

        ratios, stats = allocate_ratios(model, channels, scores, _consumers, captured, compensate, keep,
                                        config.allocation_cost, self.context.calibration, self.context.threads,
                                        config.padding_mask, self.context.progress)
        stats["ratios"] = {g.label: round(ratios[id(g)], 3) for g in channels}
        return ratios, stats

    def _filtered(self, group: ChannelGroup) -> str | None:
        config: StructuredConfig = self.config
        for source in group.sources:
            if not matches(source.weight.name or "?", config.include, config.exclude):
                return f"{source.weight.name!r} excluded by include/exclude globs"
            if source.weight.const_value is not None and source.weight.const_value.size < config.min_elements:
                return f"{source.weight.name!r} has fewer than min_elements={config.min_elements} elements"
        return None

    def _capture(self, model: ir.Model, groups: list[ChannelGroup]) -> dict[tuple[str, Place], ChannelStats]:
        """Per-channel energy and per-position means of every consumer input, over the calibration feeds."""
        from modelpress.compressors.calibration import capture

        reductions = {(c.value.name, c.place): ChannelStats(c.place) for g in groups for c in _consumers(g)}
        if reductions:
            capture(model, [(name, r) for (name, _), r in reductions.items()], self.context.calibration,
                    threads=self.context.threads, progress=self.context.progress)
        return reductions


def _consumers(group: ChannelGroup) -> list[Consumer]:
    """Each consumer once (tied sources reach the same consumers)."""
    unique = {(id(c.weight.node), c.place): c for s in group.sources for c in s.consumers}
    return list(unique.values())


def _weight_importance(group: ChannelGroup, criterion: str) -> np.ndarray:
    total = np.zeros(group.count)
    for source in group.sources:
        weights = np.moveaxis(constant(source.weight).astype(np.float64), source.weight_axis, 0)
        weights = weights[source.start: source.start + source.count * source.unit]
        flat = np.abs(weights.reshape(group.count, -1))
        norms = flat.sum(axis=1) if criterion == "l1" else np.sqrt((flat * flat).sum(axis=1))
        if source.bn_scale is not None:
            norms = norms * source.bn_scale
        total += norms / max(float(norms.mean()), 1e-30)
    return total


def _activation_importance(group: ChannelGroup, captured: dict, centered: bool) -> np.ndarray:
    total = np.zeros(group.count)
    for consumer in _consumers(group):
        place = consumer.weight.place
        weights = np.moveaxis(constant(consumer.weight.value).astype(np.float64), place.axis, 0)
        weights = weights[place.offset: place.offset + place.count * place.block]
        column = (weights.reshape(place.count, -1) ** 2).sum(axis=1)
        stats = captured[(consumer.value.name, consumer.place)]
        # With compensation a channel's mean output is kept in the next bias: only its variation counts.
        score = np.sqrt((stats.centered_energy if centered else stats.energy) * column)
        total += score / max(float(score.mean()), 1e-30)
    if not total.any():  # no consumer captured (e.g. none reachable): fall back to weights
        return _weight_importance(group, "l2")
    return total


def _apply(model: ir.Model, removals: dict, deltas: dict, groups: list[ChannelGroup],
           removed: dict[int, int]) -> list[str]:
    """Slice every edited constant once (all groups' removals together, in original coordinates);
    return the names of shared constants whose pruned uses got their own sliced copies."""
    depthwise = {}
    for group in groups:
        for source in group.sources:
            for node in source.depthwise:
                weight = constant(node.inputs[1])
                depthwise[id(node)] = (node, weight.shape[0] // node.attributes["group"].value)
    copied = slice_constants(model, removals, deltas)
    for node, multiplier in depthwise.values():
        channels = constant(node.inputs[1]).shape[0]
        node.attributes["group"] = ir.AttrInt64("group", channels // multiplier)
    _rewrite_reshape_dims(model, groups, removed)
    apply_split_sizes(model, groups, removed)
    for group in groups:
        flattened = {id(node): node for source in group.sources for node in source.reshapes}
        for source in group.sources:
            for node in source.reshapes:
                if flattened.pop(id(node), None) is None:
                    continue  # another source of the group went through the same Reshape
                target = ir.Value(name=f"{node.name or 'reshape'}_flatten_shape",
                                  const_value=ir.tensor(np.array([0, -1], dtype=np.int64)))
                target.name = unique_name(model, target.name)
                target.const_value.name = target.name
                model.graph.register_initializer(target)
                old = node.inputs[1]
                node.replace_input_with(1, target)
                drop_if_unused(model, old)
            for value in source.touched:
                if not value.is_graph_input() and not value.is_graph_output():
                    value.shape = None  # stale: onnxruntime re-infers shapes at load
    return copied


def _rewrite_reshape_dims(model: ir.Model, groups: list[ChannelGroup], removed: dict[int, int]) -> None:
    """Reshape targets that split, merge or keep the channel axis (heads) shrink by the removed units
    (-1 entries stay); each rewritten node gets its own target constant (exporters share equal ones),
    or its own Concat when the target is computed (torch with dynamic axes)."""
    shrink: dict[int, tuple[ir.Node, dict[int, int]]] = {}  # Reshape -> {target position: positions removed}
    for group in groups:
        entries = {(id(node), pos): (node, pos, per_unit) for s in group.sources for node, pos, per_unit in s.reshape_dims}
        for node, pos, per_unit in entries.values():
            _, by_pos = shrink.setdefault(id(node), (node, {}))
            by_pos[pos] = by_pos.get(pos, 0) + removed[id(group)] * per_unit
    for node, by_pos in shrink.values():
        target = constant(node.inputs[1])
        if target is None:
            _rewrite_concat_target(model, node, by_pos)
            continue
        target = target.copy()
        for pos, count in by_pos.items():
            if target[pos] != -1:
                target[pos] -= count
        name = unique_name(model, f"{node.name or 'reshape'}_pruned_shape")
        model.graph.register_initializer(ir.Value(name=name, const_value=ir.Tensor(target, name=name)))
        old = node.inputs[1]
        node.replace_input_with(1, model.graph.initializers[name])
        drop_if_unused(model, old)


def _rewrite_concat_target(model: ir.Model, node: ir.Node, by_pos: dict[int, int]) -> None:
    """A target built by Concat: the constant pieces holding the channel entries get new values (the
    walk made sure they are constants), the computed pieces (batch, sequence) stay."""
    concat = node.inputs[1].producer()
    inputs = list(concat.inputs)
    starts = np.cumsum([0] + [1 if constant(v) is None else constant(v).size for v in inputs])
    for pos, count in sorted(by_pos.items()):
        j = int(np.searchsorted(starts, pos, side="right")) - 1
        piece = constant(inputs[j]).copy()
        if piece.reshape(-1)[pos - starts[j]] == -1:
            continue
        piece.reshape(-1)[pos - starts[j]] -= count
        name = unique_name(model, f"{node.name or 'reshape'}_pruned_dim")
        model.graph.register_initializer(ir.Value(name=name, const_value=ir.Tensor(piece, name=name)))
        inputs[j] = model.graph.initializers[name]
    if all(new is old for new, old in zip(inputs, concat.inputs)):
        return  # only -1 entries: nothing to rewrite
    if len(concat.outputs[0].uses()) == 1 and not concat.outputs[0].is_graph_output():
        for j, new in enumerate(inputs):
            old = concat.inputs[j]
            if new is not old:
                concat.replace_input_with(j, new)
                drop_if_unused(model, old)
        return
    own = ir.node("Concat", inputs, {"axis": attr_value(concat, "axis", 0)},
                  name=unique_name(model, f"{concat.name or 'concat'}_pruned"))
    own.outputs[0].name = unique_name(model, f"{concat.outputs[0].name}_pruned")
    model.graph.insert_before(node, own)
    node.replace_input_with(1, own.outputs[0])


def _parameters(model: ir.Model) -> int:
    return int(sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None))
