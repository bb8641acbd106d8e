"""Calibration feeds as training data for the ``recover`` pass: teacher targets, batches, labels.

before: the calibration feeds, the teacher's outputs on them (onnxruntime, computed once) and the
optional labels.
after:  ``TrainingData``, which yields ``Batch``es of torch tensors in a seeded order. When the first
axis of every input and of the teacher's output is a sample axis, samples from all feeds are pooled
and re-batched (``batch_size``); otherwise (a folder of fixed feeds, state inputs, a time axis
first) each feed is one step, used whole. Which case holds is measured, not assumed: the teacher is
run on a reversed subset of the first feed and must give the same rows as before.

Memory: the teacher's intermediate values (``features``) are kept at the real positions only when the
feeds carry that mask (``Packed``; padded positions are never a target), and as float16 past
HALF_FEATURES_BYTES. all-MiniLM-L6-v2 on 4,172 docstring sentences (15 real tokens of 128 on
average) with its 12 LayerNorm states: 9.8 GB of float32 targets, 0.6 GB packed as float16.

Padding: when the feeds have a [batch, seq] 0/1 mask input (``padding_mask``, e.g. a tokenizer's
``attention_mask``) whose axes lead the output's, each ``Batch`` carries the mask and the losses skip
padded positions — with short sentences padded to 128 tokens, padding would otherwise be most of the
loss. Pooled batches are also cut after their last real position, which saves most of the compute
for short sentences; that is done only when the teacher, run on the shortest samples cut that way,
gives the same outputs at the real positions (it does not for a model whose positions see padding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from modelpress.compressors.padding import cut_positions, real_lengths

Feed = dict[str, np.ndarray]
# Samples are grouped by length within windows of this many batches: longer windows waste less on
# padding but make batches less random.
BUCKET_WINDOW = 8
# Teacher features (intermediate values) above this many bytes in all are kept as float16: they are
# regression targets, and 4,000 sentences x 12 hidden states x 128 positions would need 10 GB in float32.
HALF_FEATURES_BYTES = 1 << 30


@dataclass
class Packed:
    """An [n, seq, ...] array kept at its real positions only: ``rows`` [real positions, ...] in sample
    order, ``mask`` [n, seq] bool marking them. Padded positions come back as zeros: they are never a
    target, since the losses skip them (``padding_mask``)."""

    rows: np.ndarray
    mask: np.ndarray
    starts: np.ndarray = field(init=False, repr=False)  # sample i's rows: starts[i]:starts[i + 1]

    def __post_init__(self):
        # Once, not per batch: summing the whole mask for every feature of every step was O(samples) each.
        self.starts = np.concatenate([[0], np.cumsum(self.mask.sum(axis=1))])

    @classmethod
    def concat(cls, parts: Sequence[Packed]) -> Packed:
        return cls(np.concatenate([p.rows for p in parts]), np.concatenate([p.mask for p in parts]))

    def take(self, index: np.ndarray, length: int | None = None) -> torch.Tensor:
        """Samples ``index`` as a dense [len(index), length or seq, ...] tensor, padding zero-filled."""
        mask = self.mask[index][:, :length] if length is not None else self.mask[index]
        dense = np.zeros((*mask.shape, *self.rows.shape[1:]), dtype=self.rows.dtype)
        if len(index):
            dense[mask] = np.concatenate([self.rows[self.starts[i]:self.starts[i + 1]] for i in index])
        return torch.from_numpy(dense)


@dataclass
class TeacherOutputs:
    outputs: list[np.ndarray]  # the first graph output, per feed
    features: list[list[np.ndarray | Packed]]  # per feed, one array per requested intermediate value
    run_first: Callable[[Feed], np.ndarray]  # the first output on another feed


def run_onnx(model_bytes: bytes, feeds: Sequence[Feed], features: Sequence[str], threads: int,
             mask: str | None = None) -> TeacherOutputs:
    """The model's first output (and the named intermediate values) on every feed, in onnxruntime.
    ``mask``: a [batch, seq] 0/1 input; when every feed has it over the first output's leading axes,
    the features over those axes are kept ``Packed`` (real positions only)."""
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
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as in calibration.capture
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    pack = features and mask is not None and all(_is_mask(feed.get(mask)) for feed in feeds)
    outputs, extra, half = [], [], False
    for index, feed in enumerate(feeds):
        result = session.run([first, *features], feed)
        outputs.append(result[0])
        real = feed[mask] != 0 if pack else None
        if pack and result[0].shape[:2] != real.shape:  # the mask does not span the output: keep it all
            return run_onnx(model_bytes, feeds, features, threads)
        kept = [Packed(r[real], real) if real is not None and r.shape[:2] == real.shape else r for r in result[1:]]
        if index == 0:
            nbytes = sum(k.rows.nbytes if isinstance(k, Packed) else k.nbytes for k in kept)
            half = nbytes * len(feeds) > HALF_FEATURES_BYTES
        extra.append([_halved(k) if half else k for k in kept])
    return TeacherOutputs(outputs, extra, lambda feed: session.run([first], feed)[0])


def _is_mask(array: np.ndarray | None) -> bool:
    """A [batch, seq] array of 0s and 1s (bool or integer)."""
    return array is not None and array.ndim == 2 and (array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer)) \
        and bool(np.isin(array, (0, 1)).all())


def _halved(value: np.ndarray | Packed) -> np.ndarray | Packed:
    if isinstance(value, Packed):
        return Packed(_halved(value.rows), value.mask)
    return value.astype(np.float16) if value.dtype == np.float32 else value


@dataclass
class Batch:
    feed: dict[str, torch.Tensor]
    teacher: torch.Tensor
    features: list[torch.Tensor]
    labels: torch.Tensor | None
    mask: torch.Tensor | None = None  # [n, seq] bool, real positions: the only ones the losses count


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
    mask_input: str | None = None  # the [batch, seq] 0/1 input that marks real positions
    trim: bool = False  # pooled batches are cut after their last real position
    positions: int = 0  # training positions per pass: real positions with a mask, else samples

    @classmethod
    def build(cls, feeds: Sequence[Feed], teacher: TeacherOutputs, labels: np.ndarray | None, config,
              output: str, output_op: str | None) -> TrainingData:
        first = teacher.outputs[0]
        if not np.issubdtype(first.dtype, np.floating):
            raise ValueError(f"the model's first output {output!r} is {first.dtype}, not float: there is no "
                             "gradient to distil through it (put the logits first among the graph outputs)")
        kind = config.loss
        if kind == "bce" and output_op != "Sigmoid":
            raise ValueError(f"loss: bce distils a Sigmoid output through its logits; {output!r} comes from "
                             f"{output_op or 'no node'}: use loss: auto, kl or mse")
        if kind == "auto" and output_op == "Sigmoid":
            kind = "bce"
        if kind == "auto":
            classifier = first.ndim == 2 or (output_op in ("Softmax", "LogSoftmax") and first.ndim >= 2)
            kind = "kl" if classifier and first.shape[-1] >= 2 else "mse"
        view = (lambda t: torch.log(t.clamp_min(1e-30))) if kind == "kl" and output_op == "Softmax" else (lambda t: t)
        notes: list[str] = []
        targets = [view(torch.from_numpy(np.ascontiguousarray(o)).float()) for o in teacher.outputs]
        feats = teacher.features
        pooled = _poolable(feeds, teacher)
        if not pooled:
            notes.append("samples are not independent along the first axis: one step per feed, used whole")
        mask_input, trim = _sequence_mask(feeds, teacher, config.padding_mask, pooled, notes)

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

        trim = trim and label_rows is None  # per-position labels are not cut with the batch
        items = []
        if pooled:
            names = list(feeds[0])
            arrays = {n: np.concatenate([f[n] for f in feeds]) for n in names}
            items.append(Batch({}, torch.cat(targets), [_concat(c) for c in zip(*feats)] if feats[0] else [],
                               torch.cat(label_rows) if label_rows else None))
            samples = len(items[0].teacher)
        else:
            arrays = None
            for i, feed in enumerate(feeds):
                mask = torch.from_numpy(feed[mask_input] != 0) if mask_input else None
                items.append(Batch({n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in feed.items()},
                                   targets[i], [_dense(f) for f in feats[i]], label_rows[i] if label_rows else None,
                                   mask))
            samples = len(feeds)
        positions = sum(int((f[mask_input] != 0).sum()) for f in feeds) if mask_input else samples
        return cls(output, kind, view, samples, label_rows is not None, notes, arrays, items, mask_input, trim,
                   positions)

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-self.samples // batch_size) if self.pooled is not None else len(self.items)

    def batches(self, order: Callable, generator: torch.Generator, batch_size: int) -> Iterator[Batch]:
        """One epoch in a seeded random order: pooled samples in batches, or whole feeds."""
        if self.pooled is None:
            for i in torch.randperm(len(self.items), generator=generator).tolist():
                yield self.items[i]
            return
        batches = order(self.samples, batch_size, generator)
        if self.trim:
            batches = self._by_length(batches, batch_size, generator)
        for index in batches:
            yield self._pick(index)

    def _by_length(self, batches: list[torch.Tensor], batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        """Re-cut the shuffled samples so each batch holds sentences of similar length (within windows of
        BUCKET_WINDOW batches, then the batches are shuffled again): a batch is cut at its longest
        sample, so this spends compute on real positions, not padding (a pass over 256 MiniLM calibration
        sentences at batch 16: 81 s instead of 121 s on a loaded 2-core machine)."""
        order = torch.cat(batches)
        lengths = torch.from_numpy((self.pooled[self.mask_input] != 0).sum(axis=1))
        window = batch_size * BUCKET_WINDOW
        resorted = [chunk[torch.argsort(lengths[chunk], stable=True)] for chunk in order.split(window)]
        cut = list(torch.cat(resorted).split(batch_size))
        return [cut[i] for i in torch.randperm(len(cut), generator=generator).tolist()]

    def in_order(self, chunk: int) -> Iterator[Batch]:
        if self.pooled is None:
            yield from self.items
            return
        order = torch.arange(self.samples)
        if self.trim:  # similar lengths together: each chunk is cut at its longest sample
            lengths = torch.from_numpy((self.pooled[self.mask_input] != 0).sum(axis=1))
            order = torch.argsort(lengths, stable=True)
        for index in order.split(chunk):
            yield self._pick(index)

    def _pick(self, index: torch.Tensor) -> Batch:
        whole = self.items[0]
        rows = index.numpy()
        feed = {n: a[rows] for n, a in self.pooled.items()}
        teacher, mask, length = whole.teacher[index], None, None
        real = feed[self.mask_input] != 0 if self.mask_input else None
        if self.trim:
            seq, length = real.shape[1], int(real_lengths(real).max())
            feed = {n: cut_positions(a, seq, length) for n, a in feed.items()}
            teacher, real = cut_positions(teacher, seq, length), real[:, :length]
        features = [f.take(rows, length) if isinstance(f, Packed) else
                    f[index] if length is None else cut_positions(f[index], seq, length) for f in whole.features]
        if real is not None:
            mask = torch.from_numpy(np.ascontiguousarray(real))
        return Batch(
            {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in feed.items()},
            teacher, features, None if whole.labels is None else whole.labels[index], mask,
        )


def _concat(parts: Sequence[np.ndarray | Packed]) -> torch.Tensor | Packed:
    """One feature over every feed: still packed when every feed's is, else dense."""
    if all(isinstance(p, Packed) for p in parts):
        return Packed.concat(parts)
    return torch.cat([_dense(p) for p in parts])


def _dense(value: np.ndarray | Packed) -> torch.Tensor:
    if isinstance(value, Packed):
        return value.take(np.arange(value.mask.shape[0]))
    return torch.from_numpy(np.ascontiguousarray(value))


def _sequence_mask(feeds: Sequence[Feed], teacher: TeacherOutputs, name: str | None, pooled: bool,
                   notes: list[str]) -> tuple[str | None, bool]:
    """(the mask input, or None; whether pooled batches may be cut after their last real position)."""
    if not name or name not in feeds[0]:
        return None, False
    for feed, out in zip(feeds, teacher.outputs):
        mask = feed.get(name)
        if not _is_mask(mask) or out.shape[:2] != mask.shape:
            notes.append(f"input {name!r} is not a [batch, seq] 0/1 mask over the output's first two axes: "
                         "every position counts in the loss")
            return None, False
    if not pooled:
        return name, False
    # Verify on the shortest samples of the first feed: cut, they must give the same real outputs.
    first, out = feeds[0], teacher.outputs[0]
    real = first[name] != 0
    rows = np.argsort(real.sum(axis=1), kind="stable")[:8]
    seq, length = real.shape[1], int(real_lengths(real[rows]).max())
    if length == seq:
        return name, False
    try:
        probe = teacher.run_first({n: cut_positions(a[rows], seq, length) for n, a in first.items()})
    except Exception:
        probe = None
    expected, kept = out[rows][:, :length], real[rows][:, :length]
    if probe is None or probe.shape != expected.shape or not np.allclose(
            probe[kept], expected[kept], rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(expected).max()))):
        notes.append(f"padding changes the outputs at real positions: batches keep all {seq} positions")
        return name, False
    return name, True


def _poolable(feeds: Sequence[Feed], teacher: TeacherOutputs) -> bool:
    """True when the first axis of every input, output and feature is one axis of samples."""
    for feed, out, feats in zip(feeds, teacher.outputs, teacher.features):
        if set(feed) != set(feeds[0]) or out.ndim == 0:
            return False
        n = out.shape[0]
        arrays = [*feed.values(), *(f.mask if isinstance(f, Packed) else f for f in feats)]
        if any(a.ndim == 0 or a.shape[0] != n for a in arrays):
            return False
    shapes = lambda pick: {pick(i).shape[1:] for i in range(len(feeds))}  # noqa: E731
    if any(len(shapes(lambda i, n=n: feeds[i][n])) > 1 for n in feeds[0]) or len(shapes(lambda i: teacher.outputs[i])) > 1:
        return False
    # Independent samples commute with reordering: the reversed every-other sub-batch must give
    # the same rows (catches a time or sequence axis first, and fixed batch sizes).
    first, n = feeds[0], teacher.outputs[0].shape[0]
    if n >= 2:
        rows = np.arange(n)[::-1][::2].copy()
        probe_feed, expected = {name: a[rows] for name, a in first.items()}, teacher.outputs[0][rows]
    elif len(feeds) >= 2:  # one sample per feed: two feeds stacked must run (a batch fixed at 1 does not)
        probe_feed = {name: np.concatenate([feeds[1][name], a]) for name, a in first.items()}
        expected = np.concatenate([teacher.outputs[1], teacher.outputs[0]])
    else:
        return True
    try:
        probe = teacher.run_first(probe_feed)
    except Exception:
        return False  # e.g. a fixed batch dimension
    return probe.shape == expected.shape and np.allclose(probe, expected, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(expected).max())))
