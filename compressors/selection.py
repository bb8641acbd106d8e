"""Which weights a pass touches: the shared include/exclude/min_elements filter.

Every pass that edits weight matrices selects them the same way, and reports every tensor it
leaves alone with the reason, so the user can see why a weight did not shrink.
"""

from __future__ import annotations

import fnmatch

import onnx_ir as ir
from pydantic import Field

from modelpress.compressors.model import weight_inputs
from modelpress.compressors.pipeline import PassConfig


class WeightFilterConfig(PassConfig):
    """Config fields shared by every pass that selects weights by name and size."""

    include: tuple[str, ...] = Field(("*",), description="globs on initializer names")
    exclude: tuple[str, ...] = Field((), description="globs on initializer names, applied after include")
    min_elements: int = Field(1024, ge=1, description="smaller tensors are left as they are")


def select_weights(
    model: ir.Model, op_types: set[str], config: WeightFilterConfig
) -> tuple[list[ir.Value], list[dict[str, str]]]:
    """(weights to change, [{tensor, reason}] for every float weight matrix left alone)."""
    chosen: list[ir.Value] = []
    skipped: list[dict[str, str]] = []
    for value, reason in weight_inputs(model, op_types):
        name = value.name or "?"
        if reason is None and value.is_graph_input():
            reason = "is also a graph input, so callers may override it at run time"
        if reason is None and not matches(name, config.include, config.exclude):
            reason = "excluded by include/exclude globs"
        if reason is None and value.const_value.size < config.min_elements:
            reason = f"fewer than min_elements={config.min_elements} elements"
        if reason is None:
            chosen.append(value)
        else:
            skipped.append({"tensor": name, "reason": reason})
    return chosen, skipped


def matches(name: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in include) and not any(fnmatch.fnmatchcase(name, g) for g in exclude)
