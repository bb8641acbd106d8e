"""Calibration feeds without most of their padding: samples pooled, sorted by length, re-batched, cut.

before: calibration feeds whose samples are padded to a fixed length (a tokenizer's 128 positions
for sentences of ~15 tokens), with a [batch, seq] 0/1 padding-mask input such as ``attention_mask``.
after:  the same samples in feeds of the same batch size, grouped by real length and each feed cut
after its longest real position — or the feeds unchanged, with the reason, when that is not safe.

Why: statistics that leave padding out (``calibration.select_rows``) still pay for running the
model over it: on docstring sentences padded to 128 tokens 88 % of every capture run computes
padding. Cutting is safe only when a real position's values do not depend on the padding after it
(an attention mask that hides it); that is measured, not assumed: the model is run on the shortest
samples of the first feed uncut and cut, and every output must agree at the real positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Feed = dict[str, np.ndarray]


def compact_feeds(model_bytes: bytes, feeds: Sequence[Feed], mask_name: str | None,
                  threads: int = 1) -> tuple[list[Feed], str | None]:
    """(feeds, note): the compacted feeds, or the originals and why they were kept (None when there
    is no padding to cut, e.g. no mask input)."""
    feeds = list(feeds)
    if not feeds or not mask_name or any(mask_name not in feed for feed in feeds):
        return feeds, None
    if not _poolable(feeds, mask_name):
        return feeds, f"calibration feeds keep their padding: {mask_name!r} is not a [batch, seq] 0/1 mask " \
                      "shared by samples that can be regrouped"
    names = sorted(feeds[0])
    pooled = {n: np.concatenate([f[n] for f in feeds]) for n in names}
    mask = pooled[mask_name] != 0
    seq = mask.shape[1]
    lengths = real_lengths(mask)
    order = np.argsort(lengths, kind="stable")
    batch = max(len(f[mask_name]) for f in feeds)
    shortest = order[: min(batch, 8)]
    if int(lengths[shortest].max()) == seq:
        return feeds, None  # even the shortest samples fill every position: nothing to cut
    if not _cut_is_exact(model_bytes, {n: a[shortest] for n, a in pooled.items()}, mask_name, threads):
        return feeds, "calibration feeds keep their padding: the model's outputs at real positions change " \
                      "when the padding after them is cut"
    compacted = []
    for start in range(0, len(order), batch):
        rows = order[start : start + batch]
        length = int(lengths[rows].max())
        compacted.append({n: np.ascontiguousarray(cut_positions(pooled[n][rows], seq, length)) for n in names})
    return compacted, None


def real_lengths(mask: np.ndarray) -> np.ndarray:
    """Per sample, the positions up to its last real one (at least 1)."""
    last = mask.shape[1] - np.argmax(mask[:, ::-1], axis=1)
    return np.where(mask.any(axis=1), last, 1)


def cut_positions(array, seq: int, length: int):
    """The first ``length`` positions of the sequence axis (axis 1) of an array (or torch tensor) that
    has one of ``seq`` positions; anything else as it is."""
    return array[:, :length] if array.ndim >= 2 and array.shape[1] == seq else array


def _poolable(feeds: Sequence[Feed], mask_name: str) -> bool:
    """Every feed has the same inputs, each with the samples on its first axis and the same trailing
    shape in every feed, and the mask is a [batch, seq] 0/1 integer or bool array."""
    names = set(feeds[0])
    for feed in feeds:
        mask = feed[mask_name]
        if set(feed) != names or mask.ndim != 2 or mask.dtype.kind not in "biu" or not np.isin(mask, (0, 1)).all():
            return False
        if any(np.ndim(a) < 1 or len(a) != len(mask) for a in feed.values()):
            return False
    return all(len({f[n].shape[1:] for f in feeds}) == 1 for n in names)


def _cut_is_exact(model_bytes: bytes, feed: Feed, mask_name: str, threads: int) -> bool:
    import onnxruntime as ort

    mask = feed[mask_name] != 0
    seq, length = mask.shape[1], int(real_lengths(mask).max())
    if length == seq:
        return True
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = max(1, threads)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        whole = session.run(None, feed)
        cut = session.run(None, {n: cut_positions(a, seq, length) for n, a in feed.items()})
    except Exception:  # noqa: BLE001 — e.g. a fixed sequence length: keep the feeds as they are
        return False
    for full, part in zip(whole, cut):
        full, part = np.asarray(full), np.asarray(part)
        if full.ndim >= 2 and full.shape[:2] == mask.shape:
            full, part, kept = full[:, :length], part, mask[:, :length]
            if part.shape != full.shape:
                return False
            full, part = full[kept], part[kept]
        elif part.shape != full.shape:
            return False
        if full.dtype.kind == "f":
            scale = max(1.0, float(np.abs(full).max())) if full.size else 1.0
            if not np.allclose(part, full, rtol=1e-4, atol=1e-4 * scale):
                return False
        elif not np.array_equal(part, full):
            return False
    return True
