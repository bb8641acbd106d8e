"""Measure models with ONNX Runtime on CPU: size, latency, peak memory, accuracy and fidelity.

before: model bytes or paths (the original, maybe a compressed one) and a ``Dataset``.
after:  a ``ModelMeasurement`` per model. ``compare`` times the two models taking turns
(``time_in_turns``), so that their latency ratio holds on a noisy shared machine, and measures the
compressed model's outputs against the original's over the whole dataset.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from modelpress.compressors.data import Dataset, Feed
from modelpress.compressors.errors import InputError, ModelpressError
from modelpress.compressors.fidelity import OutputFidelity, predictions
from modelpress.compressors.output_kind import output_kind
from modelpress.compressors.peak_memory import PeakMemory

ModelSource = bytes | str | os.PathLike
Progress = Callable[[str, int, int], None]


class BenchSettingsLike(Protocol):
    threads: int
    warmup: int
    runs: int


@dataclass(frozen=True)
class BenchSettings:
    """Defaults of the recipe's ``benchmark:`` block; any object with these attributes will do."""

    threads: int = 2
    warmup: int = 5
    runs: int = 50


@dataclass
class Latency:
    """Milliseconds per ``session.run`` of the latency feed, and samples per second at the mean."""

    p50: float
    p90: float
    p99: float
    mean: float
    throughput: float


@dataclass
class ModelMeasurement:
    size_bytes: int
    latency: Latency | None
    metrics: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: float | None = None


# --------------------------------------------------------------------------- sessions


def session_options(threads: int) -> ort.SessionOptions:
    """Options for repeatable timing: ``threads`` intra-op threads, one inter-op thread,
    sequential execution, warnings silenced."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options


def make_session(model: ModelSource, threads: int) -> ort.InferenceSession:
    """A CPU-only session with ``session_options``; InputError naming the model if ORT rejects it."""
    options = session_options(threads)
    source = bytes(model) if isinstance(model, (bytes, bytearray)) else os.fspath(model)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise InputError(f"{_name(model)}: onnxruntime cannot load the model: {str(exc).strip()[:500]}") from None


def model_bytes(model: ModelSource) -> int:
    """Size of the ONNX file (or bytes); external data files are not counted here."""
    if isinstance(model, (bytes, bytearray)):
        return len(model)
    return Path(model).stat().st_size


def _name(model: ModelSource) -> str:
    return "the model" if isinstance(model, (bytes, bytearray)) else str(model)


def _output_index(session: ort.InferenceSession, output: int | str) -> int:
    names = [o.name for o in session.get_outputs()]
    if isinstance(output, str):
        if output not in names:
            raise InputError(f"the model has no output {output!r}; its outputs: {', '.join(names)}")
        return names.index(output)
    if not -len(names) <= output < len(names):
        raise InputError(f"output index {output} is out of range; the model has {len(names)} output(s): {', '.join(names)}")
    return output % len(names)


def _run(session: ort.InferenceSession, feed: Feed, index: int, where: str) -> np.ndarray:
    outputs = session.run(None, feed)
    result = outputs[index]
    if not isinstance(result, np.ndarray):
        name = session.get_outputs()[index].name
        raise InputError(f"{where}: output {name!r} is a {type(result).__name__}, not a tensor; choose a tensor output")
    return result


def run_outputs(session: ort.InferenceSession, dataset: Dataset, output: int | str = 0) -> list[np.ndarray]:
    """One output (the first by default) for each feed, in feed order. Not concatenated: feeds of
    a folder may differ beyond the first axis; ``np.concatenate`` them where they agree."""
    index = _output_index(session, output)
    return [_run(session, feed, index, f"{dataset.source} feed {i}") for i, feed in enumerate(dataset.feeds)]


# --------------------------------------------------------------------------- measured sessions (peak_memory.py)


_runtime_ready = False


def _initialize_runtime() -> None:
    """Create one trivial session so that ONNX Runtime's one-time, process-wide setup (about
    10 MB) is not charged to whichever model happens to be measured first."""
    global _runtime_ready
    if _runtime_ready:
        return
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "warm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    make_session(proto.SerializeToString(), 1).run(None, {"x": np.zeros(1, np.float32)})
    _runtime_ready = True


def _open_and_run(model: ModelSource, dataset: Dataset, threads: int, output: int | str):
    """A session and the memory it took to create it and run the first feed."""
    _initialize_runtime()
    with PeakMemory() as memory:
        session = make_session(model, threads)
        _run(session, dataset.feeds[0], _output_index(session, output), f"{dataset.source} feed 0")
    return session, memory.mb


@contextlib.contextmanager
def _blame_data(model: ModelSource, where: str) -> Iterator[None]:
    """The original model failing on the data: the data does not fit it (exit 2)."""
    try:
        yield
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{_name(model)} fails on {where}: {str(exc).strip()[:500]}") from None


@contextlib.contextmanager
def _blame_compressed(model: ModelSource, where: str) -> Iterator[None]:
    """The compressed model failing where the original ran: a compression fault (exit 3)."""
    try:
        yield
    except Exception as exc:
        raise ModelpressError(f"the compressed model {_name(model)} fails on {where}: {str(exc).strip()[:500]}") from None


# --------------------------------------------------------------------------- latency


def _percentiles(times_ns: list[int], samples: int) -> Latency:
    ms = np.asarray(times_ns, dtype=np.float64) / 1e6
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    mean = float(ms.mean())
    return Latency(float(p50), float(p90), float(p99), mean, samples / (mean / 1e3) if mean > 0 else float("inf"))


# Timed runs of one session before the next takes its turn. Why turns and not run by run: after a
# run, ORT's intra-op threads spin for a while waiting for more work; a different session started
# at once competes with them for the cores. Alternating all-MiniLM-L6-v2 sessions run by run on 2
# cores read 39-48 ms per fp32 run where the same model timed alone read 21-24 ms, and turns 21-25
# ms (benchmarks/RESULTS.md, latency-method; the ratios between two models were as noisy either
# way). Turns time each model as a user runs it, with ORT's default spinning, and rotating the
# turns over the rounds still spreads a noisy neighbour or a clock change over every model alike.
TURN_RUNS = 10
# Untimed runs at the start of each turn, for at least this long: the other session's threads go
# back to sleep and this model's weights return to the caches.
SETTLE_NS = 5_000_000


def time_in_turns(sessions: list[ort.InferenceSession], feeds: list[Feed], runs: int, warmup: int,
                  progress: Progress | None = None) -> list[list[int]]:
    """Nanoseconds of ``runs`` timed runs of each session (cycling through ``feeds``): each session
    warmed up ``warmup`` times, then timed in turns of TURN_RUNS back-to-back runs, the order of the
    sessions rotating from round to round. Run i of every session lies in the same round, so
    per-run ratios pair runs made within a few hundred milliseconds of each other."""
    for session in sessions:
        for i in range(warmup):
            session.run(None, feeds[i % len(feeds)])
    times: list[list[int]] = [[] for _ in sessions]
    done = 0
    for round_ in range((runs + TURN_RUNS - 1) // TURN_RUNS):
        size = min(TURN_RUNS, runs - done)
        for k in range(len(sessions)):
            which = (k + round_) % len(sessions)
            session = sessions[which]
            settle_until = time.perf_counter_ns() + SETTLE_NS
            session.run(None, feeds[0])
            while time.perf_counter_ns() < settle_until:
                session.run(None, feeds[0])
            for i in range(done, done + size):
                feed = feeds[i % len(feeds)]
                started = time.perf_counter_ns()
                session.run(None, feed)
                times[which].append(time.perf_counter_ns() - started)
        done += size
        if progress:
            progress("latency", done, runs)
    return times


# --------------------------------------------------------------------------- metrics


class _Accuracy:
    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self.offsets = np.concatenate([[0], np.cumsum(dataset.feed_samples)]).astype(int)
        self.correct = self.total = 0

    def add(self, i: int, output: np.ndarray, output_name: str) -> None:
        labels = self.dataset.labels[self.offsets[i] : self.offsets[i + 1]]
        predicted = predictions(output, per_position=True)
        if predicted is not None and predicted.shape != labels.shape and predicted.size == labels.size:
            predicted = predicted.reshape(labels.shape)  # e.g. labels [N, 1] against predictions [N]
        if predicted is None or predicted.shape != labels.shape:
            got = f"float scores of shape {list(output.shape)}" if predicted is None else (
                f"predictions of shape {list(predicted.shape)} (argmax over the last axis of {list(output.shape)})"
            )
            raise InputError(
                f"{self.dataset.source}: feed {i} has labels of shape {list(labels.shape)} but the model's output "
                f"{output_name!r} gives {got}; accuracy needs one label per prediction"
            )
        self.correct += int(np.count_nonzero(predicted == labels))
        self.total += labels.size

    def value(self) -> float:
        return self.correct / self.total if self.total else float("nan")


# --------------------------------------------------------------------------- entry points


def measure(
    model: ModelSource,
    dataset: Dataset,
    settings: BenchSettingsLike = BenchSettings(),
    progress: Progress | None = None,
    output: int | str = 0,
) -> ModelMeasurement:
    """``modelpress bench``: size, batch-1 latency, peak memory and, with labels, accuracy."""
    original, _ = compare(model, None, dataset, settings, progress, output)
    return original


def compare(
    original: ModelSource,
    compressed: ModelSource | None,
    dataset: Dataset,
    settings: BenchSettingsLike = BenchSettings(),
    progress: Progress | None = None,
    output: int | str = 0,
    reference_outputs: list[np.ndarray] | None = None,
) -> tuple[ModelMeasurement, ModelMeasurement | None]:
    """Measure the original and (if given) the compressed model on the same data.

    Latency: the latency feed (one sample when the batch axis is dynamic) run ``warmup`` times on
    each model, then ``runs`` times each, in turns (``time_in_turns``). Metrics over every feed, on ``output`` (the
    first output by default): ``accuracy`` for each model when the dataset has labels; for the
    compressed model against the original (see ``fidelity``): ``agreement`` of the decisions
    (argmax of [N, classes] scores, or integer outputs, or of the last axis at each position of scores
    per position (``output_kind``); not for feature outputs of rank >= 3 or L2-normalized embeddings),
    ``cosine`` (mean over samples of the cosine of each sample's output, padded positions left out)
    and ``worst_cosine``, ``max_abs_error`` and ``mean_abs_error``.

    A failure of the original on the data is an InputError; of the compressed model, a
    ModelpressError.

    ``reference_outputs``: the original's ``output`` for every feed, measured before (``run_outputs``);
    a caller comparing many candidates with one original (the search) passes them so the original
    is not run again. Without timing (``runs`` 0) the original's session is then not even created,
    and its ``peak_memory_mb`` is None.
    """
    progress = progress or (lambda description, completed, total: None)
    if not dataset.feeds:
        raise InputError(f"{dataset.source}: the dataset holds no feeds")
    if reference_outputs is not None and len(reference_outputs) != len(dataset.feeds):
        raise ValueError(f"{len(reference_outputs)} reference outputs for {len(dataset.feeds)} feeds")
    progress("loading models", 0, 1)
    reference = reference_mb = None
    if reference_outputs is None or settings.runs > 0 or compressed is None:
        with _blame_data(original, f"{dataset.source} feed 0"):
            reference, reference_mb = _open_and_run(original, dataset, settings.threads, output)
    candidate = candidate_mb = None
    if compressed is not None:
        with _blame_compressed(compressed, "its first run"):
            candidate, candidate_mb = _open_and_run(compressed, dataset, settings.threads, output)
    progress("loading models", 1, 1)

    named = reference if reference is not None else candidate  # the same outputs by name
    index = _output_index(named, output)
    output_name = named.get_outputs()[index].name
    accuracy = [_Accuracy(dataset) for _ in range(2)] if dataset.labels is not None else None
    fidelity = OutputFidelity(output_kind(original, output))
    for i, feed in enumerate(dataset.feeds):
        where = f"{dataset.source} feed {i}"
        if reference_outputs is not None:
            ref_out = reference_outputs[i]
        else:
            with _blame_data(original, where):
                ref_out = _run(reference, feed, index, where)
        if accuracy:
            accuracy[0].add(i, ref_out, output_name)
        if candidate is not None:
            with _blame_compressed(compressed, where):
                cand_out = _run(candidate, feed, index, where)
            if accuracy:
                accuracy[1].add(i, cand_out, output_name)
            if ref_out.shape != cand_out.shape:
                raise ModelpressError(
                    f"{where}: the compressed model's output has shape {list(cand_out.shape)}, "
                    f"the original's {list(ref_out.shape)}"
                )
            fidelity.add(ref_out, cand_out, feed)
        progress("evaluating", i + 1, len(dataset.feeds))

    feed, samples = dataset.latency_feed()
    sessions = [reference] if candidate is None else [reference, candidate]
    latencies = [None, None]
    if settings.runs > 0:
        timed = time_in_turns(sessions, [feed], settings.runs, settings.warmup, progress)
        latencies = [_percentiles(t, samples) for t in timed]

    before = ModelMeasurement(model_bytes(original), latencies[0], {}, reference_mb)
    if accuracy:
        before.metrics["accuracy"] = accuracy[0].value()
    if candidate is None:
        return before, None
    after = ModelMeasurement(model_bytes(compressed), latencies[1], {}, candidate_mb)
    if accuracy:
        after.metrics["accuracy"] = accuracy[1].value()
    after.metrics.update(fidelity.values())
    return before, after


def preflight(original: ModelSource, dataset: Dataset, threads: int = 1, output: int | str = 0) -> None:
    """Run the original on the first feed and check the labels fit its output, so data problems
    are InputErrors before any pass runs or any file is written."""
    with _blame_data(original, f"{dataset.source} feed 0"):
        session = make_session(original, threads)
    index = _output_index(session, output)
    where = f"{dataset.source} feed 0"
    with _blame_data(original, where):
        first = _run(session, dataset.feeds[0], index, where)
    if first.dtype.kind == "f" and np.isnan(first).any():  # every cosine, agreement and gate would be noise
        name = session.get_outputs()[index].name
        raise InputError(f"{_name(original)} gives NaN in output {name!r} on {where} ({int(np.isnan(first).sum())} "
                         f"of {first.size} values): check the data's preprocessing (dtype, scale, layout) "
                         "against what the model expects, or the model itself")
    if dataset.labels is not None:
        _Accuracy(dataset).add(0, first, session.get_outputs()[index].name)
