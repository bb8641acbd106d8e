"""The report: what was measured on the original and the compressed model, pass by pass,
and which gates held. ``to_json`` produces the ``modelpress.report/1`` contract of DESIGN.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from modelpress.compressors.recipe import Gates

SCHEMA = "modelpress.report/1"


@dataclass
class Side:
    size_bytes: int
    latency_ms: dict[str, float] | None
    metrics: dict[str, float]
    shipped_size_bytes: int | None = None
    throughput: float | None = None
    peak_memory_mb: float | None = None


@dataclass
class GateResult:
    name: str
    limit: float
    value: float | None
    passed: bool
    note: str = ""


@dataclass
class Report:
    model: str
    recipe: str
    artifacts: dict[str, str | None]
    original: Side
    compressed: Side
    passes: list[dict[str, Any]]
    gates: list[GateResult]
    environment: dict[str, Any]
    data: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    search: dict[str, Any] | None = None  # the accuracy-budget search, when the recipe has one
    alternatives: dict[str, Any] | None = None  # the recipe's alternatives ladder: each rung tried, the one kept

    @property
    def gates_passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def tensor_table(self) -> list[dict[str, Any]]:
        """Per weight tensor: original, runnable and shipped bytes, sparsity, bits per weight."""
        from modelpress.compressors.summary import tensor_table

        return tensor_table(self.passes)

    def to_json(self) -> dict[str, Any]:
        def side(s: Side, compressed: bool) -> dict[str, Any]:
            out = asdict(s)
            if not compressed:
                out.pop("shipped_size_bytes")
            return out

        return _finite({
            "schema": SCHEMA,
            "model": self.model,
            "recipe": self.recipe,
            "artifacts": self.artifacts,
            "original": side(self.original, False),
            "compressed": side(self.compressed, True),
            "passes": self.passes,
            "gates": [asdict(g) for g in self.gates],
            "environment": self.environment,
            "data": self.data,
            "notes": self.notes,
            "tensors": self.tensor_table(),
            **({"search": self.search} if self.search is not None else {}),
            **({"alternatives": self.alternatives} if self.alternatives is not None else {}),
        })


def _finite(value: Any) -> Any:
    """NaN/inf (e.g. a model that outputs NaN) become null so the JSON stays strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def evaluate_gates(gates: Gates, original: Side, compressed: Side) -> list[GateResult]:
    """Compare each gate set in the recipe with the measured numbers."""
    results: list[GateResult] = []
    shipped = compressed.shipped_size_bytes or compressed.size_bytes
    if gates.max_accuracy_drop is not None:
        if "accuracy" in original.metrics and "accuracy" in compressed.metrics:
            drop = original.metrics["accuracy"] - compressed.metrics["accuracy"]
            note = ""
        elif "agreement" in compressed.metrics:
            # Without labels the honest proxy is how often the prediction changed.
            drop = 1.0 - compressed.metrics["agreement"]
            note = "no labels: measured as 1 - agreement with the original"
        else:
            drop = None
        if drop is not None:
            results.append(GateResult("max_accuracy_drop", gates.max_accuracy_drop, round(drop, 6), drop <= gates.max_accuracy_drop, note))
        elif gates.min_cosine is None:
            # Feature outputs (e.g. token embeddings) and no labels: there is no decision whose change
            # could be counted, so the gate is judged on the outputs' per-sample cosine instead.
            cosine = compressed.metrics.get("cosine")
            limit = round(1.0 - gates.max_accuracy_drop, 6)
            note = ("no labels and the output holds features, not class scores: max_accuracy_drop judged as "
                    "cosine >= 1 - max_accuracy_drop (set --min-cosine to choose)")
            results.append(GateResult("min_cosine", limit, cosine, cosine is not None and cosine >= limit, note))
    for name, metric in (("min_cosine", "cosine"), ("min_agreement", "agreement")):
        limit = getattr(gates, name)
        if limit is not None:
            value = compressed.metrics.get(metric)
            results.append(GateResult(name, limit, value, value is not None and value >= limit))
    if gates.min_size_ratio is not None:
        ratio = original.size_bytes / shipped if shipped else 0.0
        note = "shipped artifact" if compressed.shipped_size_bytes else "runnable ONNX"
        results.append(GateResult("min_size_ratio", gates.min_size_ratio, round(ratio, 4), ratio >= gates.min_size_ratio, note))
    if gates.max_latency_ratio is not None:
        if original.latency_ms and compressed.latency_ms:
            ratio = compressed.latency_ms["p50"] / original.latency_ms["p50"]
            results.append(GateResult("max_latency_ratio", gates.max_latency_ratio, round(ratio, 4), ratio <= gates.max_latency_ratio))
        else:
            results.append(GateResult("max_latency_ratio", gates.max_latency_ratio, None, False, "latency not measured"))
    return results


def dumps(document: dict[str, Any]) -> str:
    """Strict JSON: numpy scalars/arrays from pass stats become plain numbers/lists."""
    import json

    def plain(obj: Any) -> Any:
        if hasattr(obj, "tolist"):
            return _finite(obj.tolist())
        if hasattr(obj, "item"):
            return _finite(obj.item())
        return str(obj)

    return json.dumps(_finite(document), indent=2, default=plain, allow_nan=False) + "\n"
