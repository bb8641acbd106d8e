"""Trials as Ray tasks, on a cluster (``--ray-address auto|HOST:PORT``) or a local Ray started here.

before: a prepared ``TrialRunner`` and batches of tasks.
after:  ``(index, result)`` pairs as the tasks finish (see ``executors.py``).

The runner — model bytes, calibration and evaluation data, the original's reference outputs — is
put in the object store once (``ray.put``). Tasks receive the reference wrapped in a list, so Ray
does not resolve it per task; each worker process fetches it on its first task and keeps it for the
search (``_WORKER_RUNNER``). This is the only module that imports Ray (``pip install 'modelpress[ray]'``).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

from modelpress.compressors.errors import InputError
from modelpress.compressors.search.executors import RAY_MISSING, ExecutorFailure

try:
    import ray
except ImportError:  # pragma: no cover — check_executor says so before the search starts
    raise InputError(RAY_MISSING) from None


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None, workers: int | None):
        self.started_here = False
        if not ray.is_initialized():
            options = {"logging_level": logging.ERROR, "log_to_driver": False}
            try:
                if address:
                    ray.init(address=address, **options)
                else:  # a local Ray for this search only
                    ray.init(num_cpus=workers, include_dashboard=False, **options)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {address!r}" if address else "a local Ray instance"
                hint = (" (start one with `ray start --head`, then pass --ray-address auto on that machine or "
                        "HOST:6379 elsewhere)" if address else "")
                raise InputError(f"--executor ray: cannot connect to {where}: {str(exc).strip()[:300]}{hint}") from None
            self.started_here = True
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.token = uuid.uuid4().hex
        self.runner_ref = None

    def start(self, runner) -> None:
        self.runner_ref = ray.put(runner)

    def run(self, tasks: list) -> Iterator[tuple[int, dict[str, Any]]]:
        futures = {_trial.remote([self.runner_ref], self.token, task): index for index, task in enumerate(tasks)}
        pending = list(futures)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        raise ExecutorFailure(f"a Ray task was lost: {type(exc).__name__}: {str(exc)[:300]}") from None
                    yield futures[ref], result
        finally:
            for ref in pending:
                ray.cancel(ref)

    def close(self) -> None:
        self.runner_ref = None
        if self.started_here:
            ray.shutdown()


_WORKER_RUNNER: tuple[str, Any] | None = None


@ray.remote(num_cpus=1, max_retries=1)
def _trial(boxed_runner: list, token: str, task) -> dict[str, Any]:
    global _WORKER_RUNNER
    if _WORKER_RUNNER is None or _WORKER_RUNNER[0] != token:
        _WORKER_RUNNER = (token, ray.get(boxed_runner[0]))
    return _WORKER_RUNNER[1].run(task)
