"""The search's journal: every finished trial on disk, so an interrupted search can resume.

before: ``--search-dir`` (or none: the journal then lives in memory only) and the fingerprint of
everything the trials depend on (model, space, gates, seed, data).
after:  ``<search-dir>/journal.jsonl`` — a header line, then one JSON line per finished trial
(proxy: group, choice, loss, cost, seconds, error; full: configuration, metrics, gates, sizes,
seconds), flushed and fsynced before the search moves on — and ``best.json``, the best trial so far.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from modelpress.compressors.errors import InputError
from modelpress.compressors.model import write_atomic
from modelpress.compressors.report import _finite

JOURNAL = "journal.jsonl"
BEST = "best.json"
JOURNAL_VERSION = 1


class Journal:
    """Append-only JSON lines: a header with the fingerprint of model, space, gates, seed and data,
    then one line per finished trial."""

    def __init__(self, folder: Path | None, fingerprint: str, resume: bool):
        self.path = folder / JOURNAL if folder else None
        self.folder = folder
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path is None:
            if resume:
                raise InputError("--resume needs --search-dir: the folder of the search's journal")
            return
        if self.path.exists() and self.path.stat().st_size:
            if resume:
                self._load(fingerprint)
                return
            # Not even with --force: that flag replaces outputs, and a journal can hold hours of trials.
            raise InputError(f"{self.path}: a search journal is already there; pass --resume to continue it, "
                             "or choose another --search-dir (or delete it) to start over")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = {"kind": "header", "version": JOURNAL_VERSION, "fingerprint": fingerprint}
        write_atomic((json.dumps(header) + "\n").encode(), self.path)

    def _load(self, fingerprint: str) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            header = json.loads(lines[0])
        except (json.JSONDecodeError, IndexError):
            header = {}
        if header.get("kind") != "header" or header.get("version") != JOURNAL_VERSION:
            raise InputError(f"{self.path}: not a modelpress search journal (version {JOURNAL_VERSION})")
        if header.get("fingerprint") != fingerprint:
            raise InputError(f"{self.path}: the journal was written for another model, search space, gate, seed or "
                             "data; resume with the same inputs, or start over in another --search-dir")
        kept = [lines[0]]
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break  # the line a killed process was writing; that trial is run again
            self.entries[entry["key"]] = entry
            kept.append(line)
        if len(kept) != len(lines):
            write_atomic(("\n".join(kept) + "\n").encode(), self.path)

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def append(self, entry: dict[str, Any]) -> None:
        self.entries[entry["key"]] = entry
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(_finite(entry), sort_keys=True) + "\n")
                handle.flush()
                os.fsync(handle.fileno())

    def write_best(self, document: dict[str, Any]) -> None:
        if self.folder is not None:
            write_atomic((json.dumps(_finite(document), indent=2, sort_keys=True) + "\n").encode(), self.folder / BEST)


def fingerprint(original: bytes, space, gates, seed: int, *datasets) -> str:
    """What the trials depend on; not where they run (a search started locally resumes on Ray)."""
    digest = hashlib.sha256(original)
    settings = {"space": space.model_dump(mode="json"), "gates": gates.model_dump(mode="json"), "seed": seed}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for dataset in datasets:
        for feed in dataset.feeds:
            for name in sorted(feed):
                digest.update(name.encode())
                digest.update(feed[name].tobytes())
        if dataset.labels is not None:
            digest.update(dataset.labels.tobytes())
    return digest.hexdigest()
