"""How each int8 weight is used, and where an int8 kernel pays: the plan of the int8 pass.

The placement rule (``placement: rule``) is fitted to these measurements (ORT 1.32 CPU,
AVX512-VNNI + AMX, 1 thread, µs per run, median of 15 interleaved rounds;
``benchmarks/int8_placement.py`` prints them). Cast*scale is the ``weight_only`` form of int8.py.

    MatMul [M,K]x[K,N]   fp32  Cast*scale  DQ->MatMul  dynamic  static
    1x64x300              8.9      9.1        12.2       13.8     12.9
    64x64x300            22.9     22.4        67.2       19.1     24.8
    64x300x100           34.1     34.1        62.1       19.8     20.6
    64x100x10             8.4      8.5        14.6       10.8     11.8
    512x256x64          116.7    112.4       256.3       74.0     73.3
    1x768x768            79.3     83.0        20.4       23.9     22.0
    128x768x768         984.8    985.2      1316.3      180.2    193.0
    128x768x3072       3966.6   3982.5      5089.1      664.6    762.6

    Conv 3x3 + ReLU (batch, Cin->Cout, HxW)  fp32  Cast*scale  DQ->Conv  ConvInteger  static
    64, 1->16, 8x8                           49.0     47.9       79.0      729.2      256.2
    1, 16->32, 8x8                           19.7     18.3       31.4       85.8       17.9
    64, 16->32, 8x8                         474.1    474.0     1151.8     4306.1      304.5
    1, 32->64, 32x32                        343.3    340.7      569.6     2989.3      150.0
    1, 64->64, 56x56                       1572.6   1562.6     2288.1    10478.6      575.9
    1, 128->128, 14x14                      371.9    370.1      593.8     2455.8      111.8

Static MatMul (QLinearMatMul) never beat dynamic, so ``auto`` uses dynamic for MatMul/Gemm. An
int8 kernel wins for large ops and loses for small ones (fixed quantize / layout overheads, ORT's
fp32 Conv/Gemm+ReLU fusion, narrow outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from modelpress.compressors.model import iter_graphs, output_channel_axis
from modelpress.compressors.quantize.graph_edits import const, float_attr, int_attr
from modelpress.compressors.selection import select_weights

if TYPE_CHECKING:  # the pass module imports this one
    from modelpress.compressors.quantize.int8 import Int8Config
    from modelpress.compressors.quantize.int8_profile import Profile

# ``placement: rule``, fitted to the tables in the module docstring.
RULE_DYNAMIC_MACS = 1 << 20  # M*K*N: below, quantizing the activation costs what the kernel saves
RULE_DYNAMIC_WEIGHTS = 1 << 18  # K*N: memory-bound matrix-vector products win at any M
RULE_DYNAMIC_MIN_DIM = 32  # narrow K or N (an 8-wide input projection, a 10-class head) always lost
RULE_STATIC_MACS = 1 << 21
RULE_STATIC_DEPTH = 64  # Cin/group * kh * kw: shallower convs lose to fp32's direct kernels


NodeKey = tuple[int, int]  # (graph index in iter_graphs order, node index in that graph)


@dataclass
class Use:
    """One consumer of a quantized weight, and how it will consume it."""

    node: NodeKey
    node_name: str
    op_type: str
    input_index: int
    method: str = "weight_only"
    kernel: str | None = None  # the int8 kernel this use may run ("dynamic" | "static")
    why_not: str | None = None  # why it may not, if it may not


@dataclass
class Target:
    """One weight tensor to store as int8 (once, however many nodes use it)."""

    graph: int
    name: str
    axis: int | None
    uses: list[Use]

    @property
    def op_types(self) -> str:
        return "+".join(sorted({u.op_type for u in self.uses}))

    @property
    def methods(self) -> str:
        return "+".join(sorted({u.method for u in self.uses}))


FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def select_targets(model: ir.Model, config: Int8Config) -> tuple[list[Target], list[dict[str, str]]]:
    """The weights to quantize, and every float initializer left alone with the reason."""
    graphs = list(iter_graphs(model))
    graph_index = {id(g): i for i, g in enumerate(graphs)}
    node_key = {id(n): (gi, ni) for gi, g in enumerate(graphs) for ni, n in enumerate(g)}
    chosen, skipped = select_weights(model, set(config.op_types), config)
    targets: list[Target] = []
    for value in chosen:
        uses = sorted(
            (Use(node_key[id(u.node)], u.node.name or u.node.op_type, u.node.op_type, u.idx) for u in value.uses()),
            key=lambda u: u.node,
        )
        first = next(u.node for u in value.uses() if node_key[id(u.node)] == uses[0].node)
        rank = len(value.const_value.shape)
        axis = output_channel_axis(first, rank) if config.per_channel else None
        targets.append(Target(graph_index[id(value.graph)], value.name, axis, uses))
    # Vectors and scalars are never weight matrices; list them too, so every float tensor left
    # float is accounted for.
    for graph in graphs:
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if tensor is not None and tensor.dtype in FLOAT_TYPES and len(tensor.shape) < 2:
                skipped.append({"tensor": name, "reason": f"rank-{len(tensor.shape)} tensor (bias, scale or constant), kept float"})
    return targets, skipped


def mark_kernel_candidates(model: ir.Model, targets: list[Target], config: Int8Config, profile: Profile) -> None:
    """Set ``use.kernel`` to the int8 kernel each use could run, or ``use.why_not``."""
    graphs = list(iter_graphs(model))
    nodes = [list(g) for g in graphs]
    for target in targets:
        weight = graphs[target.graph].initializers[target.name].const_value
        for use in target.uses:
            node = nodes[use.node[0]][use.node[1]]
            use.kernel, use.why_not = None, None
            if use.op_type in ("MatMul", "Gemm"):
                static_matmul = config.mode == "static" and use.op_type == "MatMul"
                why = _static_blocker(node, use, target, weight, profile) if static_matmul else None
                if static_matmul and why is None:
                    use.kernel = "static"
                else:
                    use.why_not = _dynamic_blocker(node, use, target, weight, profile)
                    use.kernel = "dynamic" if use.why_not is None else None
            elif use.op_type == "Conv" and config.mode in ("auto", "static"):
                use.why_not = _static_blocker(node, use, target, weight, profile)
                use.kernel = "static" if use.why_not is None else None
            elif use.op_type == "Conv":
                use.why_not = "mode dynamic: ConvInteger is slower than fp32 Conv on CPU, so Conv stays weight-only"


def _dynamic_blocker(node: ir.Node, use: Use, target: Target, weight, profile: Profile) -> str | None:
    if use.input_index != 1:
        return "weight is not input B"
    if weight.dtype != ir.DataType.FLOAT or len(weight.shape) != 2:
        return "dynamic int8 needs a float32 rank-2 weight"
    activation = node.inputs[0]
    if activation is None or (activation.dtype is not None and activation.dtype != ir.DataType.FLOAT):
        return "activation is not float32"
    shape = profile.shapes.get(activation.name)
    if shape is None or len(shape) < 2:
        return "activation shape unknown or rank < 2"
    n_axis = 1
    if node.op_type == "Gemm":
        if int_attr(node, "transA"):
            return "Gemm with transA"
        n_axis = 0 if int_attr(node, "transB") else 1
        if len(node.inputs) > 2 and node.inputs[2] is not None and float_attr(node, "beta") != 1.0:
            if const(node.inputs[2]) is None:
                return "Gemm with a non-constant C and beta != 1"
    if target.axis is not None and target.axis != n_axis:
        return "weight shared with an op that needs another channel axis"
    return None


def _static_blocker(node: ir.Node, use: Use, target: Target, weight, profile: Profile) -> str | None:
    if use.node[0] != 0:
        return "static QDQ needs calibration; activations inside subgraphs are not captured"
    if profile.synthesized or not profile.feeds:
        return "no calibration data for static activation ranges"
    if use.input_index != 1 or weight.dtype != ir.DataType.FLOAT:
        return "static int8 needs a float32 weight as input 1"
    if node.op_type == "Conv" and len(weight.shape) != 4:
        return "QLinearConv kernel is 2-D only"
    if node.op_type == "MatMul" and len(weight.shape) != 2:
        return "static MatMul needs a rank-2 weight"
    wanted_axis = 0 if node.op_type == "Conv" else 1
    if target.axis is not None and target.axis != wanted_axis:
        return "weight shared with an op that needs another channel axis"
    out = static_output(node)
    if out is None:
        return "output is a graph output (no room for the output QDQ that makes the op integer)"
    activation = node.inputs[0]
    if activation is None or activation.name not in profile.ranges or out.name not in profile.ranges:
        return "activation range not calibrated"
    return None


def static_output(node: ir.Node) -> ir.Value | None:
    """The tensor whose QDQ closes a static group: the op's output, or the ReLU after it (ORT
    absorbs the ReLU into QLinearConv when the output zero point is the range minimum)."""
    out = node.outputs[0]
    if out.is_graph_output():
        return None
    uses = list(out.uses())
    if len(uses) == 1 and uses[0].node.op_type == "Relu" and uses[0].node.graph is node.graph:
        relu_out = uses[0].node.outputs[0]
        return None if relu_out.is_graph_output() else relu_out
    return out


def rule_prefers_kernel(node: ir.Node, kernel: str, shape) -> tuple[bool, str]:
    """``placement: rule``: does the int8 kernel pay at this size (see the tables above)?"""
    rows = int(np.prod(shape[:-1])) if shape else 1
    if kernel == "dynamic":
        w = node.inputs[1].const_value.shape
        k, n = (w[1], w[0]) if node.op_type == "Gemm" and int_attr(node, "transB") else (w[0], w[1])
        macs = rows * k * n
        ok = min(k, n) >= RULE_DYNAMIC_MIN_DIM and (macs >= RULE_DYNAMIC_MACS or k * n >= RULE_DYNAMIC_WEIGHTS)
        return ok, f"size rule: M*K*N={macs}, K*N={k * n}, N={n}"
    w = node.inputs[1].const_value.shape
    depth = w[1] * w[2] * w[3]
    macs = (shape[0] if shape else 1) * w[0] * depth * (int(np.prod(shape[2:])) if shape else 1)
    ok = depth >= RULE_STATIC_DEPTH and macs >= RULE_STATIC_MACS
    return ok, f"size rule: Cin*kh*kw={depth}, MACs~{macs}"


def micro_model(model: ir.Model, node: ir.Node, use: Use, shape) -> tuple[ir.Model, tuple[str, ...]] | None:
    """The op alone (plus the ReLU / bias Add ORT would fuse into it), as a one-input model."""
    if shape is None or any(not isinstance(d, int) or d <= 0 for d in shape):
        return None
    chain = [node]
    if use.kernel == "static":
        out = static_output(node)
        if out is not None and out is not node.outputs[0]:
            chain.append(out.producer())
    else:
        for op in ("Add", "Relu"):
            uses = list(chain[-1].outputs[0].uses())
            if len(uses) != 1 or uses[0].node.op_type != op or uses[0].node.graph is not node.graph:
                break
            nxt = uses[0].node
            if op == "Add" and not any(const(v) is not None for v in nxt.inputs):
                break
            chain.append(nxt)
    mapping: dict[int, ir.Value] = {}
    x = node.inputs[0]
    x_new = ir.Value(name=x.name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))
    mapping[id(x)] = x_new
    initializers: list[ir.Value] = []
    new_nodes: list[ir.Node] = []
    for old in chain:
        inputs = []
        for value in old.inputs:
            if value is None:
                inputs.append(None)
            elif id(value) in mapping:
                inputs.append(mapping[id(value)])
            elif value.const_value is not None and value.is_initializer():
                copy = ir.Value(name=value.name, const_value=value.const_value, type=value.type, shape=value.shape)
                mapping[id(value)] = copy
                initializers.append(copy)
                inputs.append(copy)
            else:
                return None
        attrs = [ir.Attr(a.name, a.type, a.value) for a in old.attributes.values()]
        new = ir.Node(old.domain, old.op_type, inputs, attrs, num_outputs=1, name=old.name)
        new.outputs[0].name = old.outputs[0].name
        mapping[id(old.outputs[0])] = new.outputs[0]
        new_nodes.append(new)
    # An Identity as the graph output keeps the op's own output internal, as it is in the model
    # (a static group needs a QDQ on it).
    identity = ir.node("Identity", [new_nodes[-1].outputs[0]], name="micro_output")
    identity.outputs[0].name = "micro_output"
    new_nodes.append(identity)
    graph = ir.Graph([x_new], [identity.outputs[0]], nodes=new_nodes, initializers=initializers,
                     opset_imports=dict(model.opset_imports), name="micro")
    micro = ir.Model(graph, ir_version=model.ir_version)
    return micro, tuple(n.op_type for n in chain[1:])


def signature(node: ir.Node, target: Target, shape, kernel: str, epilogue) -> tuple:
    """Ops with the same signature time alike: timed once, decided alike (q/k/v projections)."""
    attrs = tuple(sorted((a.name, repr(a.value)) for a in node.attributes.values()))
    weight = tuple(node.inputs[1].const_value.shape)
    return (node.op_type, attrs, weight, tuple(shape), kernel, epilogue, target.axis)
