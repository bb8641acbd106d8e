"""How close a compressed model's outputs are to the original's, per sample.

Two kinds of outputs are told apart, because one number cannot judge both:

* **scores** — float outputs of rank 2 (``[N, classes]``) and integer outputs: the argmax is a
  decision, so top-1 ``agreement`` is measured, and the cosine of each sample's output row. One
  score per sample (``[N]``, ``[N, 1]``: a binary classifier) is decided by a threshold instead.
  ``[N, classes, 1, 1]`` (pooled axes left on) counts as ``[N, classes]``.
* **features** — float outputs of rank 3 or more (token embeddings ``[N, T, D]``, feature maps):
  an argmax over hidden features decides nothing, so there is no agreement, only the cosine of each
  sample's output. When the feed carries a padding mask (an integer input named like ``*mask*``,
  shaped ``[N, T]`` like the output's first two axes, holding only 0 and 1), the padded positions are
  left out: their values are never used downstream, and int8 kernels change them the most.
What the graph shows (``output_kind.py``) refines this: a rank >= 3 output behind a classifier head
is **scores per position** (CTC logits, token tags): agreement counts the positions whose argmax over
the last axis is unchanged (padded positions left out); an L2-normalized ``[N, D]`` output is an
**embedding**: a feature, judged by cosine only.
"""

from __future__ import annotations

import numpy as np

Feed = dict[str, np.ndarray]


def is_features(output: np.ndarray) -> bool:
    return output.dtype.kind == "f" and output.ndim >= 3 and not _pooled_scores(output)


def _pooled_scores(output: np.ndarray) -> bool:
    """[N, classes, 1, 1]: class scores with the pooled spatial axes left on (Caffe-era classifiers,
    SqueezeNet and DenseNet of the ONNX model zoo) — scores, not a feature map."""
    return output.ndim >= 3 and all(d == 1 for d in output.shape[2:])


def _squeezed(output: np.ndarray) -> np.ndarray:
    """Float class scores [N, classes, 1, 1] as [N, classes]; anything else as it is."""
    return output.reshape(output.shape[:2]) if output.dtype.kind == "f" and _pooled_scores(output) else output


def predictions(output: np.ndarray, per_position: bool = False, threshold: float | None = None) -> np.ndarray | None:
    """Decisions: argmax over the last axis of float scores [N, classes]; integer or bool outputs
    already are decisions. One float score per sample ([N] or [N, 1], a binary classifier) is
    decided by ``threshold`` (default ``score_threshold(output)``): an argmax over one column would
    always say 0, so a sigmoid's 0.28 -> 0.61 counted as agreeing. None for features — unless
    ``per_position`` (labels given per position, e.g. token classes [N, T] for scores [N, T, C])."""
    if output.dtype.kind in "biu":
        return output
    output = _squeezed(output)
    if is_one_score(output):
        scores = output.reshape(len(output))
        return scores > (score_threshold(output) if threshold is None else threshold)
    if output.ndim == 2 or (per_position and output.ndim > 2):
        return output.argmax(axis=-1)
    return None


def is_one_score(output: np.ndarray) -> bool:
    output = _squeezed(output)
    return output.dtype.kind == "f" and (output.ndim == 1 or (output.ndim == 2 and output.shape[1] == 1))


def score_threshold(scores: np.ndarray) -> float:
    """0.5 for probabilities (every score in [0, 1], give or take the 1e-3 a quantized sigmoid can
    overshoot by), else 0 (logits)."""
    return 0.5 if scores.size and float(scores.min()) >= -1e-3 and float(scores.max()) <= 1.0 + 1e-3 else 0.0


def padding_mask(feed: Feed | None, output: np.ndarray) -> np.ndarray | None:
    """The feed's padding mask for a feature output, as booleans [N, T], or None."""
    if feed is None or not is_features(output):
        return None
    for name in sorted(feed):
        array = np.asarray(feed[name])
        if "mask" not in name.lower() or array.dtype.kind not in "biu" or array.shape != output.shape[:2]:
            continue
        if np.isin(array, (0, 1)).all():
            return array.astype(bool)
    return None


def sample_cosines(reference: np.ndarray, candidate: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """The cosine of each sample's output (the first axis is the sample; a rank < 2 output is one
    sample), over the unmasked positions only when a mask is given. Two all-zero rows count as 1."""
    a = np.asarray(reference, np.float64)
    b = np.asarray(candidate, np.float64)
    if a.ndim < 2:
        a, b = a.reshape(1, -1), b.reshape(1, -1)
    if mask is not None:
        keep = mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim)).astype(np.float64)
        a, b = a * keep, b * keep
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    dot = np.einsum("ij,ij->i", a, b)
    norm_a, norm_b = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (norm_a == 0) & (norm_b == 0)
    norms = norm_a * norm_b
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(both_zero, 1.0, np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0))


class OutputFidelity:
    """Accumulates, feed by feed, a compressed model's output against the original's."""

    def __init__(self, kind: str = "auto") -> None:
        self.kind = kind  # output_kind: "positions", "embedding" or "auto"
        self.cosines: list[np.ndarray] = []
        self.agree = self.compared = 0
        self.abs_sum = 0.0
        self.abs_max = 0.0
        self.elements = 0
        self.decisions = True  # every output so far had decisions to agree on
        self.masked = False  # a padding mask was applied

    def add(self, reference: np.ndarray, candidate: np.ndarray, feed: Feed | None = None,
            kind: str | None = None) -> None:
        """``kind``: what this output holds (``output_kind``; default: as given at construction)."""
        kind = self.kind if kind is None else kind
        mask = padding_mask(feed, reference)
        self.masked |= mask is not None
        self.cosines.append(sample_cosines(reference, candidate, mask))
        diff = np.abs(np.asarray(reference, np.float64) - np.asarray(candidate, np.float64))
        if mask is not None:
            diff = diff[mask]
        if diff.size:
            self.abs_sum += float(diff.sum())
            self.abs_max = max(self.abs_max, float(diff.max()))
            self.elements += diff.size
        # A single score is decided at the reference's threshold on both sides: a probability the
        # compressed model pushes to 1.0001 must not switch it to the logit threshold.
        threshold = score_threshold(reference) if is_one_score(reference) else None
        per_position = kind == "positions" and reference.ndim >= 3
        ref_pred = None if kind == "embedding" else predictions(reference, per_position, threshold)
        cand_pred = None if ref_pred is None else predictions(candidate, per_position, threshold)
        if ref_pred is not None and mask is not None and per_position:
            ref_pred, cand_pred = ref_pred[mask], cand_pred[mask]
        if ref_pred is None:
            self.decisions = False
        else:
            self.agree += int(np.count_nonzero(ref_pred == cand_pred))
            self.compared += ref_pred.size

    def values(self) -> dict[str, float]:
        cosines = np.concatenate(self.cosines) if self.cosines else np.zeros(0)
        metrics: dict[str, float] = {}
        if self.decisions and self.compared:
            metrics["agreement"] = self.agree / self.compared
        metrics["cosine"] = float(cosines.mean()) if cosines.size else float("nan")
        metrics["worst_cosine"] = float(cosines.min()) if cosines.size else float("nan")
        metrics["max_abs_error"] = self.abs_max
        metrics["mean_abs_error"] = self.abs_sum / self.elements if self.elements else 0.0
        return metrics
