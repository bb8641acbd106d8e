"""An ONNX graph as a torch module whose parameters are the graph's own initializers, for training.

before: an ``onnx_ir.Model`` (or a ``ModelProto`` / serialized bytes) and the names of the float
initializers to train.
after:  ``TorchGraph``: ``forward(**feeds)`` runs the nodes in graph order with the torch versions of
their ops (``torch_ops.py``, ``torch_nn_ops.py``) and returns the graph outputs by name. The chosen
initializers are ``nn.Parameter``s (float32 master copies), all others are constant tensors, and
``trainable`` pairs each parameter with the ``ir.Value`` it came from, so trained values go back into
the same graph under the same names and dtypes — there is no second model to map back from.

Why an interpreter and not a converter (onnx2torch and the like): a converter rebuilds the model as
torch modules with its own parameter names and layouts (Gemm ``transB`` folded into Linear, BatchNorm
as a module), so mapping trained weights back is a second, lossy step; and k-means lookups
(``Cast -> Gather`` from a codebook) or weights inside ``If`` branches have no module to become.
Interpreting keeps every tensor where the graph has it.

Subgraphs: ``If`` evaluates its condition and runs the chosen branch; branch initializers can be
trained like any other. A model with ops or attributes the interpreter lacks fails at construction
with one ``ValueError`` naming every unsupported op type and its nodes.
"""

from __future__ import annotations

import dataclasses
from collections import ChainMap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch
from torch import nn

from modelpress.compressors.model import iter_graphs, opset_version
from modelpress.compressors.torch_ops import CHECKS, DTYPES, OPS, Call, torch_dtype

_NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
          torch.int8: np.int8, torch.uint8: np.uint8, torch.int16: np.int16, torch.int32: np.int32,
          torch.int64: np.int64, torch.bool: np.bool_}


def to_torch(tensor: ir.TensorProtocol) -> torch.Tensor:
    """An initializer or constant as a torch tensor (a copy; 4-bit and unsigned types widened)."""
    target = torch_dtype(tensor.dtype)
    array = tensor.numpy()
    if target == torch.bfloat16:
        return torch.from_numpy(array.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(array, dtype=_NUMPY[target]))


# --------------------------------------------------------------------------- support check


def unsupported(model: ir.Model) -> list[str]:
    """One line per problem: each unsupported op type with its nodes, each unsupported attribute use."""
    unknown: dict[str, list[str]] = {}
    problems: list[str] = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        name = node.name or "?"
        if node.domain not in ("", "ai.onnx") or node.op_type not in OPS:
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            unknown.setdefault(key, []).append(name)
            continue
        attrs = {k: a.value for k, a in node.attributes.items() if a.type not in _GRAPH_ATTRS}
        if node.op_type == "Cast" and ir.DataType(attrs.get("to", 1)) not in DTYPES:
            problems.append(f"Cast node {name!r}: casts to {ir.DataType(attrs['to']).name}")
        check = CHECKS.get(node.op_type)
        facts = {"outputs_used": [bool(o.uses()) or o.is_graph_output() for o in node.outputs]}
        reason = check(attrs, facts) if check else None
        if reason:
            problems.append(f"{node.op_type} node {name!r}: {reason}")
    for graph in iter_graphs(model):
        for value in graph.initializers.values():
            if value.const_value is not None and value.const_value.dtype not in DTYPES:
                problems.append(f"initializer {value.name!r}: type {value.const_value.dtype.name}")
    ops = [
        f"{op} (node{'s' if len(names) > 1 else ''} {_names(names)})" for op, names in sorted(unknown.items())
    ]
    return ([f"unsupported ONNX op{'s' if len(ops) > 1 else ''}: {', '.join(ops)}"] if ops else []) + problems


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


_GRAPH_ATTRS = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)


# --------------------------------------------------------------------------- the module


@dataclass
class _Step:
    call: Call
    inputs: list[ir.Value | None]
    outputs: list[ir.Value]
    subgraphs: dict[str, _Program]


@dataclass
class _Program:
    graph: ir.Graph
    steps: list[_Step]


def as_ir(model: ir.Model | onnx.ModelProto | bytes) -> ir.Model:
    if isinstance(model, bytes):
        model = onnx.load_model_from_string(model)
    return ir.from_proto(model) if isinstance(model, onnx.ModelProto) else model


class TorchGraph(nn.Module):
    """``forward(**feeds) -> {output name: tensor}``; ``trainable``: [(ir.Value, nn.Parameter)]."""

    def __init__(self, model: ir.Model | onnx.ModelProto | bytes, trainable: Iterable[str] = ()):
        super().__init__()
        model = as_ir(model)
        problems = unsupported(model)
        if problems:
            raise ValueError("cannot run the model in torch: " + "; ".join(problems))
        self.model = model
        self.opset = opset_version(model)
        wanted = set(trainable)
        self.weights = nn.ParameterList()
        self.trainable: list[tuple[ir.Value, nn.Parameter]] = []
        # initializer -> (parameter index or buffer name, dtype the graph computes in). Constants are
        # registered buffers, so ``.to()`` and ``state_dict()`` see every tensor of the graph.
        self._initializers: dict[ir.Value, tuple[int | str, torch.dtype]] = {}
        for graph in iter_graphs(model):
            for value in graph.initializers.values():
                if value.const_value is None:
                    continue
                tensor = to_torch(value.const_value)
                if value.name in wanted:
                    if not tensor.is_floating_point():
                        raise ValueError(f"initializer {value.name!r} is {value.const_value.dtype.name}, "
                                         "not a float tensor, so it cannot be trained")
                    param = nn.Parameter(tensor.float())
                    self.weights.append(param)
                    self.trainable.append((value, param))
                    self._initializers[value] = (len(self.weights) - 1, tensor.dtype)
                else:
                    key = f"initializer_{len(self._initializers)}"
                    self.register_buffer(key, tensor, persistent=False)
                    self._initializers[value] = (key, tensor.dtype)
        missing = wanted - {v.name for v, _ in self.trainable}
        if missing:
            raise ValueError(f"no initializer named {', '.join(sorted(map(repr, missing)))} in the model")
        self._program = self._compile(model.graph)
        self._by_name = {v.name: v for v in model.graph.inputs}
        self._by_name.update({o.name: o for node in model.graph for o in node.outputs if o.name})

    def _compile(self, graph: ir.Graph) -> _Program:
        steps = []
        for node in graph:
            attrs: dict[str, Any] = {}
            subgraphs: dict[str, _Program] = {}
            for key, attr in node.attributes.items():
                if attr.type == ir.AttributeType.GRAPH:
                    subgraphs[key] = self._compile(attr.value)
                elif attr.type == ir.AttributeType.TENSOR:
                    attrs[key] = to_torch(attr.value)
                elif attr.type in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
                    attrs[key] = list(attr.value)
                else:
                    attrs[key] = attr.value
            call = Call(node.op_type, node.name or "?", attrs, self.opset, len(node.outputs))
            steps.append(_Step(call, list(node.inputs), list(node.outputs), subgraphs))
        return _Program(graph, steps)

    def forward(self, **feeds: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        return self.run(feeds)

    def run(self, feeds: Mapping[str, np.ndarray | torch.Tensor], extra: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """Graph outputs by name, plus the main-graph values named in ``extra`` (e.g. layer outputs)."""
        env: dict[ir.Value, torch.Tensor] = {}
        for value in self.model.graph.inputs:
            if value.name in feeds:
                feed = feeds[value.name]
                env[value] = feed if isinstance(feed, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(feed))
            elif value not in self._initializers:
                raise ValueError(f"no feed for graph input {value.name!r}")
        outputs = self._run(self._program, env)
        result = {v.name: t for v, t in zip(self.model.graph.outputs, outputs)}
        for name in extra:
            if name not in self._by_name:
                raise ValueError(f"no value named {name!r} in the main graph")
            result[name] = env[self._by_name[name]]
        return result

    def _run(self, program: _Program, env: dict | ChainMap) -> list[torch.Tensor]:
        for value in program.graph.initializers.values():
            if value in self._initializers and value not in env:
                env[value] = self._initializer(value)
        for step in program.steps:
            args = [None if v is None else self._lookup(v, env, step) for v in step.inputs]
            while args and args[-1] is None:  # trailing optional inputs take the op's defaults
                args.pop()
            call = step.call
            if step.subgraphs:  # a branch sees the enclosing scope; its own values stay local
                call = dataclasses.replace(call, run_graph=lambda key, s=step: self._run(s.subgraphs[key], ChainMap({}, env)))
            try:
                result = OPS[call.op_type](call, *args)
            except Exception as exc:
                raise RuntimeError(f"{call.op_type} node {call.name!r} failed in the torch interpreter: "
                                   f"{type(exc).__name__}: {exc}") from exc
            if isinstance(result, torch.Tensor):
                result = (result,)
            for value, tensor in zip(step.outputs, result):
                env[value] = tensor
        return [self._lookup(v, env, None) for v in program.graph.outputs]

    def _lookup(self, value: ir.Value, env, step: _Step | None) -> torch.Tensor:
        if value in env:
            return env[value]
        if value in self._initializers:  # an outer graph's initializer used inside a branch
            return self._initializer(value)
        where = f"{step.call.op_type} node {step.call.name!r}" if step else "a graph output"
        raise RuntimeError(f"value {value.name!r} used by {where} was never computed "
                           "(the nodes are not in topological order?)")

    def _initializer(self, value: ir.Value) -> torch.Tensor:
        where, dtype = self._initializers[value]
        tensor = self.weights[where] if isinstance(where, int) else self._buffers[where]
        return tensor if tensor.dtype == dtype else tensor.to(dtype)  # float32 master -> fp16/bf16 graph
