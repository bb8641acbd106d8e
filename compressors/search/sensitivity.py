"""Sensitivity: what one choice on one layer group costs, and how much output error it causes.

before: the normalized input model (serialized), its layer groups with their choices, calibration data.
after:  ``Workbench.proxy(group, choice)`` -> ``Proxy(loss, cost, seconds, error)`` where ``loss`` is
the relative squared error of the model's first output, ``||y' - y||² / ||y||²``, over the first
``proxy_samples`` calibration samples with only that group changed, and ``cost`` the change of the
objective (runnable bytes, shipped bytes, or ms of p50 latency; negative = saved). A choice whose pass
fails on that group gets an infinite loss and its error, so the allocation never picks it.

Padded inputs (a 0/1 integer input named like ``*mask*``, [N, T]): the error is summed over the real
positions only, as the gate's cosine is (``fidelity.padding_mask``), and with ``proxy_trim_padding``
the columns that are padding in every sample of a feed are cut off the proxy feeds — sentences
padded to 128 tokens that hold 15 on average run ~5x faster, and the comparison is like for like
(the original runs on the same cut feeds). A model that refuses the shorter feeds (a fixed sequence
length) gets them uncut. With ``proxy_calibration: proxy`` the passes of a proxy calibrate (GPTQ,
SparseGPT, ...) on these proxy feeds too instead of the whole calibration set; the full evaluations
always calibrate on all of it.

``Workbench.apply(config)`` builds a whole configuration — one pass per distinct choice, restricted to
the tensors of every group that took it — on a fresh copy of the model; the full evaluations and the
final job run exactly these passes, so what was evaluated is what is written.

Each proxy is independent of the others (a pure function of the group and the choice), so the
executors (``executors.py``) run them all as one parallel batch.
"""

from __future__ import annotations

import hashlib
import lzma
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_ir as ir
from modelpress.compressors import benchmark
from modelpress.compressors.data import Dataset, Feed
from modelpress.compressors.fidelity import padding_mask
from modelpress.compressors.padding import real_lengths
from modelpress.compressors.model import to_bytes
from modelpress.compressors.pipeline import (
    EncodePass,
    Pass,
    PassContext,
    PassRecord,
    run_passes,
)
from modelpress.compressors.search.space import Choice, LayerGroup, with_tensors

Config = Mapping[str, str]  # group name -> choice name; a group left out keeps its weights
# Above this many .onnx bytes a proxy's shipped size is estimated (``Workbench._shipped_estimate``):
# coding a whole 90 MB model took 15 s per proxy; the full evaluations always encode exactly.
ESTIMATE_SHIPPED_ABOVE = 16 << 20


@dataclass(frozen=True)
class Proxy:
    loss: float
    cost: float
    seconds: float
    error: str | None = None


class Workbench:
    """The model and everything needed to build and score configurations of it."""

    def __init__(self, original: bytes, groups: list[LayerGroup], context: PassContext, calibration: Dataset,
                 encoder: EncodePass | None, objective: str, proxy_samples: int, trim_padding: bool = False,
                 proxy_calibration: str = "all"):
        self.original = original
        self.groups = groups
        self.context = context
        self.encoder = encoder
        self.objective = objective
        self.threads = context.threads
        self.proxy_feeds = _first_samples(calibration, proxy_samples)
        self.trim_padding = trim_padding
        self.proxy_calibration = proxy_calibration
        self.latency_feed = calibration.latency_feed()[0]
        # Every choice by name, in order of first appearance: passes of one stage run in this order.
        self.choices: dict[str, Choice] = {}
        for group in groups:
            for choice in group.choices:
                self.choices.setdefault(choice.name, choice)
        self._reference: list[np.ndarray] | None = None
        self._masks: list[np.ndarray | None] = []
        self._coded: dict[tuple[bytes, int], int] = {}  # coded bytes of a tensor payload, by its hash
        self._base_cost: float | None = None
        self._latency_ms: float | None = None

    # ----------------------------------------------------------------------- configurations

    def passes(self, config: Config, context: PassContext | None = None) -> list[Pass]:
        from modelpress.compressors.registry import PASSES

        tensors: dict[str, list[str]] = {}
        for group in self.groups:
            name = config.get(group.name)
            if name is not None and not self.choices[name].identity:
                tensors.setdefault(name, []).extend(group.tensors)
        built: list[Pass] = []
        for name, choice in self.choices.items():
            for step in choice.steps if name in tensors else ():
                built.append(PASSES[step.stage][step.name](with_tensors(step, tensors[name]), context or self.context))
        return built

    def apply(self, config: Config, context: PassContext | None = None) -> tuple[ir.Model, list[PassRecord]]:
        model = ir.from_proto(onnx.load_from_string(self.original))
        return run_passes(model, self.passes(config, context))

    # ----------------------------------------------------------------------- measurements

    def cost(self, onnx_bytes: bytes) -> float:
        """The objective of a model: bytes of the .onnx or the shipped artifact, or p50 ms."""
        if self.objective == "size":
            return float(len(onnx_bytes))
        if self.objective == "shipped_size":
            if self.encoder is None:
                return float(len(onnx_bytes))
            if self.encoder.name == "entropy" and len(onnx_bytes) >= ESTIMATE_SHIPPED_ABOVE:
                return float(self._shipped_estimate(onnx_bytes))
            return float(len(self.encoder.encode(onnx_bytes)[0]))
        from modelpress.compressors.quantize.int8 import time_models

        # Timed against the original in interleaved rounds; the ratio is what survives a noisy host.
        timing = time_models({"original": self.original, "candidate": onnx_bytes}, self.latency_feed, self.threads)
        return self.base_latency_ms * timing["candidate"].ratio

    def _shipped_estimate(self, onnx_bytes: bytes) -> int:
        """The entropy pass's artifact size, less its table and header: every coded tensor payload by
        the same coder, remembered by content (a proxy changes one group, so the other tensors of a
        large model are coded once per search, not once per proxy), plus the LZMA'd skeleton."""
        from modelpress.compressors.encode.mpk import MIN_CODED_BYTES, dtype_of
        from modelpress.compressors.encode.wire import tensor_spans
        from modelpress.kernels.entropy import encode_payload

        level = getattr(self.encoder.config, "level", 9)
        view, skeleton, cursor, coded = memoryview(onnx_bytes), bytearray(), 0, 0
        for span in tensor_spans(onnx_bytes):
            if span.length < MIN_CODED_BYTES:
                continue
            payload = view[span.start : span.start + span.length]
            key = (hashlib.blake2b(payload, digest_size=16).digest(), span.data_type)
            if key not in self._coded:
                streams = encode_payload(payload, dtype_of(span.data_type)[1], level).streams
                self._coded[key] = sum(len(stream) for stream in streams)
            coded += self._coded[key]
            skeleton += view[cursor : span.start]
            cursor = span.start + span.length
        skeleton += view[cursor:]
        return coded + len(lzma.compress(bytes(skeleton), preset=level))

    @property
    def base_cost(self) -> float:
        if self._base_cost is None:
            self._base_cost = self.base_latency_ms if self.objective == "latency" else self.cost(self.original)
        return self._base_cost

    @property
    def base_latency_ms(self) -> float:
        from modelpress.compressors.quantize.int8 import time_models

        if self._latency_ms is None:
            self._latency_ms = time_models({"original": self.original}, self.latency_feed, self.threads)["original"].median_us / 1e3
        return self._latency_ms

    def proxy(self, group: str, choice: str) -> Proxy:
        """Apply ``choice`` to ``group`` alone and measure the output error and the cost change."""
        started = time.perf_counter()
        reference = self.reference  # decides the proxy feeds (cut or not) first
        context = None
        if self.proxy_calibration == "proxy":
            context = replace(self.context, calibration=list(self.proxy_feeds), labels=None)
        try:
            model, _ = self.apply({group: choice}, context)
            onnx_bytes = to_bytes(model)
            loss = relative_error(reference, self._outputs(onnx_bytes), self._masks)
            cost = self.cost(onnx_bytes) - self.base_cost
        except Exception as exc:  # noqa: BLE001 — a choice that fails on this group is recorded, not fatal
            return Proxy(float("inf"), float("inf"), time.perf_counter() - started, f"{type(exc).__name__}: {exc}"[:300])
        return Proxy(loss, cost, time.perf_counter() - started)

    @property
    def reference(self) -> list[np.ndarray]:
        if self._reference is None:
            uncut = self.proxy_feeds
            if self.trim_padding:
                self.proxy_feeds = [trim_padding(feed) for feed in uncut]
            try:
                self._reference = self._outputs(self.original)
            except Exception:
                if self.proxy_feeds is uncut:
                    raise
                self.proxy_feeds = uncut  # e.g. a fixed sequence length: the feeds as they are
                self._reference = self._outputs(self.original)
            self._masks = [padding_mask(feed, ref) for feed, ref in zip(self.proxy_feeds, self._reference)]
        return self._reference

    def _outputs(self, onnx_bytes: bytes) -> list[np.ndarray]:
        session = benchmark.make_session(onnx_bytes, self.threads)
        return [session.run(None, feed)[0] for feed in self.proxy_feeds]


def relative_error(reference: list[np.ndarray], candidate: list[np.ndarray],
                   masks: list[np.ndarray | None] | None = None) -> float:
    """``sum ||y' - y||² / sum ||y||²`` over feeds (float outputs; with a padding mask [N, T] per
    feed, over the real positions only), or the share of elements that differ (integer outputs:
    class ids); inf when the candidate is not finite."""
    error = energy = 0.0
    for ref, cand, mask in zip(reference, candidate, masks or [None] * len(reference)):
        if ref.dtype.kind != "f":
            error += float(np.count_nonzero(ref != cand))
            energy += float(ref.size)
            continue
        r, c = ref.astype(np.float64), cand.astype(np.float64)
        if mask is not None:
            r, c = r[mask], c[mask]
        error += float(np.sum((c - r) ** 2))
        energy += float(np.sum(r**2))
    if not np.isfinite(error):
        return float("inf")
    return error / energy if energy > 0 else (0.0 if error == 0 else float("inf"))


def _first_samples(dataset: Dataset, samples: int) -> list[Feed]:
    """The first ``samples`` samples of the dataset: whole feeds, the last one cut to size when the
    first axis of every input is the sample axis (else whole feeds until they hold enough)."""
    feeds, held = [], 0
    for feed, count in zip(dataset.feeds, dataset.feed_samples):
        if held >= samples:
            break
        if dataset.sliceable and held + count > samples:
            feed, count = {name: array[: samples - held] for name, array in feed.items()}, samples - held
        feeds.append(feed)
        held += count
    return feeds


def trim_padding(feed: Feed) -> Feed:
    """The feed without the trailing positions that are padding in every sample: every input shaped
    [N, T, ...] like its padding mask (a 0/1 integer input named like ``*mask*``) is cut to the
    longest real length. A feed without such a mask is returned as it is."""
    for name in sorted(feed):
        mask = np.asarray(feed[name])
        if "mask" not in name.lower() or mask.ndim != 2 or mask.dtype.kind not in "biu" or not np.isin(mask, (0, 1)).all():
            continue
        length = int(real_lengths(mask != 0).max()) if mask.size else 1
        if length == mask.shape[1]:
            return feed
        return {k: (v[:, :length] if np.ndim(v) >= 2 and np.shape(v)[:2] == mask.shape else v) for k, v in feed.items()}
    return feed


def group_rows(groups: list[LayerGroup], proxies: Mapping[tuple[str, str], Proxy], config: Config) -> list[dict]:
    """The report's view of each group: its chosen setting, why, and the sensitivity behind it."""
    rows = []
    for group in groups:
        options = {c.name: proxies[(group.name, c.name)] for c in group.choices if (group.name, c.name) in proxies}
        chosen = config.get(group.name)
        rows.append({
            "name": group.name,
            "tensors": list(group.tensors),
            "elements": group.elements,
            "choice": chosen,
            "why": _why(chosen, options),
            "sensitivity": [{"choice": n, "loss": p.loss, "cost": p.cost, "error": p.error} for n, p in options.items()],
        })
    return rows


def _why(chosen: str | None, options: Mapping[str, Proxy]) -> str:
    if chosen is None or chosen not in options:
        return "left as it is: no configuration was evaluated"
    pick = options[chosen]
    cheaper = {n: p for n, p in options.items() if np.isfinite(p.loss) and p.cost < pick.cost}
    if not cheaper:
        return f"the cheapest choice measured; predicted loss {pick.loss:.3g}"
    name, other = min(cheaper.items(), key=lambda item: (item[1].loss, item[1].cost))
    factor = f" ({other.loss / pick.loss:.3g}x)" if pick.loss > 0 else ""
    return (f"predicted loss {pick.loss:.3g}; the next cheaper choice, {name}, would save {pick.cost - other.cost:.4g} "
            f"more at a predicted loss of {other.loss:.3g}{factor}")
