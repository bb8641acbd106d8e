"""Calibration feeds as training data for the ``recover`` pass: teacher targets, batches, labels.

before: the calibration feeds, the teacher's outputs on them (onnxruntime, computed once) and the
optional labels.
after:  ``TrainingData``, which yields ``Batch``es of torch tensors in a seeded order. When the first
axis of every input and of the teacher's output is a sample axis, samples from all feeds are pooled
and re-batched (``batch_size``); otherwise (a folder of fixed feeds, state inputs, a time axis
first) each feed is one step, used whole. Which case holds is measured, not assumed: the teacher is
run on a reversed subset of the first feed and must give the same rows as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

Feed = dict[str, np.ndarray]


@dataclass
class TeacherOutputs:
    outputs: list[np.ndarray]  # the first graph output, per feed
    features: list[list[np.ndarray]]  # per feed, one array per requested intermediate value
    run_first: Callable[[Feed], np.ndarray]  # the first output on another feed


def run_onnx(model_bytes: bytes, feeds: Sequence[Feed], features: Sequence[str], threads: int) -> TeacherOutputs:
    """The model's first output (and the named intermediate values) on every feed, in onnxruntime."""
    import onnxruntime as ort

    proto = onnx.load_model_from_string(model_bytes)
    first = proto.graph.output[0].name
    if features:
        produced = {o for node in proto.graph.node for o in node.output} | {i.name for i in proto.graph.input}
        missing = [n for n in features if n not in produced]
        if missing:
            raise ValueError(f"feature value(s) {', '.join(map(repr, missing))} are not computed by the original "
                             "model's main graph; name node outputs that both models share")
        listed = {o.name for o in proto.graph.output}
        proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in features if n not in listed)
        model_bytes = proto.SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    outputs, extra = [], []
    for feed in feeds:
        result = session.run([first, *features], feed)
        outputs.append(result[0])
        extra.append(result[1:])
    return TeacherOutputs(outputs, extra, lambda feed: session.run([first], feed)[0])


@dataclass
class Batch:
    feed: dict[str, torch.Tensor]
    teacher: torch.Tensor
    features: list[torch.Tensor]
    labels: torch.Tensor | None


@dataclass
class TrainingData:
    output: str  # name of the student's output that is distilled
    loss_kind: str  # "kl" | "mse"
    view: Callable[[torch.Tensor], torch.Tensor]  # output -> logits (log of a Softmax output)
    samples: int
    labels_used: bool
    notes: list[str] = field(default_factory=list)
    pooled: dict[str, np.ndarray] | None = None  # input name -> all samples, when pooling applies
    items: list[Batch] = field(default_factory=list)  # pooled: one Batch of everything; else one per feed

    @classmethod
    def build(cls, feeds: Sequence[Feed], teacher: TeacherOutputs, labels: np.ndarray | None, config,
              output: str, output_op: str | None) -> TrainingData:
        first = teacher.outputs[0]
        if not np.issubdtype(first.dtype, np.floating):
            raise ValueError(f"the model's first output {output!r} is {first.dtype}, not float: there is no "
                             "gradient to distil through it (put the logits first among the graph outputs)")
        kind = config.loss
        if kind == "auto":
            classifier = first.ndim == 2 or (output_op in ("Softmax", "LogSoftmax") and first.ndim >= 2)
            kind = "kl" if classifier and first.shape[-1] >= 2 else "mse"
        view = (lambda t: torch.log(t.clamp_min(1e-30))) if kind == "kl" and output_op == "Softmax" else (lambda t: t)
        notes: list[str] = []
        targets = [view(torch.from_numpy(np.ascontiguousarray(o)).float()) for o in teacher.outputs]
        feats = [[torch.from_numpy(np.ascontiguousarray(f)) for f in fs] for fs in teacher.features]
        pooled = _poolable(feeds, teacher)
        if not pooled:
            notes.append("samples are not independent along the first axis: one step per feed, used whole")

        rows = [t.reshape(-1, t.shape[-1]).shape[0] if kind == "kl" else 0 for t in targets]
        label_rows = None
        wants_labels = config.label_weight > 0 and kind == "kl"
        if wants_labels and labels is None:
            notes.append("label_weight is set but the data has no labels: pure distillation")
        elif wants_labels and labels.size != sum(rows):
            notes.append(f"labels ignored: {labels.size} labels for {sum(rows)} output rows")
        elif wants_labels:
            flat = torch.from_numpy(np.asarray(labels).reshape(-1).astype(np.int64))
            label_rows = list(flat.split(rows))

        items = []
        if pooled:
            names = list(feeds[0])
            arrays = {n: np.concatenate([f[n] for f in feeds]) for n in names}
            items.append(Batch({}, torch.cat(targets), [torch.cat(c) for c in zip(*feats)] if feats[0] else [],
                               torch.cat(label_rows) if label_rows else None))
            samples = len(items[0].teacher)
        else:
            arrays = None
            for i, feed in enumerate(feeds):
                items.append(Batch({n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in feed.items()},
                                   targets[i], feats[i], label_rows[i] if label_rows else None))
            samples = len(feeds)
        return cls(output, kind, view, samples, label_rows is not None, notes, arrays, items)

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-self.samples // batch_size) if self.pooled is not None else len(self.items)

    def batches(self, order: Callable, generator: torch.Generator, batch_size: int) -> Iterator[Batch]:
        """One epoch in a seeded random order: pooled samples in batches, or whole feeds."""
        if self.pooled is None:
            for i in torch.randperm(len(self.items), generator=generator).tolist():
                yield self.items[i]
            return
        for index in order(self.samples, batch_size, generator):
            yield self._pick(index)

    def in_order(self, chunk: int) -> Iterator[Batch]:
        if self.pooled is None:
            yield from self.items
            return
        for start in range(0, self.samples, chunk):
            yield self._pick(torch.arange(start, min(start + chunk, self.samples)))

    def _pick(self, index: torch.Tensor) -> Batch:
        whole = self.items[0]
        rows = index.numpy()
        return Batch(
            {n: torch.from_numpy(np.ascontiguousarray(a[rows])) for n, a in self.pooled.items()},
            whole.teacher[index],
            [f[index] for f in whole.features],
            None if whole.labels is None else whole.labels[index],
        )


def _poolable(feeds: Sequence[Feed], teacher: TeacherOutputs) -> bool:
    """True when the first axis of every input, output and feature is one axis of samples."""
    for feed, out, feats in zip(feeds, teacher.outputs, teacher.features):
        if set(feed) != set(feeds[0]) or out.ndim == 0:
            return False
        n = out.shape[0]
        arrays = [*feed.values(), *feats]
        if any(a.ndim == 0 or a.shape[0] != n for a in arrays):
            return False
    shapes = lambda pick: {pick(i).shape[1:] for i in range(len(feeds))}  # noqa: E731
    if any(len(shapes(lambda i, n=n: feeds[i][n])) > 1 for n in feeds[0]) or len(shapes(lambda i: teacher.outputs[i])) > 1:
        return False
    # Independent samples commute with reordering: the reversed every-other sub-batch must give
    # the same rows (catches a time or sequence axis first, and fixed batch sizes).
    first, n = feeds[0], teacher.outputs[0].shape[0]
    if n < 2:
        return True
    rows = np.arange(n)[::-1][::2].copy()
    try:
        probe = teacher.run_first({name: a[rows] for name, a in first.items()})
    except Exception:
        return False  # e.g. a fixed batch dimension
    expected = teacher.outputs[0][rows]
    return probe.shape == expected.shape and np.allclose(probe, expected, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(expected).max())))
