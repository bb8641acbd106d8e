"""What a model holds: parameters and bytes by op type and by tensor, what passes could compress,
and the exporter quirks found. Backs ``modelpress inspect``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from modelpress.compressors.model import iter_graphs, iter_weights, load_model, normalize, opset_version, weight_inputs

COMPRESSIBLE_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Gather"}


def summarize_model(path: Path) -> dict[str, Any]:
    model = load_model(path)
    quirks = normalize(model)
    by_op: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "parameters": 0, "bytes": 0})
    tensors = []
    for graph, value in iter_weights(model):
        tensor = value.const_value
        consumers = sorted({use.node.op_type for use in value.uses()}) or ["(unused)"]
        op = "+".join(consumers)
        by_op[op]["tensors"] += 1
        by_op[op]["parameters"] += tensor.size
        by_op[op]["bytes"] += tensor.nbytes
        tensors.append(
            {
                "name": value.name,
                "dtype": tensor.dtype.name,
                "shape": list(tensor.shape.numpy()),
                "bytes": tensor.nbytes,
                "consumers": consumers,
                "subgraph": graph is not model.graph,
            }
        )
    verdicts = {value.name: reason for value, reason in weight_inputs(model, COMPRESSIBLE_OPS)}
    for entry in tensors:
        if entry["name"] in verdicts:
            reason = verdicts[entry["name"]]
            entry["compressible"] = reason is None
            if reason:
                entry["left_alone_because"] = reason
        else:
            entry["compressible"] = False
            entry["left_alone_because"] = "not a float weight matrix"
    tensors.sort(key=lambda e: (-e["bytes"], e["name"]))
    total_bytes = sum(e["bytes"] for e in tensors)
    compressible = sum(e["bytes"] for e in tensors if e["compressible"])
    ops = defaultdict(int)
    for graph in iter_graphs(model):
        for node in graph:
            ops[node.op_type] += 1
    return {
        "model": str(path),
        "file_bytes": path.stat().st_size,
        "opset": opset_version(model),
        "producer": f"{model.producer_name or '?'} {model.producer_version or ''}".strip(),
        "subgraphs": sum(1 for _ in iter_graphs(model)) - 1,
        "nodes_by_op": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "parameters": sum(v["parameters"] for v in by_op.values()),
        "weight_bytes": total_bytes,
        "compressible_bytes": compressible,
        "by_consumer_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1]["bytes"])),
        "tensors": tensors,
        "quirks": quirks,
    }


def tensor_table(passes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The report's per-tensor table, from the pass statistics: for each weight tensor its original,
    runnable and shipped bytes, sparsity and bits per weight.

    Sources: prune passes' ``per_tensor`` (sparsity), quantize passes' ``per_tensor`` (kmeans, int8:
    original and runnable bytes, codebook bits, and the initializers a weight became), and the encode pass's ``per_tensor``
    (coded bytes of each initializer it coded on its own). Tensors small enough to stay in the
    compressed graph skeleton are charged the skeleton's compression ratio (``in_skeleton``).
    """
    rows: dict[str, dict[str, Any]] = {}
    coded: dict[str, dict[str, Any]] = {}
    skeleton_ratio = None
    for record in passes:
        stats, stage = record.get("stats") or {}, record.get("stage")
        per_tensor = stats.get("per_tensor")
        if not isinstance(per_tensor, dict):
            continue
        if stage == "encode":
            coded.update(per_tensor)
            raw = stats.get("skeleton_raw_bytes", 0) + stats.get("table_raw_bytes", 0)
            skeleton_ratio = stats["skeleton_bytes"] / raw if raw else None
        elif stage == "prune":
            for name, value in per_tensor.items():
                sparsity = value.get("sparsity") if isinstance(value, dict) else value
                if isinstance(sparsity, (int, float)):
                    rows.setdefault(name, {"tensor": name})["sparsity"] = sparsity
        elif stage == "quantize":  # kmeans, int8: what each weight became
            for name, info in per_tensor.items():
                if not isinstance(info, dict) or "bytes_before" not in info:
                    continue  # int4 / fp16 report other figures per tensor
                parent = next((r for r in rows.values() if name in r.get("stored_as", ()) and r["tensor"] != name), None)
                if parent is not None:  # a later pass re-stored what an earlier one made (int8 -> sparse_storage)
                    _restore(parent, name, info)
                    continue
                row = rows.setdefault(name, {"tensor": name})
                row.update(original_bytes=info["bytes_before"], runnable_bytes=info["bytes_after"],
                           elements=info.get("elements"), codebook_bits=info.get("bits"),
                           stored_as=info.get("stored_as", []))
                if info.get("elements") and "zeros_kept" in info:
                    row.setdefault("sparsity", round(info["zeros_kept"] / info["elements"], 4))
    if not coded and skeleton_ratio is None:
        return [_finish(row) for row in rows.values()]
    for name, info in coded.items():  # coded tensors no pass changed: the payload is the weight
        if name not in rows and not any(name in r.get("stored_as", ()) for r in rows.values()):
            rows[name] = {"tensor": name, "original_bytes": None, "runnable_bytes": info["bytes"],
                          "elements": info.get("elements"), "stored_as": [name]}
    for row in rows.values():
        parts = row.get("stored_as") or [row["tensor"]]
        shipped, estimated = 0.0, False
        for part in parts:
            if part in coded:
                shipped += coded[part]["coded_bytes"]
            elif skeleton_ratio is not None and row.get("runnable_bytes") is not None:
                estimated = True
        if estimated:
            known = sum(coded[p]["bytes"] for p in parts if p in coded)
            shipped += max(0, row["runnable_bytes"] - known) * skeleton_ratio
        row["shipped_bytes"] = round(shipped)
        row["in_skeleton"] = estimated
    return [_finish(row) for row in rows.values()]


def _restore(row: dict[str, Any], part: str, info: dict[str, Any]) -> None:
    """``part``, one of the initializers ``row``'s weight was stored as, was stored again by a later pass."""
    if row.get("runnable_bytes") is not None:
        row["runnable_bytes"] += info["bytes_after"] - info["bytes_before"]
    row["stored_as"] = [p for old in row["stored_as"] for p in ((info.get("stored_as") or [old]) if old == part else [old])]
    if info.get("elements") and "zeros_kept" in info and row.get("sparsity") is None:
        row["sparsity"] = round(info["zeros_kept"] / info["elements"], 4)


def _finish(row: dict[str, Any]) -> dict[str, Any]:
    elements = row.pop("elements", None)
    row.pop("stored_as", None)
    shipped = row.get("shipped_bytes")
    row["bits_per_weight"] = round(8 * shipped / elements, 3) if shipped is not None and elements else None
    return {key: row.get(key) for key in ("tensor", "original_bytes", "runnable_bytes", "shipped_bytes",
                                          "sparsity", "codebook_bits", "bits_per_weight", "in_skeleton")}
