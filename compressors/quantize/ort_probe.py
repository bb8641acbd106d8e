"""Running models in ONNX Runtime for the quantization passes: paired timing, output fidelity
against the input model, the feed latency is judged on, and shapes by ONNX shape inference."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from modelpress.compressors import benchmark
from modelpress.compressors.fidelity import OutputFidelity
from modelpress.compressors.output_kind import output_kinds
from modelpress.compressors.pipeline import Feed

# Samples used to check outputs against the input model, and the largest model checked (the check
# holds the serialized model and two sessions in memory).
CHECK_SAMPLES = 512


# Timing: rounds per comparison and target seconds of runs per variant per round.
TIMING_ROUNDS = 9


TIMING_ROUND_SECONDS = 0.004


def open_session(model_bytes: bytes, threads: int):
    import onnxruntime as ort

    return ort.InferenceSession(model_bytes, benchmark.session_options(threads), providers=["CPUExecutionProvider"])


def model_feed(session, feed: Feed) -> Feed:
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
    sessions = {k: open_session(b, threads) for k, b in models.items()}
    feeds = {k: model_feed(s, feed) for k, s in sessions.items()}
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


def fidelity(reference: bytes, candidate: bytes, feeds: list[Feed], threads: int) -> dict[str, Any]:
    """How the candidate's float outputs compare with the reference's on up to CHECK_SAMPLES samples
    (see ``compressors.fidelity``): top-1 agreement where outputs are class scores, and the mean and
    worst per-sample cosine (padding left out for feature outputs)."""
    ref_session, cand_session = open_session(reference, threads), open_session(candidate, threads)
    measured = OutputFidelity()
    samples = 0
    known = output_kinds(reference)
    kinds = [known.get(o.name, "auto") for o in ref_session.get_outputs()]
    for feed in feeds:
        if samples >= CHECK_SAMPLES:
            break
        refs = ref_session.run(None, model_feed(ref_session, feed))
        cands = cand_session.run(None, model_feed(cand_session, feed))
        samples += max((len(v) for v in feed.values() if np.ndim(v) > 0), default=1)
        for r, c, kind in zip(refs, cands, kinds):
            r, c = np.asarray(r), np.asarray(c)
            if np.issubdtype(r.dtype, np.floating):
                measured.add(r, c, feed, kind)
    metrics = measured.values()
    result: dict[str, Any] = {"samples": samples, "outputs": "scores" if measured.decisions else "features"}
    if "agreement" in metrics:
        result["agreement"] = round(metrics["agreement"], 6)
    result["cosine"] = round(metrics["cosine"], 6) if np.isfinite(metrics["cosine"]) else 1.0
    result["worst_cosine"] = round(metrics["worst_cosine"], 6) if np.isfinite(metrics["worst_cosine"]) else 1.0
    if measured.masked:
        result["padding_masked"] = True
    return result


def latency_feed(model: ir.Model, feed: Feed, batch: int | None = None) -> Feed:
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


def batch_of(feed: Feed | None) -> int | None:
    if not feed:
        return None
    return int(max((np.shape(a)[0] for a in feed.values() if np.ndim(a)), default=1))


def inferred_shapes(proto: onnx.ModelProto, feed: Feed) -> dict[str, tuple[int, ...]]:
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
            if tensor.HasField("shape") and all(d.HasField("dim_value") and d.dim_value >= 0 for d in tensor.shape.dim):
                shapes[info.name] = tuple(int(d.dim_value) for d in tensor.shape.dim)
        for node in graph.node:
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
                    visit(sub)

    visit(inferred.graph)
    return shapes


class FirstShape:
    """A calibration reduction that keeps only the shape of the first array it sees."""

    def __init__(self) -> None:
        self.shape: tuple[int, ...] | None = None

    def update(self, batch: np.ndarray) -> None:
        if self.shape is None:
            self.shape = tuple(int(d) for d in np.shape(batch))


def value_errors(reference: bytes, candidate: bytes, names: list[str], feed: Feed, threads: int) -> dict[str, float]:
    """Relative error ||c - r|| / ||r|| of each named main-graph value of the candidate against the
    reference's value of the same name, on one feed. Values missing from either model are left out."""
    sessions = []
    for model_bytes in (reference, candidate):
        proto = onnx.load_from_string(model_bytes)
        produced = {o for node in proto.graph.node for o in node.output} | {i.name for i in proto.graph.input}
        present = [n for n in names if n in produced]
        outputs = {o.name for o in proto.graph.output}
        for name in present:
            if name not in outputs:
                proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        sessions.append((open_session(proto.SerializeToString(), threads), set(present)))
    (ref_session, ref_names), (cand_session, cand_names) = sessions
    wanted = sorted(ref_names & cand_names)
    refs = ref_session.run(wanted, model_feed(ref_session, feed))
    cands = cand_session.run(wanted, model_feed(cand_session, feed))
    errors = {}
    for name, r, c in zip(wanted, refs, cands):
        r, c = np.asarray(r, np.float64), np.asarray(c, np.float64)
        norm = np.linalg.norm(r)
        if r.shape == c.shape and norm > 0:
            errors[name] = float(np.linalg.norm(c - r) / norm)
    return errors
