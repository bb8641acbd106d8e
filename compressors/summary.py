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
