"""``--data``: the feeds that calibrate and evaluate a model, checked against its inputs
(``model_inputs.py`` reads them from the model).

before: a path the user gave (an ``.npz`` whose arrays are named after the model's inputs with the
samples on the first axis, plus an optional ``labels`` array; or a folder of ``.npz`` files, each one
complete feed), or nothing but the model's signature and ``--shape`` flags.
after:  a ``Dataset`` of feeds ready for ``InferenceSession.run``, every name, dtype, rank and fixed
dim already checked, so that a mistake in the data is one ``InputError`` naming the file, the tensor
and the fix, before any pass runs.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from modelpress.compressors.errors import InputError, did_you_mean
from modelpress.compressors.model_inputs import InputSpec, format_shape

Feed = dict[str, np.ndarray]
LABELS = "labels"


@dataclass
class Dataset:
    """Feeds for ``session.run`` and, optionally, the labels of their samples in feed order.

    ``feed_samples[i]`` is how many samples feed ``i`` holds (its slice of ``labels``). In the
    ``.npz`` and synthetic layouts that is the first axis of every input; in the folder layout a
    feed's samples are its ``labels`` length, or 1 per file without labels (the batch axis of such
    a feed is unknown). ``sliceable`` says the first axis of every input is a dynamic sample axis,
    so a feed may be cut down to one sample.
    """

    feeds: list[Feed]
    labels: np.ndarray | None
    samples: int
    source: str
    feed_samples: list[int] = field(default_factory=list)
    sliceable: bool = False

    def __post_init__(self) -> None:
        if not self.feed_samples:
            self.feed_samples = [1] * len(self.feeds)

    def latency_feed(self) -> tuple[Feed, int]:
        """The feed to time and how many samples it holds: one sample when the batch axis is
        dynamic, else the first feed as it is (a fixed batch, or a folder feed)."""
        if self.sliceable:
            return {name: array[:1] for name, array in self.feeds[0].items()}, 1
        return self.feeds[0], self.feed_samples[0]

    def first_sample_feed(self) -> Feed:
        return self.latency_feed()[0]

    def split(self, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """``(kept, held_out)``: ``held_out`` holds about ``fraction`` of the data, chosen at random
        but deterministically from ``seed``. Samples are drawn one by one when the batch axis is
        dynamic, otherwise whole feeds move (a fixed batch or a folder feed cannot be cut)."""
        if not 0 < fraction < 1:
            raise InputError(f"split fraction must be between 0 and 1, got {fraction}")
        rng = np.random.default_rng(seed)
        if self.sliceable:
            units = self.samples
        else:
            units = len(self.feeds)
        if units < 2:
            raise InputError(f"{self.source}: {units} {'sample' if self.sliceable else 'feed'} cannot be split in two")
        held = min(units - 1, max(1, round(units * fraction)))
        order = rng.permutation(units)
        held_idx, kept_idx = np.sort(order[:held]), np.sort(order[held:])
        pick = self._pick_samples if self.sliceable else self._pick_feeds
        return pick(kept_idx, "kept"), pick(held_idx, "held out")

    def _pick_samples(self, indices: np.ndarray, part: str) -> Dataset:
        names = list(self.feeds[0])
        whole = {n: np.concatenate([f[n] for f in self.feeds]) for n in names}
        chunk = max(self.feed_samples)
        chosen = {n: whole[n][indices] for n in names}
        feeds = [{n: chosen[n][i : i + chunk] for n in names} for i in range(0, len(indices), chunk)]
        labels = None if self.labels is None else self.labels[indices]
        return Dataset(feeds, labels, len(indices), f"{self.source} ({part})", [len(next(iter(f.values()))) for f in feeds], True)

    def _pick_feeds(self, indices: np.ndarray, part: str) -> Dataset:
        offsets = np.concatenate([[0], np.cumsum(self.feed_samples)])
        feeds = [self.feeds[i] for i in indices]
        counts = [self.feed_samples[i] for i in indices]
        labels = None
        if self.labels is not None:
            labels = np.concatenate([self.labels[offsets[i] : offsets[i + 1]] for i in indices])
        return replace(self, feeds=feeds, labels=labels, samples=sum(counts), feed_samples=counts,
                       source=f"{self.source} ({part})")


# --------------------------------------------------------------------------- --data files


def load_data(path: str | os.PathLike, inputs: list[InputSpec], batch_size: int = 64) -> Dataset:
    """Read ``--data``: an ``.npz`` with samples on the first axis, or a folder of ``.npz`` feeds.

    In an ``.npz``, each input's first axis is the samples and stands for the model's batch dim:
    a dynamic batch dim is filled with chunks of ``batch_size`` samples, a fixed batch dim N with
    chunks of N (the sample count must then be a multiple of N). An array named ``labels`` is
    the labels unless the model itself has an input of that name.
    """
    path = Path(path)
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    if path.is_dir():
        return _load_folder(path, inputs)
    if not path.exists():
        raise InputError(f"{path}: no such data file or folder")
    if path.suffix != ".npz":
        raise InputError(
            f"{path}: --data takes an .npz file (arrays named after the model inputs, plus optional "
            f"'labels') or a folder of .npz files; write one with numpy.savez({path.stem}.npz, <input name>=array)"
        )
    arrays = read_npz(path)
    labels = _pop_labels(arrays, inputs, path)
    _check_names(arrays, inputs, path)
    checked: dict[str, np.ndarray] = {}
    for spec in inputs:
        array = _cast(arrays[spec.name], spec, path)
        if spec.shape is not None:
            if len(spec.shape) == 0:
                raise InputError(
                    f"{path}: input {spec.name!r} is a scalar, so it has no sample axis to stack in one .npz; "
                    "use a folder of .npz files, each one complete feed"
                )
            _check_rank_and_dims(array, spec, path, sample_axis=True)
        elif array.ndim == 0:
            raise InputError(f"{path}: input {spec.name!r}: a 0-d array has no sample axis; the first axis holds the samples")
        checked[spec.name] = array
    counts = {name: array.shape[0] for name, array in checked.items()}
    samples = next(iter(counts.values()), 0)
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{n}: {c}" for n, c in counts.items())
        raise InputError(f"{path}: the inputs hold different numbers of samples on their first axis ({listed}); they must agree")
    if samples == 0:
        raise InputError(f"{path}: the arrays hold no samples (first axis has length 0)")
    if labels is not None and (labels.ndim == 0 or labels.shape[0] != samples):
        held = "a 0-d array" if labels.ndim == 0 else f"{labels.shape[0]} entries"
        raise InputError(f"{path}: 'labels' holds {held} but the inputs hold {samples} samples; give one label per sample")

    fixed = {spec.name: spec.shape[0] for spec in inputs if spec.shape and isinstance(spec.shape[0], int)}
    if len(set(fixed.values())) > 1:
        listed = ", ".join(f"{n}: {b}" for n, b in fixed.items())
        raise InputError(f"{path}: the model's inputs fix different batch sizes ({listed}); use a folder of .npz feeds")
    if fixed:
        chunk = next(iter(fixed.values()))
        if samples % chunk:
            name = next(iter(fixed))
            raise InputError(
                f"{path}: input {name!r} has a fixed batch dim of {chunk}, so the sample count must be a multiple "
                f"of {chunk}; the file holds {samples}: drop the last {samples % chunk} or pad to {samples + chunk - samples % chunk}"
            )
    else:
        chunk = batch_size
    feeds = [{n: a[i : i + chunk] for n, a in checked.items()} for i in range(0, samples, chunk)]
    counts_per_feed = [min(chunk, samples - i) for i in range(0, samples, chunk)]
    return Dataset(feeds, labels, samples, str(path), counts_per_feed, sliceable=not fixed)


def _load_folder(folder: Path, inputs: list[InputSpec]) -> Dataset:
    files = sorted(p for p in folder.iterdir() if p.suffix == ".npz" and p.is_file())
    if not files:
        seen = sorted(p.name for p in folder.iterdir())[:5]
        raise InputError(
            f"{folder}: the folder holds no .npz files (found: {', '.join(seen) or 'nothing'}); "
            "each feed must be an .npz with arrays named after the model inputs"
        )
    feeds, label_parts, counts, without = [], [], [], []
    for file in files:
        arrays = read_npz(file)
        labels = _pop_labels(arrays, inputs, file)
        _check_names(arrays, inputs, file)
        feed = {}
        for spec in inputs:
            array = _cast(arrays[spec.name], spec, file)
            if spec.shape is not None:
                _check_rank_and_dims(array, spec, file, sample_axis=False)
            feed[spec.name] = array
        feeds.append(feed)
        if labels is None:
            without.append(file.name)
            counts.append(1)
        else:
            labels = labels.reshape(1) if labels.ndim == 0 else labels
            label_parts.append(labels)
            counts.append(len(labels))
    if label_parts and without:
        raise InputError(
            f"{folder}: some feeds have 'labels' and some do not (without: {', '.join(without[:5])}"
            f"{', ...' if len(without) > 5 else ''}); give labels in every file or in none"
        )
    labels = None
    if label_parts:
        try:
            labels = np.concatenate(label_parts)
        except ValueError:
            raise InputError(f"{folder}: the 'labels' arrays of the files have different shapes beyond the first axis") from None
    return Dataset(feeds, labels, sum(counts), str(folder), counts, sliceable=False)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an .npz, never unpickling: object arrays are refused."""
    if not zipfile.is_zipfile(path):
        # np.load would take it for a pickle; say what it is not.
        raise InputError(f"{path}: not a readable .npz file (not a zip archive); write it with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except ValueError as exc:
        if "pickle" in str(exc):
            raise InputError(
                f"{path}: holds an object (pickled) array, which modelpress does not load; "
                "store numeric arrays (e.g. np.asarray(x, dtype=np.float32))"
            ) from None
        raise InputError(f"{path}: not a readable .npz file ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise InputError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc}); write it with numpy.savez") from None


def _pop_labels(arrays: dict[str, np.ndarray], inputs: list[InputSpec], path: Path) -> np.ndarray | None:
    if LABELS in {spec.name for spec in inputs}:
        return None
    labels = arrays.pop(LABELS, None)
    if labels is not None and labels.dtype.kind not in "biuf":
        raise InputError(f"{path}: 'labels' must hold numeric class indices, not {labels.dtype}")
    return labels


def _check_names(arrays: dict[str, np.ndarray], inputs: list[InputSpec], path: Path) -> None:
    expected = [spec.name for spec in inputs]
    missing = [name for name in expected if name not in arrays]
    unknown = [name for name in arrays if name not in expected]
    if not missing and not unknown:
        return
    problems = []
    if missing:
        parts = []
        for name in missing:
            parts.append(repr(name) + did_you_mean(name, unknown or list(arrays), ignore_case=True))
        problems.append(f"missing model input(s) {', '.join(parts)}")
    if unknown:
        parts = []
        for name in unknown:
            parts.append(repr(name) + did_you_mean(name, missing or expected, ignore_case=True))
        problems.append(f"array(s) {', '.join(parts)} match no model input")
    wanted = "; ".join(spec.describe() for spec in inputs)
    found = ", ".join(sorted(arrays)) or "no input arrays"
    raise InputError(
        f"{path}: {'; '.join(problems)}. The model expects: {wanted}. The file holds: {found}. "
        f"Name each array after a model input (plus an optional {LABELS!r})."
    )


def _cast(array: np.ndarray, spec: InputSpec, path: Path) -> np.ndarray:
    """Convert to the input's dtype only where nothing is lost or reinterpreted: a float to a
    narrower float, an integer to another integer type that holds every value."""
    want, have = spec.dtype, array.dtype
    if have == want:
        return np.asarray(array, order="C")  # not ascontiguousarray: it makes a 0-d array 1-d
    where = f"{path}: input {spec.name!r}"
    if want.kind == "f" and have.kind == "f":
        finite = array[np.isfinite(array)]
        if finite.size and np.abs(finite).max() > np.finfo(want).max:
            raise InputError(f"{where}: values up to {np.abs(finite).max():g} overflow the model's {want}")
        return np.asarray(array, dtype=want, order="C")
    if want.kind in "iu" and have.kind in "iu":
        info = np.iinfo(want)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise InputError(
                f"{where}: the model expects {want}, and the values in [{array.min()}, {array.max()}] do not fit it"
            )
        return np.asarray(array, dtype=want, order="C")
    if want.kind == "O" and have.kind in "US":
        return array
    if want.kind == "f" and have.kind in "iub":
        hint = f"if the values really are {want} data, store them with .astype(np.{want})"
    elif want.kind in "iu" and have.kind == "f":
        hint = f"indices such as token ids must be stored as integers (.astype(np.{want}))"
    else:
        hint = f"store it as {want}"
    raise InputError(f"{where}: the model expects {want} {format_shape(spec.shape)}, the file holds {have}; {hint}")


def _check_rank_and_dims(array: np.ndarray, spec: InputSpec, path: Path, sample_axis: bool) -> None:
    shape = spec.shape
    layout = "first axis = samples, standing for the model's batch dim" if sample_axis else "one complete feed"
    if array.ndim != len(shape):
        hint = ""
        if array.ndim == len(shape) - 1:
            hint = " If the file holds a single sample, add the leading axis (x[None])."
        raise InputError(
            f"{path}: input {spec.name!r} has rank {array.ndim} {list(array.shape)} but the model expects rank "
            f"{len(shape)} {format_shape(shape)} ({layout}).{hint}"
        )
    start = 1 if sample_axis else 0
    for axis in range(start, len(shape)):
        dim = shape[axis]
        if isinstance(dim, int) and array.shape[axis] != dim:
            raise InputError(
                f"{path}: input {spec.name!r} has shape {list(array.shape)} but the model fixes dim {axis} "
                f"to {dim} (expects {format_shape(shape)}, {layout})"
            )
