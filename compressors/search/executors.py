"""Where trials run: in this process, in a small process pool, or as Ray tasks (``ray_executor.py``).

before: a prepared ``TrialRunner`` and a batch of tasks.
after:  ``(index, result)`` pairs, yielded as each trial finishes — in any order. The search files
every result under its task's index and decides only once the whole batch is in, so the path it
takes (and the configuration it chooses) does not depend on the executor or on completion order.

An executor ships the runner to its workers once (``start``): a pool initializer unpickles it in
every worker process, Ray puts it in the object store. ``close`` stops what ``start`` started.
Pool workers are spawned, so they import ``__main__`` again: a script that calls ``compress`` with
``workers > 1`` needs the usual ``if __name__ == "__main__":`` guard (the ``modelpress`` command has it).
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import signal
from collections.abc import Iterator
from typing import Any

from modelpress.compressors.errors import InputError

EXECUTORS = ("local", "ray")
RAY_MISSING = "--executor ray needs Ray, an optional extra: pip install 'modelpress[ray]'"


class ExecutorFailure(Exception):
    """The executor lost trials (a worker died, the cluster went away): the search stops with the
    best configuration so far, and those trials are not journaled, so --resume runs them again."""


def check_executor(kind: str | None, workers: int | None, address: str | None) -> str:
    """The executor's name, validated before anything runs (exit 2 on a bad combination)."""
    kind = kind or ("ray" if address else "local")
    if kind not in EXECUTORS:
        raise InputError(f"--executor {kind!r}: choose one of {', '.join(EXECUTORS)}")
    if workers is not None and workers < 1:
        raise InputError(f"--workers {workers}: at least 1")
    if kind == "local" and address:
        raise InputError("--ray-address joins a Ray cluster; it needs --executor ray")
    if kind == "ray" and importlib.util.find_spec("ray") is None:
        raise InputError(RAY_MISSING)
    return kind


def make_executor(kind: str, workers: int | None = None, address: str | None = None):
    if kind == "ray":
        from modelpress.compressors.search.ray_executor import (
            RayExecutor,  # the only place Ray is imported
        )

        return RayExecutor(address, workers)
    return ProcessPool(workers) if workers and workers > 1 else InProcess()


class InProcess:
    """Trials one after the other in this process (the default)."""

    name = "local"
    workers = 1

    def start(self, runner) -> None:
        self.runner = runner

    def run(self, tasks: list) -> Iterator[tuple[int, dict[str, Any]]]:
        for index, task in enumerate(tasks):
            yield index, self.runner.run(task)

    def close(self) -> None:
        pass


class ProcessPool:
    """Trials in ``workers`` processes of this machine (spawned: torch and ONNX Runtime do not
    survive a fork), each holding its own unpickled copy of the runner."""

    name = "local"

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = None

    def start(self, runner) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_init_worker, initargs=(pickle.dumps(runner), self.workers))

    def run(self, tasks: list) -> Iterator[tuple[int, dict[str, Any]]]:
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool

        futures = {self.pool.submit(_run_in_worker, task): index for index, task in enumerate(tasks)}
        try:
            for future in as_completed(futures):
                try:
                    result = future.result()
                except BrokenProcessPool as exc:
                    raise ExecutorFailure(f"a worker process died: {exc}") from None
                yield futures[future], result
        finally:
            for future in futures:
                future.cancel()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


_RUNNER = None


def _init_worker(runner: bytes, workers: int) -> None:
    global _RUNNER
    # Ctrl-C is for the main process: it stops the search and writes the best so far; workers
    # killed by the same signal would only break the pool under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _share_cores(workers)
    _RUNNER = pickle.loads(runner)


def _run_in_worker(task) -> dict[str, Any]:
    return _RUNNER.run(task)


def _share_cores(workers: int) -> None:
    """Each worker's torch (imported later, by the passes that need it) gets its share of the cores
    rather than all of them each; set before the import, so importing torch is not paid up front."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
