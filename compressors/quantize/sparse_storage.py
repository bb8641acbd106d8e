"""Sparse weight storage: a weight with many exact zeros kept as a bitmap plus its nonzero values.

before: a model whose weights hold exact zeros (unstructured pruning: ``magnitude``, ``sparsegpt``,
``wanda``, possibly followed by ``int8``), in the main graph or in If/Loop/Scan bodies.
after:  each such initializer ``W`` stored as ``W_bits`` (uint8, one bit per element, set where
W != 0) and ``W_nonzero`` (the nonzero values in order, same dtype), rebuilt under the name ``W`` by
a chain of ops at the top of the graph that owns it:
``bit = Mod(BitShift(bits, [7..0]), 2)`` → ``index = CumSum(bit) - 1`` →
``W = Reshape(Where(bit, Gather(nonzero, index), 0), shape)``.
Every input of that chain is a constant, so stock onnxruntime folds it into the dense tensor when
the session loads (its optimized graph keeps only the original ops): inference runs the very same
kernels at the same speed, on bit-identical weights, while the file holds ``nnz`` values plus one
bit per element — at 50 % sparsity a float32 matrix takes 53 % of its bytes, an int8 one 63 %.

Why not ONNX sparse initializers: onnx-ir does not carry them, their COO indices are int64 (12
bytes per float32 nonzero: smaller only above 67 % sparsity), and ORT densifies them too. Why not
NonZero + ScatterND: ORT does not constant-fold NonZero, so the weights would be rebuilt on every
run. A tensor is packed only when that saves at least ``min_saving`` of its bytes; tensors of
sub-byte types (int4 / uint4 indices) and quantization parameters are left alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from modelpress.compressors.model import ensure_opset, iter_weights, opset_version
from modelpress.compressors.pipeline import Pass, PassResult
from modelpress.compressors.quantize.graph_edits import Names, initializer, initializer_bytes
from modelpress.compressors.selection import WeightFilterConfig, matches
from pydantic import Field

CHAIN_OPSET = 11  # BitShift, CumSum, Slice with inputs
PACKABLE = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8,
            ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32, ir.DataType.INT64}


class SparseStorageConfig(WeightFilterConfig):
    min_elements: int = Field(1024, ge=1, description="smaller tensors are left as they are (the chain costs "
                                                      "a few hundred bytes of nodes)")
    min_saving: float = Field(0.1, gt=0.0, lt=1.0, description="pack a tensor only when this share of its bytes is saved")


class SparseStorage(Pass):
    name = "sparse_storage"
    stage = "quantize"
    config_cls = SparseStorageConfig
    summary = "weights with many zeros stored as a bitmap + nonzero values, rebuilt by ops ORT folds at load"

    def call(self, model: ir.Model) -> PassResult:
        config: SparseStorageConfig = self.config
        notes: list[str] = []
        bytes_before = initializer_bytes(model)
        chosen = self._choose(model, config)
        if chosen and opset_version(model) < CHAIN_OPSET:
            notes.append(f"opset upgraded {opset_version(model)} -> {CHAIN_OPSET} for BitShift / CumSum")
            model = ensure_opset(model, CHAIN_OPSET)  # a new model object: select on it again
            chosen = self._choose(model, config)
        names = Names(model)
        constants: dict[int, dict[str, ir.Value]] = {}  # per graph: the chain's shared constants
        per_tensor: dict[str, dict[str, Any]] = {}
        for graph, value, nonzeros in chosen:
            weights = value.const_value.numpy()
            shared = constants.setdefault(id(graph), {})
            bits, nonzero = _pack(graph, value, weights, names, shared)
            per_tensor[value.name] = {
                "bytes_before": int(weights.nbytes), "bytes_after": int(bits.const_value.nbytes + nonzero.const_value.nbytes),
                "elements": int(weights.size), "sparsity": round(1 - nonzeros / weights.size, 4),
                "zeros_kept": int(weights.size - nonzeros), "stored_as": [bits.name, nonzero.name],
            }
        bytes_after = initializer_bytes(model)
        stats: dict[str, Any] = {
            "tensors_packed": len(per_tensor), "bytes_before": bytes_before, "bytes_after": bytes_after,
            "size_ratio": round(bytes_before / bytes_after, 3) if bytes_after else None,
            "per_tensor": per_tensor, "notes": notes,
        }
        return PassResult(model, modified=bool(per_tensor), stats=stats)

    @classmethod
    def _choose(cls, model: ir.Model, config: SparseStorageConfig) -> list[tuple[ir.Graph, ir.Value, int]]:
        """(graph, weight, its nonzero count) of every weight worth packing, in ``iter_weights`` order."""
        chosen = []
        for graph, value in iter_weights(model):
            nonzeros = cls._nonzeros_if_packable(value, config)
            if nonzeros is not None:
                chosen.append((graph, value, nonzeros))
        return chosen

    @staticmethod
    def _nonzeros_if_packable(value: ir.Value, config: SparseStorageConfig) -> int | None:
        """The weight's nonzero count (counted once, reused by the stats) when it may be packed and
        packing saves ``min_saving`` of its bytes; else None."""
        tensor = value.const_value
        if tensor.dtype not in PACKABLE or tensor.size < config.min_elements or not value.uses():
            return None
        if value.is_graph_input() or value.is_graph_output() or not matches(value.name or "", config.include, config.exclude):
            return None
        if any(u.node.domain not in ("", "ai.onnx") or u.node.op_type in ("QuantizeLinear", "DequantizeLinear")
               and u.idx > 0 for u in value.uses()):
            return None  # quantization parameters and contrib-kernel inputs stay plain initializers
        weights = tensor.numpy()
        nonzeros = int(np.count_nonzero(weights))
        packed = nonzeros * weights.itemsize + -(-weights.size // 8)
        return nonzeros if packed <= (1.0 - config.min_saving) * weights.nbytes else None


def _pack(graph: ir.Graph, value: ir.Value, weights: np.ndarray, names: Names,
          shared: dict[str, ir.Value]) -> tuple[ir.Value, ir.Value]:
    """Replace the initializer ``value`` by the rebuilding chain; returns (bits, nonzero) initializers."""
    name = value.name
    flat = weights.reshape(-1)
    present = flat != 0
    values = flat[present] if present.any() else flat[:1]  # Gather needs data: one zero, never selected
    bits = initializer(graph, names(f"{name}_bits"), np.packbits(present))
    nonzero = initializer(graph, names(f"{name}_nonzero"), values)

    def constant(key: str, array: np.ndarray) -> ir.Value:
        if key not in shared:
            shared[key] = initializer(graph, names(f"sparse_storage_{key}"), array)
        return shared[key]

    size = np.array([flat.size], np.int64)
    nodes = [
        column := ir.node("Reshape", [bits, constant("column", np.array([-1, 1], np.int64))]),
        shifted := ir.node("BitShift", [column.outputs[0], constant("shifts", np.arange(7, -1, -1, dtype=np.uint8))],
                           {"direction": "RIGHT"}),
        bit := ir.node("Mod", [shifted.outputs[0], constant("two", np.array([2], np.uint8))]),
        row := ir.node("Reshape", [bit.outputs[0], constant("flat", np.array([-1], np.int64))]),
        cut := ir.node("Slice", [row.outputs[0], constant("start", np.array([0], np.int64)),
                                 initializer(graph, names(f"{name}_size"), size)]),
        count := ir.node("Cast", [cut.outputs[0]], {"to": ir.DataType.INT64}),
        running := ir.node("CumSum", [count.outputs[0], constant("axis", np.array(0, np.int64))]),
        index := ir.node("Sub", [running.outputs[0], constant("one", np.array([1], np.int64))]),
        gathered := ir.node("Gather", [nonzero, index.outputs[0]]),
        where := ir.node("Cast", [cut.outputs[0]], {"to": ir.DataType.BOOL}),
        dense := ir.node("Where", [where.outputs[0], gathered.outputs[0],
                                   constant(f"zero_{weights.dtype.name}", np.zeros((), weights.dtype))]),
        shaped := ir.node("Reshape", [dense.outputs[0], initializer(graph, names(f"{name}_shape"),
                                                                      np.array(weights.shape, np.int64))]),
    ]
    for node in nodes[:-1]:
        node.outputs[0].name = names(f"{name}_{node.op_type.lower()}")
    out = shaped.outputs[0]
    out.name = names(f"{name}_dense")
    first = next(iter(graph), None)
    for node in nodes:
        graph.insert_before(first, node) if first is not None else graph.append(node)
    value.replace_all_uses_with(out)
    graph.initializers.pop(name)
    out.name = name  # consumers read W as before
    return bits, nonzero
