"""Fold run-time reshapes of weights into the weights themselves (part of ``model.normalize``).

before: an initializer that reaches its consumer through Reshape / Unsqueeze / Squeeze / Flatten /
Transpose nodes whose other inputs are constant — paddle2onnx writes every Conv bias as
``Add(conv, Reshape(offset, [1, C, 1, 1]))``, TensorFlow exporters often ``MatMul(x, Transpose(W))``.
after:  the consumer reads an initializer that already has the final shape; the layout node is gone.

Why: passes see a weight where it is used. Structured pruning could not slice a bias it only saw
through a Reshape (PP-OCR's classifier: every squeeze-excite block skipped), and a quantizer would
see the Reshape, not the MatMul. The values are the same numbers in the same order (or transposed),
so the outputs stay bit-exact. A weight read by several nodes is left alone: folding it would store
it twice.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

LAYOUT_OPS = frozenset({"Reshape", "Unsqueeze", "Squeeze", "Flatten", "Transpose"})


def fold_weight_layouts(graph: ir.Graph) -> int:
    """Fold every foldable layout node of ``graph`` (not its subgraphs) in place; the count folded."""
    folded = 0
    outputs = {id(v) for v in graph.outputs}
    for node in list(graph):
        if node.op_type not in LAYOUT_OPS or node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
            continue
        data, out = (node.inputs[0] if node.inputs else None), node.outputs[0]
        if data is None or not _is_weight(graph, data) or len(data.uses()) != 1 or id(out) in outputs:
            continue
        extras = [v for v in node.inputs[1:] if v is not None]
        if not all(_is_weight(graph, v) for v in extras):
            continue
        result = _apply(node, data.const_value.numpy(), [v.const_value.numpy() for v in extras])
        if result is None:
            continue
        name = out.name
        out.name = f"{name}__unfolded"
        folded_value = ir.Value(name=name, shape=ir.Shape(result.shape), type=ir.TensorType(data.const_value.dtype),
                                const_value=ir.Tensor(np.ascontiguousarray(result), name=name))
        ir.convenience.replace_all_uses_with(out, folded_value)
        graph.remove(node, safe=True)
        graph.register_initializer(folded_value)
        for value in (data, *extras):
            if not value.uses() and value.name in graph.initializers and value not in graph.inputs:
                del graph.initializers[value.name]
        folded += 1
    return folded


def _is_weight(graph: ir.Graph, value: ir.Value) -> bool:
    return (value.name in graph.initializers and graph.initializers[value.name] is value
            and value.const_value is not None and value not in graph.inputs)


def _apply(node: ir.Node, data: np.ndarray, extras: list[np.ndarray]) -> np.ndarray | None:
    """The node's output for constant inputs, or None where its attributes are not understood."""
    attrs = node.attributes
    op = node.op_type
    if op == "Reshape":
        if len(extras) != 1:
            return None
        shape = [int(d) for d in extras[0].reshape(-1)]
        if not attrs.get_int("allowzero", 0):  # 0 copies the input's dim at that position
            shape = [data.shape[i] if d == 0 and i < data.ndim else d for i, d in enumerate(shape)]
        try:
            return data.reshape(shape)
        except ValueError:
            return None
    if op in ("Unsqueeze", "Squeeze"):
        axes = extras[0].reshape(-1).tolist() if extras else attrs.get_ints("axes", None)
        if op == "Unsqueeze":
            if axes is None:
                return None
            rank = data.ndim + len(axes)
            result = data
            for axis in sorted(a % rank for a in axes):
                result = np.expand_dims(result, axis)
            return result
        if axes is None:
            return np.squeeze(data)
        axes = tuple(a % data.ndim for a in axes)
        return np.squeeze(data, axis=axes) if all(data.shape[a] == 1 for a in axes) else None
    if op == "Flatten":
        axis = attrs.get_int("axis", 1) % (data.ndim + 1) if data.ndim else 0
        return data.reshape(int(np.prod(data.shape[:axis])), -1)
    if op == "Transpose":
        perm = attrs.get_ints("perm", None)
        return np.transpose(data, perm if perm is None else list(perm))
    return None
