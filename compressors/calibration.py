"""Calibration capture: statistics of the inputs of chosen layers, accumulated feed by feed.

before: a model, the names of values in its main graph (the inputs of MatMul/Gemm layers), the
calibration feeds, and one ``Reduction`` per value (``Gram`` for X^T X, ``ColumnNorms`` for Wanda).
after:  each reduction has seen that value on every feed; the model is untouched.

How: a copy of the model proto whose graph outputs are the requested values, cut down to the nodes
they depend on, runs in onnxruntime once per feed; each captured array is folded into its reduction
and dropped, so activations are never all held at once. Values are captured ``values_per_run`` at a
time to bound the memory of one run. Values inside If/Loop/Scan bodies cannot be graph outputs:
``linear_layers`` reports the layers that read them as not capturable, and callers fall back to a
data-free criterion.

``linear_layers`` also says, for each prunable weight, which value feeds it and in which layout the
weight is stored — the facts a layer-wise solver (SparseGPT, Wanda, GPTQ) needs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import onnx
import onnx_ir as ir
from modelpress.kernels.im2col import Patches

Feed = dict[str, np.ndarray]


class Reduction(Protocol):
    def update(self, batch: np.ndarray) -> None:
        """Fold one captured array (one feed's value) into the statistic."""


def _rows(batch: np.ndarray, transposed: bool | Patches) -> np.ndarray:
    """A MatMul input [..., K] (or a Gemm ``transA=1`` input [K, M], or a Conv input unfolded into
    its patches) as rows [n, K] of float32."""
    if isinstance(transposed, Patches):
        return transposed.rows(batch)
    x = np.asarray(batch)
    if transposed:
        x = x.T
    return x.reshape(-1, x.shape[-1]).astype(np.float32, copy=False)


@dataclass
class Gram:
    """``H = X^T X / rows`` of a layer input: the Hessian of the layer-wise output error.

    Rows are buffered until there are at least ``flush_rows`` (or K) of them, so many small feeds
    (one sentence each) cost one large float32 product instead of many K×K float64 additions.
    """

    transposed: bool = False
    flush_rows: int = 2048
    total: np.ndarray | None = None
    rows: int = 0
    _pending: list = field(default_factory=list, repr=False)
    _pending_rows: int = 0

    def update(self, batch: np.ndarray) -> None:
        x = _rows(batch, self.transposed)
        self._pending.append(x)
        self._pending_rows += x.shape[0]
        self.rows += x.shape[0]
        if self._pending_rows >= max(self.flush_rows, x.shape[1]):
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            x = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._accumulate(x)
            self._pending, self._pending_rows = [], 0

    def _accumulate(self, x: np.ndarray) -> np.ndarray:
        product = (x.T @ x).astype(np.float64)  # float32 BLAS product, float64 running sum
        self.total = product if self.total is None else self.total + product
        return product

    @property
    def hessian(self) -> np.ndarray:
        self._flush()
        return self.total / max(1, self.rows)


@dataclass
class CrossGram(Gram):
    """``H = X̂^T X̂`` of the inputs in the model being pruned, plus ``C = X̂^T X`` with the same
    value X in the original model (``capture(..., reference=...)``). With both, a layer can be
    solved for ``min ||X̂ W' - X W||²``: its own pruning error and the one that reaches it from the
    layers pruned before it. Without a reference X = X̂ and ``C = H``.
    """

    paired = True
    cross_total: np.ndarray | None = None
    _references: list = field(default_factory=list, repr=False)

    def update(self, batch: np.ndarray, reference: np.ndarray | None = None) -> None:
        self._references.append(None if reference is None or reference is batch else _rows(reference, self.transposed))
        super().update(batch)

    def _accumulate(self, x: np.ndarray) -> np.ndarray:
        product = super()._accumulate(x)
        references, self._references = self._references, []
        if all(r is None for r in references):
            cross = product  # no reference run: X = X̂
        else:
            own = np.cumsum([0] + [p.shape[0] for p in self._pending])
            xr = np.concatenate([x[a:b] if r is None else r for a, b, r in zip(own[:-1], own[1:], references)])
            cross = (x.T @ xr).astype(np.float64)
        self.cross_total = cross if self.cross_total is None else self.cross_total + cross
        return product

    @property
    def cross(self) -> np.ndarray:
        self._flush()
        return self.cross_total / max(1, self.rows)


@dataclass
class ColumnNorms:
    """``||X_j||₂`` per input feature j over all rows: the activation term of Wanda's score."""

    transposed: bool = False
    squares: np.ndarray | None = None
    rows: int = 0

    def update(self, batch: np.ndarray) -> None:
        x = _rows(batch, self.transposed).astype(np.float64)
        sums = np.einsum("ij,ij->j", x, x)
        self.squares = sums if self.squares is None else self.squares + sums
        self.rows += x.shape[0]

    @property
    def norms(self) -> np.ndarray:
        return np.sqrt(self.squares)


def capture(
    model: ir.Model,
    requests: Sequence[tuple[str, Reduction]],
    feeds: Sequence[Feed],
    *,
    values_per_run: int = 8,
    threads: int = 2,
    reference: onnx.ModelProto | None = None,
    row_masks: Sequence[np.ndarray | None] | None = None,
    progress: Callable[[str, int, int], None] = lambda description, completed, total: None,
) -> None:
    """Run ``feeds`` through ``model`` and fold each requested value into its reductions.

    ``requests`` pairs a main-graph value name with a reduction; a name may appear several times.
    Graph inputs are read straight from the feeds. With ``reference`` (a model with the same value
    names, e.g. the original before pruning), reductions marked ``paired`` get
    ``update(value, value_in_reference)`` from both models on the same feed. ``row_masks`` (one per
    feed, from ``padding_masks``) keeps only the rows of real positions (see ``select_rows``).
    Raises ValueError for a name that is not a value of the main graph.
    """
    import onnxruntime as ort

    by_name: dict[str, list[Reduction]] = {}
    for name, reduction in requests:
        by_name.setdefault(name, []).append(reduction)
    graph_inputs = {v.name for v in model.graph.inputs}
    produced = {out.name for node in model.graph for out in node.outputs}
    unknown = [n for n in by_name if n not in graph_inputs and n not in produced]
    if unknown:
        raise ValueError(f"not values of the main graph, cannot capture: {unknown}")

    masks = list(row_masks) if row_masks is not None else [None] * len(feeds)

    def fold(name: str, array: np.ndarray, reference_array: np.ndarray | None, mask: np.ndarray | None) -> None:
        for reduction in by_name[name]:
            transposed = getattr(reduction, "transposed", False)
            if isinstance(transposed, Patches) and len(array) > 1:
                # One image at a time: a batch's patches are kh·kw times its size (GBs for a CNN).
                for i in range(len(array)):
                    fold_one(reduction, array[i : i + 1], None if reference_array is None else reference_array[i : i + 1])
                continue
            own, ref = select_rows(array, mask, transposed), select_rows(reference_array, mask, transposed)
            fold_one(reduction, own, ref)

    def fold_one(reduction: Reduction, own: np.ndarray, ref: np.ndarray | None) -> None:
        if getattr(reduction, "paired", False):
            reduction.update(own, ref)
        else:
            reduction.update(own)

    for feed, mask in zip(feeds, masks):
        for name in sorted(by_name.keys() & graph_inputs):
            fold(name, feed[name], None, mask)
    inner = [n for n in by_name if n not in graph_inputs]
    if not inner:
        return
    base = ir.to_proto(model)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    # Threads that spin between ops starve each other on a shared machine (throughput work, not timing).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    chunks = [inner[i : i + values_per_run] for i in range(0, len(inner), values_per_run)]
    for index, chunk in enumerate(chunks):
        progress("capturing calibration activations", index, len(chunks))
        paired = reference is not None and any(getattr(r, "paired", False) for n in chunk for r in by_name[n])
        sessions = [
            ort.InferenceSession(_exposing(proto, chunk).SerializeToString(), options, providers=["CPUExecutionProvider"])
            for proto in ([base, reference] if paired else [base])
        ]
        needed = {i.name for i in sessions[0].get_inputs()}
        for feed, mask in zip(feeds, masks):
            runs = [s.run(chunk, {k: v for k, v in feed.items() if k in needed}) for s in sessions]
            for i, name in enumerate(chunk):
                fold(name, runs[0][i], runs[1][i] if paired else None, mask)
            del runs
        del sessions


def first_samples(feeds: Sequence[Feed], samples: int | None) -> list[Feed]:
    """The feeds holding the first ``samples`` samples (all when None): whole feeds, the last one cut
    on its first axis when every input has the same length there (else it is kept whole)."""
    if samples is None:
        return list(feeds)
    kept, count = [], 0
    for feed in feeds:
        if count >= samples:
            break
        lengths = {a.shape[0] if a.ndim else 0 for a in feed.values()}
        n = lengths.pop() if len(lengths) == 1 else 0
        if n and count + n > samples:
            feed = {name: a[: samples - count] for name, a in feed.items()}
        kept.append(feed)
        count += n if n else samples  # a feed without a common sample axis counts as the rest
    return kept


def padding_masks(feeds: Sequence[Feed], name: str | None) -> list[np.ndarray | None] | None:
    """Each feed's ``name`` input (e.g. ``attention_mask``), whose zeros mark padding; None when
    ``name`` is None or no feed has it."""
    if name is None or not any(name in feed for feed in feeds):
        return None
    return [feed.get(name) for feed in feeds]


def select_rows(batch: np.ndarray | None, mask: np.ndarray | None, transposed: bool = False) -> np.ndarray | None:
    """The rows [n, K] of ``batch`` [..., K] at the positions where ``mask`` is nonzero.

    In a batch of sentences padded to a fixed length the padding tokens can outnumber the real ones
    (docstring sentences padded to 128 tokens: 88 % padding); their activations are never read by
    the pooled output, yet left in a Gram matrix they dominate it and tune every layer to them.
    Applied only when the leading dims of ``batch`` are the mask's shape ([batch, seq] for
    [batch, seq, K]); other values (a transposed Gemm input, a per-head
    [batch, heads, seq, d] tensor) are returned unchanged.
    """
    if batch is None or mask is None or transposed:
        return batch
    array = np.asarray(batch)
    if array.ndim < 2 or array.shape[:-1] != np.shape(mask):
        return batch
    return array.reshape(-1, array.shape[-1])[np.asarray(mask).reshape(-1) != 0]


def _exposing(base: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``base`` whose only outputs are ``names``, keeping just the nodes they depend on."""
    needed = set(names)
    kept = []
    for node in reversed(base.graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
            needed.update(_subgraph_references(node))
    graph = onnx.GraphProto(name=base.graph.name)
    graph.input.extend(base.graph.input)  # unused inputs stay so every feed is still accepted
    # An output with a name only (no type) is accepted by onnxruntime, whatever the value's dtype.
    graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    graph.node.extend(reversed(kept))
    graph.initializer.extend(t for t in base.graph.initializer if t.name in needed)
    graph.sparse_initializer.extend(t for t in base.graph.sparse_initializer if t.values.name in needed)
    graph.value_info.extend(v for v in base.graph.value_info if v.name in needed)
    model = onnx.ModelProto(ir_version=base.ir_version, graph=graph)
    model.opset_import.extend(base.opset_import)
    model.functions.extend(base.functions)
    return model


def _subgraph_references(node: onnx.NodeProto) -> Iterable[str]:
    """Every name read inside a node's subgraphs (a superset of the outer values they capture)."""
    for attr in node.attribute:
        for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in graph.node:
                yield from (i for i in inner.input if i)
                yield from _subgraph_references(inner)


# --------------------------------------------------------------------------- layers

# Which axis of each op's weight runs over the layer's inputs (N:M groups run along it).
def weight_input_axis(node: ir.Node, rank: int) -> int | None:
    if node.op_type == "MatMul":
        return rank - 2 if rank >= 2 else None
    if node.op_type == "Gemm":
        return 1 if _attr(node, "transB") else 0
    if node.op_type == "Conv":
        return 1  # [C_out, C_in/groups, k...]
    if node.op_type == "ConvTranspose":
        return 0  # [C_in, C_out/groups, k...]
    return None


@dataclass
class LinearLayer:
    """A weight every use of which is a 2-D MatMul/Gemm or a one-group 2-D Conv in the main graph with
    a capturable input. A Conv kernel [O, C, kh, kw] is solved as the matrix [O, C·kh·kw] ("out_in")
    whose inputs are the patches (``Patches``, kernels/im2col.py)."""

    weight: ir.Value
    layout: str  # "in_out" ([in, out]) or "out_in" ([out, in]); see kernels/hessian.py
    inputs: list[tuple[str, bool]]  # (value name, transposed as in Gemm transA=1), one per use
    order: int  # position of the first use in the main graph
    in_axis: int = field(init=False)

    def __post_init__(self):
        self.in_axis = 0 if self.layout == "in_out" else 1


def linear_layers(
    model: ir.Model, weights: Iterable[ir.Value]
) -> tuple[list[LinearLayer], list[tuple[ir.Value, str]]]:
    """Split ``weights`` into solvable layers (sorted in graph order) and (weight, reason) for the rest."""
    position = {id(node): i for i, node in enumerate(model.graph)}
    layers, rest = [], []
    for value in weights:
        uses = list(value.uses())
        reason, layouts, inputs = None, set(), []
        for use in uses:
            node = use.node
            if node.graph is not model.graph:
                reason = "used inside an If/Loop/Scan subgraph, whose values cannot be captured"
            elif node.op_type in ("Conv", "ConvTranspose"):
                reason = _conv_reason(node, value)
                if reason is None:
                    layouts.add("out_in")  # [O, C, kh, kw] solved as [O, C·kh·kw]
                    inputs.append((node.inputs[0].name, _patches(node, value)))
            elif node.op_type == "MatMul" and len(value.const_value.shape) != 2:
                reason = f"MatMul weight of rank {len(value.const_value.shape)} (batched), not a 2-D layer"
            elif node.op_type not in ("MatMul", "Gemm"):
                reason = f"{node.op_type} is not a linear layer"
            else:
                source = node.inputs[0]
                if source is None or not source.name:
                    reason = f"{node.op_type} {node.name!r} has an unnamed input"
                elif source.const_value is not None or source.is_initializer():
                    reason = f"{node.op_type} {node.name!r} multiplies two constants"
                else:
                    transb = node.op_type == "Gemm" and bool(_attr(node, "transB"))
                    layouts.add("out_in" if transb else "in_out")
                    transa = node.op_type == "Gemm" and bool(_attr(node, "transA"))
                    inputs.append((source.name, transa))
            if reason:
                break
        if reason is None and len(layouts) > 1:
            reason = "shared by layers that store it in different layouts (Gemm transB)"
        if reason is None and not uses:
            reason = "not used by any node"
        if reason:
            rest.append((value, reason))
        else:
            order = min(position[id(u.node)] for u in uses)
            layers.append(LinearLayer(value, layouts.pop(), inputs, order))
    layers.sort(key=lambda layer: layer.order)
    return layers, rest


def plan_rounds(layers: Sequence[LinearLayer], rounds: int | str) -> list[list[LinearLayer]]:
    """Group layers (already in graph order) into capture rounds.

    ``"sequential"``: one round per distinct layer input, as in SparseGPT — each round's activations
    come from the model with every earlier round already pruned, so later layers correct for the
    error upstream. An integer k: k contiguous rounds of about equal size (1 = every statistic from
    the original model in one run: fastest, slightly less accurate). Layers that read the same value
    (Q, K, V) always share a round.
    """
    groups: list[list[LinearLayer]] = []
    seen: dict[tuple, int] = {}
    for layer in layers:
        key = tuple(sorted(layer.inputs, key=repr))  # (name, bool | Patches): not mutually orderable
        if key in seen:
            groups[seen[key]].append(layer)
        else:
            seen[key] = len(groups)
            groups.append([layer])
    count = len(groups) if rounds == "sequential" else max(1, min(int(rounds), len(groups)))
    if not groups:
        return []
    bounds = np.linspace(0, len(groups), count + 1).round().astype(int)
    return [[layer for g in groups[a:b] for layer in g] for a, b in itertools.pairwise(bounds)]


def _conv_reason(node: ir.Node, value: ir.Value) -> str | None:
    """Why a Conv / ConvTranspose weight has no layer-wise solver here (None: it has one)."""
    if node.op_type == "ConvTranspose":
        return "ConvTranspose: no calibration solver for transposed convolutions"
    if node.inputs[1] is not value or len(value.const_value.shape) != 4:
        return "Conv that is not 2-D or does not read this constant as its kernel"
    if _attr(node, "group", 1) != 1:
        return f"grouped Conv (group={_attr(node, 'group', 1)})"
    source = node.inputs[0]
    if source is None or not source.name or source.const_value is not None:
        return f"Conv {node.name!r} has no capturable input"
    return None


def _patches(node: ir.Node, value: ir.Value) -> Patches:
    kernel = tuple(int(k) for k in value.const_value.shape[2:])
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    return Patches(kernel, tuple(_attr(node, "strides", None) or (1, 1)), tuple(_attr(node, "pads", None) or (0, 0, 0, 0)),
                   tuple(_attr(node, "dilations", None) or (1, 1)), auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad)


def _attr(node: ir.Node, name: str, default=0):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value
