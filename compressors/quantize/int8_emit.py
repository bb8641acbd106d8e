"""The int8 pass's graph rewrites: each weight stored once as int8, each use rewired as
weight-only (Cast*scale, folded by ORT at load), dynamic (MatMulInteger) or static (QDQ)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from modelpress.compressors.model import iter_graphs
from modelpress.compressors.quantize.graph_edits import Names, const, float_attr, initializer, int_attr, replace_output
from modelpress.compressors.quantize import bias_correction, smoothing
from modelpress.compressors.quantize.int8_place import Target, Use, static_output
from modelpress.kernels import quant

if TYPE_CHECKING:
    from modelpress.compressors.quantize.int8 import Int8Config

@dataclass
class _Stored:
    """A weight's int8 form inside the model."""

    graph: ir.Graph
    name: str
    dtype: ir.DataType
    q: ir.Value
    params: quant.QParams
    transposed: bool
    ndim: int
    scale_1d: ir.Value | None = None
    zero_point: ir.Value | None = None
    dequantized: ir.Value | None = None  # Cast+Mul output (weight-only uses)
    dq: ir.Value | None = None  # DequantizeLinear output (static uses)
    kn: ir.Value | None = None  # int8 [K, N] for dynamic uses
    parts: list[ir.Value] = field(default_factory=list)  # every initializer this weight became

    def own(self, value: ir.Value) -> ir.Value:
        self.parts.append(value)
        return value


def apply_plan(model: ir.Model, targets: list[Target], ranges: dict[str, tuple[float, float]], config: Int8Config,
               channel_max: dict[str, np.ndarray] | None = None, reduce_range: bool = False,
               channel_mean: dict[tuple[str, int], np.ndarray] | None = None) -> dict[str, list[dict]]:
    """Store each target as int8 and rewire its uses by their methods (in place). With
    ``channel_max`` (per-channel max |x| of normalization outputs) and ``config.smoothing``, the
    scales of those activations are first migrated into the weights of their dynamic MatMul/Gemm
    (see ``smoothing``). ``reduce_range``: weights of int8 kernels in 7 bits. With
    ``channel_mean`` ((activation, channel axis) -> per-channel mean on the calibration data) the
    biases of main-graph layers absorb the mean output shift their rounded weights cause (see
    ``bias_correction``). Returns the records of migrated activations (``smoothed``) and of
    corrected biases (``bias_corrected``)."""
    graphs = list(iter_graphs(model))
    nodes = [list(g) for g in graphs]
    names = Names(model)
    read_before = {id(n): n.inputs[0].name for n in nodes[0] if n.inputs and n.inputs[0] is not None}
    smoothed, divisors = _migrate(graphs[0], nodes[0], targets, channel_max or {}, config, names)
    corrected: list[dict] = []
    all_stored: list[tuple[_Stored, int, int]] = []  # (weight, its bytes before, its elements)
    head: dict[int, list[ir.Node]] = defaultdict(list)  # nodes to prepend to each graph (weights only)
    dynamic: list[tuple[ir.Node, Use, _Stored]] = []
    static: list[tuple[ir.Node, Use, _Stored]] = []
    for target in targets:
        graph = graphs[target.graph]
        value = graph.initializers[target.name]
        weights = value.const_value.numpy()
        use_nodes = [(nodes[u.node[0]][u.node[1]], u) for u in target.uses]
        transposed = all(u.method == "dynamic" and int_attr(n, "transB") for n, u in use_nodes)
        stored_w = weights.T if transposed else weights
        axis = None if target.axis is None else (1 - target.axis if transposed else target.axis)
        kernel = any(u.method in ("dynamic", "static") for u in target.uses)
        bits = 7 if kernel and reduce_range else 8
        q, params = quant.quantize_weights(np.asarray(stored_w, np.float32), axis, config.symmetric, bits)
        if channel_mean and target.graph == 0:
            rounded = quant.dequantize(q, params)
            delta = (rounded.T if transposed else rounded) - weights
            for node, use in use_nodes:
                record = _correct_bias(node, use, delta, read_before, channel_mean, divisors)
                if record is not None:
                    corrected.append(record)
        stored = _Stored(graph, target.name, value.dtype, initializer(graph, names(f"{target.name}_int8"), q),
                         params, transposed, weights.ndim)
        stored.own(stored.q)
        all_stored.append((stored, int(weights.nbytes), int(weights.size)))
        for node, use in use_nodes:
            if use.method == "weight_only":
                node.replace_input_with(use.input_index, _dequantized(stored, head[target.graph], names))
            elif use.method == "static":
                node.replace_input_with(use.input_index, _weight_dq(stored, head[target.graph], names))
                static.append((node, use, stored))
            else:
                dynamic.append((node, use, stored))
        graph.initializers.pop(target.name)
        if stored.dequantized is not None:
            stored.dequantized.name = target.name  # the graph reads as before: W = Cast(Wq) * scale
    for gi, new_nodes in head.items():
        graph = graphs[gi]
        first = next(iter(graph), None)
        if first is None:
            graph.extend(new_nodes)
        else:
            graph.insert_before(first, new_nodes)
    order = {id(n): (gi, ni) for gi, g in enumerate(nodes) for ni, n in enumerate(g)}
    activation_dq: dict[int, ir.Value] = {}
    for node, use, stored in sorted(static, key=lambda item: order[id(item[0])]):
        _rewrite_static(node, stored, ranges, activation_dq, names)
    dql_cache: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}
    for node, use, stored in sorted(dynamic, key=lambda item: order[id(item[0])]):
        _rewrite_dynamic(node, stored, dql_cache, names)
    per_tensor = {stored.name: {"bytes_before": before, "elements": elements,
                                "bytes_after": sum(v.const_value.nbytes for v in stored.parts),
                                "stored_as": [v.name for v in stored.parts]}
                  for stored, before, elements in all_stored}
    return {"smoothed": smoothed, "bias_corrected": corrected, "per_tensor": per_tensor}


def _correct_bias(node: ir.Node, use: Use, delta: np.ndarray, read_before: dict[int, str],
                  channel_mean: dict[tuple[str, int], np.ndarray], divisors: dict[int, np.ndarray]) -> dict | None:
    """Move ``node``'s bias by the mean output shift of its weight change ``delta``. A node whose
    input was migrated by smoothing now reads it divided by the smoothing scale, and so its mean."""
    bias = bias_correction.bias_of(node, use.input_index)
    activation = read_before.get(id(node))
    mean = channel_mean.get((activation, bias_correction.channel_axis(node.op_type)))
    if bias is None or mean is None:
        return None
    if id(node) in divisors:
        mean = mean / divisors[id(node)]
    shift = bias_correction.correction(node, delta, mean)
    if shift is None:
        return None
    largest = bias_correction.apply(node, bias, shift)
    if largest is None:
        return None
    return {"node": use.node_name, "bias": bias.name, "max_shift": round(largest, 6)}


def _migrate(graph: ir.Graph, nodes: list[ir.Node], targets: list[Target], channel_max: dict[str, np.ndarray],
             config: Int8Config, names: Names) -> tuple[list[dict], dict[int, np.ndarray]]:
    """SmoothQuant migration for main-graph activations whose every quantized reader is dynamic.
    Returns the records, and for each migrated reader (by node id) the divisor its input now carries."""
    if config.smoothing is None or not channel_max:
        return [], {}
    readers: dict[str, list[tuple[ir.Node, ir.Value]]] = defaultdict(list)
    blocked: set[str] = set()
    for target in targets:
        if target.graph != 0:
            continue
        for use in target.uses:
            node = nodes[use.node[1]]
            activation = node.inputs[0]
            if activation is None or activation.name not in channel_max:
                continue
            if use.method != "dynamic":
                continue  # weight-only and static readers keep reading the activation as it is
            if len(target.uses) != 1:
                blocked.add(activation.name)  # a weight shared elsewhere cannot take this activation's scales
            else:
                readers[activation.name].append((node, graph.initializers[target.name]))
    records, divisors = [], {}
    for name in sorted(readers):
        if name in blocked:
            continue
        activation = readers[name][0][0].inputs[0]
        record = smoothing.migrate(graph, activation, readers[name], channel_max[name], config.smoothing, names)
        if record is not None:
            scale = record.pop("scale")
            divisors.update((id(node), scale) for node, _ in readers[name])
            records.append(record)
    return records, divisors


def _scale_1d(stored: _Stored, names: Names) -> ir.Value:
    if stored.scale_1d is None:
        stored.scale_1d = stored.own(initializer(stored.graph, names(f"{stored.name}_scale"), stored.params.scale))
    return stored.scale_1d


def _zero_point(stored: _Stored, names: Names) -> ir.Value | None:
    if stored.params.symmetric:
        return None
    if stored.zero_point is None:
        stored.zero_point = stored.own(initializer(stored.graph, names(f"{stored.name}_zp"), stored.params.zero_point))
    return stored.zero_point


def _dequantized(stored: _Stored, head: list[ir.Node], names: Names) -> ir.Value:
    """W = (Cast(q) - zero_point) * scale, in the weight's float type: ORT folds it at load."""
    if stored.dequantized is not None:
        return stored.dequantized
    if stored.transposed:
        raise AssertionError("weight-only use of a weight stored transposed")
    params = stored.params
    float_np = stored.dtype.numpy()
    shape = quant.broadcast_shape(params.scale, params.axis, stored.ndim)
    if shape and params.axis == stored.ndim - 1 and float_np == np.float32:
        scale = _scale_1d(stored, names)  # [N] broadcasts against [..., N]: share the kernels' scale
    else:
        scale = stored.own(initializer(stored.graph, names(f"{stored.name}_scale_w"),
                                       params.scale.reshape(shape).astype(float_np)))
    cast = ir.node("Cast", [stored.q], {"to": stored.dtype})
    cast.outputs[0].name = names(f"{stored.name}_cast")
    value = cast.outputs[0]
    head.append(cast)
    if not params.symmetric:
        zero = stored.own(initializer(stored.graph, names(f"{stored.name}_zp_w"),
                                      params.zero_point.astype(np.float32).reshape(shape).astype(float_np)))
        sub = ir.node("Sub", [value, zero])
        sub.outputs[0].name = names(f"{stored.name}_centred")
        head.append(sub)
        value = sub.outputs[0]
    mul = ir.node("Mul", [value, scale])
    mul.outputs[0].name = names(f"{stored.name}_dequantized")
    head.append(mul)
    stored.dequantized = mul.outputs[0]
    return stored.dequantized


def _weight_dq(stored: _Stored, head: list[ir.Node], names: Names) -> ir.Value:
    if stored.dq is None:
        inputs = [stored.q, _scale_1d(stored, names)]
        zero = _zero_point(stored, names)
        if zero is not None:
            inputs.append(zero)
        attrs = {} if stored.params.axis is None else {"axis": stored.params.axis}
        dq = ir.node("DequantizeLinear", inputs, attrs)
        dq.outputs[0].name = names(f"{stored.name}_dq")
        head.append(dq)
        stored.dq = dq.outputs[0]
    return stored.dq


def _kn(node: ir.Node, stored: _Stored, names: Names) -> ir.Value:
    """The int8 weight as [K, N] for MatMulInteger. A Gemm transB weight is stored transposed
    when all its uses are dynamic; when it is shared with a weight-only use, a Transpose (which ORT
    constant-folds at load) turns the stored [N, K] around."""
    if node.op_type != "Gemm" or not int_attr(node, "transB") or stored.transposed:
        return stored.q
    if stored.kn is None:
        transpose = ir.node("Transpose", [stored.q], {"perm": [1, 0]})
        transpose.outputs[0].name = names(f"{stored.name}_kn")
        stored.graph.insert_before(next(iter(stored.graph)), transpose)
        stored.kn = transpose.outputs[0]
    return stored.kn


def _rewrite_dynamic(node: ir.Node, stored: _Stored, cache: dict, names: Names) -> None:
    """MatMul/Gemm -> DynamicQuantizeLinear + MatMulInteger + Cast + Mul(scales) [+ Add(bias)]."""
    graph = node.graph
    base = node.name or node.op_type
    x = node.inputs[0]
    key = (id(graph), id(x))  # an outer-scope input is quantized once per subgraph reading it
    if key not in cache:
        dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3)
        for output, suffix in zip(dql.outputs, ("q", "scale", "zp")):
            output.name = names(f"{x.name}_{suffix}")
        graph.insert_before(node, dql)
        cache[key] = tuple(dql.outputs)
    xq, xs, xz = cache[key]
    inputs = [xq, _kn(node, stored, names), xz]
    zero = _zero_point(stored, names)
    if zero is not None:
        inputs.append(zero)
    new: list[ir.Node] = []
    matmul = ir.node("MatMulInteger", inputs)
    matmul.outputs[0].name = names(f"{base}_int32")
    cast = ir.node("Cast", [matmul.outputs[0]], {"to": ir.DataType.FLOAT})
    cast.outputs[0].name = names(f"{base}_float")
    weight_scale = _scale_1d(stored, names)
    alpha = float_attr(node, "alpha") if node.op_type == "Gemm" else 1.0
    if alpha != 1.0:
        weight_scale = stored.own(initializer(stored.graph, names(f"{base}_alpha_scale"),
                                    (stored.params.scale * np.float32(alpha)).astype(np.float32)))
    scale = ir.node("Mul", [xs, weight_scale])
    scale.outputs[0].name = names(f"{base}_scale")
    product = ir.node("Mul", [cast.outputs[0], scale.outputs[0]])
    product.outputs[0].name = names(f"{base}_rescaled")
    new += [matmul, cast, scale, product]
    result = product.outputs[0]
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        c = node.inputs[2]
        beta = float_attr(node, "beta")
        if beta != 1.0:
            c = initializer(graph, names(f"{base}_beta_c"), (const(c) * np.float32(beta)).astype(np.float32))
        add = ir.node("Add", [result, c])
        add.outputs[0].name = names(f"{base}_biased")
        new.append(add)
        result = add.outputs[0]
    graph.insert_before(node, new)
    replace_output(node, result)


def _rewrite_static(node: ir.Node, stored: _Stored, ranges, activation_dq: dict[int, ir.Value], names: Names) -> None:
    """Q/DQ on the op's input and on its output (or its ReLU's): ORT fuses QLinearConv/QLinearMatMul."""
    graph = node.graph
    x = node.inputs[0]
    if id(x) not in activation_dq:
        q, dq = _qdq_nodes(graph, x, ranges[x.name], names)
        graph.insert_before(node, [q, dq])
        activation_dq[id(x)] = activation_dq[id(dq.outputs[0])] = dq.outputs[0]
    node.replace_input_with(0, activation_dq[id(x)])
    out = static_output(node)
    q, dq = _qdq_nodes(graph, out, ranges[out.name], names)
    graph.insert_after(out.producer(), [q, dq])
    for use in list(out.uses()):
        if use.node is not q:
            use.node.replace_input_with(use.idx, dq.outputs[0])
    activation_dq[id(out)] = activation_dq[id(dq.outputs[0])] = dq.outputs[0]


def _qdq_nodes(graph: ir.Graph, x: ir.Value, value_range: tuple[float, float], names: Names) -> tuple[ir.Node, ir.Node]:
    params = quant.activation_qparams(*value_range)
    scale = initializer(graph, names(f"{x.name}_scale"), params.scale)
    zero = initializer(graph, names(f"{x.name}_zp"), params.zero_point)
    q = ir.node("QuantizeLinear", [x, scale, zero])
    q.outputs[0].name = names(f"{x.name}_q")
    dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero])
    dq.outputs[0].name = names(f"{x.name}_dq")
    return q, dq
