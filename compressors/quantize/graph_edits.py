"""Graph edits shared by the quantization passes: fresh names, initializers, attribute reads,
output replacement, and BatchNormalization folding (onnx-ir models, edited in place)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from modelpress.compressors.model import iter_graphs


def fold_batchnorm(graph: ir.Graph, names: Names) -> int:
    """Fold inference BatchNormalization into the Conv feeding it: W' = W*f, b' = (b-mean)*f + beta
    with f = gamma / sqrt(var + eps). Exact up to float rounding; ORT does the same at load time, so
    this only removes bytes and lets QDQ groups form around the Conv."""
    folded = 0
    for bn in list(graph):
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx"):
            continue
        conv = bn.inputs[0].producer() if bn.inputs[0] is not None else None
        if conv is None or conv.op_type != "Conv" or conv.graph is not graph:
            continue
        if len(bn.outputs) > 1 and any(o.uses() for o in bn.outputs[1:]):
            continue
        training = bn.attributes.get("training_mode")
        if training is not None and training.value:
            continue
        conv_out = conv.outputs[0]
        if len(conv_out.uses()) != 1 or conv_out.is_graph_output():
            continue
        params = [const(v) for v in bn.inputs[1:5]]
        weight = conv.inputs[1]
        bias = conv.inputs[2] if len(conv.inputs) > 2 else None
        w = const(weight)
        if any(p is None for p in params) or w is None or w.dtype != np.float32:
            continue
        if len(weight.uses()) != 1 or (bias is not None and (const(bias) is None or len(bias.uses()) != 1)):
            continue
        gamma, beta, mean, var = (p.astype(np.float32) for p in params)
        eps = bn.attributes["epsilon"].value if "epsilon" in bn.attributes else 1e-5
        factor = gamma / np.sqrt(var + np.float32(eps))
        b = const(bias).astype(np.float32) if bias is not None else np.zeros(w.shape[0], np.float32)
        new_w = (w * factor.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
        new_b = ((b - mean) * factor + beta).astype(np.float32)
        weight.const_value = ir.Tensor(new_w, name=weight.name)
        if bias is None:
            bias = initializer(graph, names(f"{weight.name}_bias"), new_b)
            conv.resize_inputs(3)
            conv.replace_input_with(2, bias)
        else:
            bias.const_value = ir.Tensor(new_b, name=bias.name)
        bn_out = bn.outputs[0]
        out_name = bn_out.name
        bn_out.replace_all_uses_with(conv_out, replace_graph_outputs=True)
        params_values = list(bn.inputs[1:5])
        graph.remove(bn, safe=True)
        conv_out.name = out_name  # keeps graph output names stable
        for value in params_values:
            if value is not None and value.is_initializer() and not value.uses() and value.name in graph.initializers:
                graph.initializers.pop(value.name)
        folded += 1
    return folded


def const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or not value.is_initializer():
        return None
    return value.const_value.numpy()


def int_attr(node: ir.Node, name: str, default: int = 0) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def float_attr(node: ir.Node, name: str, default: float = 1.0) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.value)


class Names:
    """Fresh, deterministic value names, unique across all graphs of a model (a subgraph may not
    shadow an outer name). Nodes the pass adds stay unnamed: their outputs' names say what they
    are, and on small models every name is bytes."""

    def __init__(self, model: ir.Model):
        self.taken: set[str] = set()
        for graph in iter_graphs(model):
            self.taken.update(graph.initializers)
            self.taken.update(v.name for v in graph.inputs if v.name)
            for node in graph:
                self.taken.update(v.name for v in node.outputs if v.name)
                if node.name:
                    self.taken.add(node.name)

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    # No type/shape on the Value: the tensor carries both, and onnx-ir would otherwise write a
    # redundant value_info entry per initializer (bytes that matter on small models).
    value = ir.Value(name=name, const_value=ir.Tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value


def replace_output(node: ir.Node, new: ir.Value) -> None:
    old = node.outputs[0]
    name = old.name
    new.type, new.shape = old.type, old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    node.graph.remove(node, safe=True)
    new.name = name


def initializer_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for g in iter_graphs(model) for v in g.initializers.values() if v.const_value is not None)
