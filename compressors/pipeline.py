"""The pass manager: a pass base class and ``run_passes``, which applies passes in stage order.

before: a normalized ``onnx_ir.Model`` and a list of configured passes.
after:  the same model edited in place by each pass, checked after every pass (onnx checker and
an onnxruntime session load), with a timed record per pass.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir
from pydantic import BaseModel, ConfigDict

from modelpress.compressors.errors import InputError, PassFailure
from modelpress.compressors.model import check_model

Stage = Literal["prune", "quantize", "encode"]
STAGES: tuple[Stage, ...] = ("prune", "quantize", "encode")

Feed = dict[str, np.ndarray]


class PassConfig(BaseModel):
    """Base of every pass config: frozen, typed, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass
class PassContext:
    """What a pass may use besides the model: calibration feeds, a seed, a progress hook."""

    calibration: list[Feed] | None = None
    # Labels of the calibration samples (concatenated over feeds) when the data has them.
    labels: np.ndarray | None = None
    # The input model, serialized: the teacher for recovery and the reference for fidelity checks.
    original: bytes | None = None
    seed: int = 0
    threads: int = 2
    # progress(description, completed, total): passes report long loops through this.
    progress: Callable[[str, int, int], None] = lambda description, completed, total: None


@dataclass
class PassResult:
    model: ir.Model
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


class Pass(ABC):
    """One transformation. Subclasses set ``name``, ``stage``, ``config_cls`` and ``summary``."""

    name: ClassVar[str]
    stage: ClassVar[Stage]
    config_cls: ClassVar[type[PassConfig]]
    summary: ClassVar[str]
    needs_calibration: ClassVar[bool] = False
    # True when the pass reads ``context.original`` (the input model), e.g. as a teacher.
    needs_original: ClassVar[bool] = False

    @classmethod
    def calibrates(cls, config: PassConfig) -> bool:
        """Does the pass, so configured, need real inputs (--data)? By default ``needs_calibration``."""
        return cls.needs_calibration

    def __init__(self, config: PassConfig, context: PassContext | None = None):
        self.config = config
        self.context = context or PassContext()

    @abstractmethod
    def call(self, model: ir.Model) -> PassResult:
        """Edit ``model`` in place and return it with statistics; never print."""


class EncodePass(ABC):
    """An encode-stage pass works on the final serialized ONNX bytes, not on the graph.

    Its artifact must decode back to exactly those bytes, so it sees them only once they are final.
    """

    name: ClassVar[str]
    stage: ClassVar[Stage] = "encode"
    config_cls: ClassVar[type[PassConfig]]
    summary: ClassVar[str]
    needs_calibration: ClassVar[bool] = False

    @classmethod
    def calibrates(cls, config: PassConfig) -> bool:
        """Does the pass, so configured, need real inputs (--data)? By default ``needs_calibration``."""
        return cls.needs_calibration

    def __init__(self, config: PassConfig, context: PassContext | None = None):
        self.config = config
        self.context = context or PassContext()

    @abstractmethod
    def encode(self, onnx_bytes: bytes) -> tuple[bytes, dict[str, Any]]:
        """Return the shipped artifact and statistics."""


@dataclass
class PassRecord:
    stage: Stage
    name: str
    seconds: float
    modified: bool
    stats: dict[str, Any]


def run_passes(
    model: ir.Model,
    passes: Sequence[Pass],
    on_start: Callable[[Pass], None] = lambda p: None,
) -> tuple[ir.Model, list[PassRecord]]:
    """Run graph passes in stage order; a failing pass is named with those that ran before it."""
    ordered = sorted(passes, key=lambda p: STAGES.index(p.stage))  # stable within a stage
    records: list[PassRecord] = []
    for graph_pass in ordered:
        if isinstance(graph_pass, EncodePass):
            raise TypeError("encode passes run on bytes; use run_encode")
        ran = [r.name for r in records]
        on_start(graph_pass)
        started = time.perf_counter()
        try:
            result = graph_pass.call(model)
        except InputError:
            raise
        except Exception as exc:
            raise PassFailure(graph_pass.name, ran, f"{type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - started
        model = result.model
        try:
            check_model(model)
        except ValueError as exc:
            raise PassFailure(graph_pass.name, ran, str(exc)) from exc
        records.append(PassRecord(graph_pass.stage, graph_pass.name, seconds, result.modified, result.stats))
    return model, records


def run_encode(
    onnx_bytes: bytes, encoder: EncodePass, ran_before: list[str]
) -> tuple[bytes, PassRecord]:
    started = time.perf_counter()
    try:
        packed, stats = encoder.encode(onnx_bytes)
    except Exception as exc:
        raise PassFailure(encoder.name, ran_before, f"{type(exc).__name__}: {exc}") from exc
    record = PassRecord("encode", encoder.name, time.perf_counter() - started, True, stats)
    return packed, record
