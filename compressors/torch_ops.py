"""ONNX operators as torch functions: elementwise math, tensor and shape ops, reductions, control flow.

The graph interpreter (``torch_graph.py``) calls ``OPS[op_type](call, *inputs)`` for every node;
``call`` carries the node's attributes as Python values, the opset and a runner for subgraphs.
Semantics follow the ONNX operator specification (and onnxruntime where the spec leaves a choice),
including the opset-dependent forms: axes as attribute or input, Softmax's 2-D coercion before
opset 13. Layer ops (Conv, pooling, normalization) live in ``torch_nn_ops.py``, shape, layout and
constant ops in ``torch_shape_ops.py``; all register into ``OPS`` here.

An op whose attributes ask for something not implemented names the problem in ``CHECKS`` (run once
when the interpreter is built), so the user hears about it before any training starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir
import torch
import torch.nn.functional as F

Tensor = torch.Tensor

DTYPES: dict[ir.DataType, torch.dtype] = {
    ir.DataType.FLOAT: torch.float32, ir.DataType.DOUBLE: torch.float64,
    ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16,
    ir.DataType.INT8: torch.int8, ir.DataType.UINT8: torch.uint8, ir.DataType.INT16: torch.int16,
    ir.DataType.INT32: torch.int32, ir.DataType.INT64: torch.int64, ir.DataType.BOOL: torch.bool,
    # Types torch lacks or barely supports are widened; they only ever hold indices and shapes here.
    ir.DataType.UINT4: torch.uint8, ir.DataType.INT4: torch.int8, ir.DataType.UINT16: torch.int32,
    ir.DataType.UINT32: torch.int64, ir.DataType.UINT64: torch.int64,
}


def torch_dtype(onnx_type: int | ir.DataType) -> torch.dtype:
    dtype = ir.DataType(onnx_type)
    if dtype not in DTYPES:
        raise ValueError(f"tensors of type {dtype.name} are not supported by the torch interpreter")
    return DTYPES[dtype]


class UnsupportedCase(ValueError):
    """A case of a supported op that depends on input values (so the graph checks cannot see it) and
    that the interpreter does not implement: refused by name when the node runs."""


@dataclass
class Call:
    """What an op function sees of its node."""

    op_type: str
    name: str
    attrs: dict[str, Any]
    opset: int
    n_outputs: int
    # run_graph(attribute name) -> list of the subgraph's outputs, evaluated in the node's scope.
    run_graph: Callable[[str], list[Tensor]] = field(default=lambda name: [])

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


OPS: dict[str, Callable[..., Any]] = {}
# op_type -> check(attrs, node_facts) returning the reason it cannot run, or None.
CHECKS: dict[str, Callable[[dict[str, Any], dict[str, Any]], str | None]] = {}


def op(*names: str):
    def register(fn):
        for name in names:
            OPS[name] = fn
        return fn

    return register


def ints(t: Tensor | None) -> list[int] | None:
    return None if t is None else [int(v) for v in t.reshape(-1).tolist()]


def axes_of(call: Call, given: Tensor | None) -> list[int] | None:
    """Axes from the optional input (newer opsets) or else the ``axes`` attribute (older ones)."""
    axes = ints(given)
    return axes if axes is not None else call.attr("axes")


# --------------------------------------------------------------------------- elementwise

_UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf,
    "Sqrt": torch.sqrt, "Neg": torch.neg, "Exp": torch.exp, "Log": torch.log, "Abs": torch.abs,
    "Reciprocal": torch.reciprocal, "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round,
    "Sign": torch.sign, "Sin": torch.sin, "Cos": torch.cos, "Not": torch.logical_not,
    "Softplus": F.softplus, "Softsign": F.softsign, "IsNaN": torch.isnan,
    "Mish": lambda x: x * torch.tanh(F.softplus(x)),
}
for _name, _fn in _UNARY.items():
    OPS[_name] = lambda call, x, _fn=_fn: _fn(x)


def _div(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # C-style integer division, as in onnxruntime


def _pow(a: Tensor, b: Tensor) -> Tensor:
    if b.is_floating_point() and a.is_floating_point():
        b = b.to(a.dtype)
    return torch.pow(a, b).to(a.dtype)  # ONNX: the result has the base's type


_BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div, "Pow": _pow,
    "Equal": torch.eq, "Greater": torch.gt, "Less": torch.lt, "GreaterOrEqual": torch.ge,
    "LessOrEqual": torch.le, "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
}
for _name, _fn in _BINARY.items():
    OPS[_name] = lambda call, a, b, _fn=_fn: _fn(a, b)


@op("Mod")
def _mod(call: Call, a: Tensor, b: Tensor) -> Tensor:
    return torch.fmod(a, b) if call.attr("fmod", 0) else torch.remainder(a, b)


@op("Sum", "Mean", "Max", "Min")
def _variadic(call: Call, *xs: Tensor) -> Tensor:
    combine = {"Sum": torch.add, "Mean": torch.add, "Max": torch.maximum, "Min": torch.minimum}[call.op_type]
    out = xs[0]
    for x in xs[1:]:
        out = combine(out, x)
    return out / len(xs) if call.op_type == "Mean" else out


@op("LeakyRelu")
def _leaky_relu(call: Call, x: Tensor) -> Tensor:
    return F.leaky_relu(x, call.attr("alpha", 0.01))


@op("Elu")
def _elu(call: Call, x: Tensor) -> Tensor:
    return F.elu(x, call.attr("alpha", 1.0))


@op("Selu")
def _selu(call: Call, x: Tensor) -> Tensor:
    alpha, gamma = call.attr("alpha", 1.67326319217681884765625), call.attr("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@op("HardSigmoid")
def _hard_sigmoid(call: Call, x: Tensor) -> Tensor:
    return torch.clamp(call.attr("alpha", 0.2) * x + call.attr("beta", 0.5), 0, 1)


@op("HardSwish")
def _hard_swish(call: Call, x: Tensor) -> Tensor:
    return F.hardswish(x)


@op("PRelu")
def _prelu(call: Call, x: Tensor, slope: Tensor) -> Tensor:
    return torch.where(x < 0, x * slope, x)


@op("Gelu")
def _gelu(call: Call, x: Tensor) -> Tensor:
    return F.gelu(x, approximate=call.attr("approximate", "none"))


@op("Clip")
def _clip(call: Call, x: Tensor, low: Tensor | None = None, high: Tensor | None = None) -> Tensor:
    if call.opset < 11:
        low_v, high_v = call.attr("min"), call.attr("max")
    else:
        low_v = None if low is None else low.item()
        high_v = None if high is None else high.item()
    return x if low_v is None and high_v is None else torch.clamp(x, low_v, high_v)


@op("Where")
def _where(call: Call, cond: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(cond.bool(), a, b)


@op("Softmax", "LogSoftmax", "Hardmax")
def _softmax(call: Call, x: Tensor) -> Tensor:
    fn = {"Softmax": torch.softmax, "LogSoftmax": torch.log_softmax, "Hardmax": _hardmax}[call.op_type]
    if call.opset >= 13:
        return fn(x, dim=call.attr("axis", -1))
    # Before opset 13 the input is coerced to 2-D at ``axis`` and normalized over the second part.
    axis = call.attr("axis", 1) % max(x.dim(), 1)
    flat = x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
    return fn(flat, dim=1).reshape(x.shape)


def _hardmax(x: Tensor, dim: int) -> Tensor:
    return F.one_hot(torch.argmax(x, dim=dim), x.shape[dim]).movedim(-1, dim).to(x.dtype)


# --------------------------------------------------------------------------- linear algebra


@op("MatMul")
def _matmul(call: Call, a: Tensor, b: Tensor) -> Tensor:
    return torch.matmul(a, b)


@op("Gemm")
def _gemm(call: Call, a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
    a = a.t() if call.attr("transA", 0) else a
    b = b.t() if call.attr("transB", 0) else b
    alpha, beta = call.attr("alpha", 1.0), call.attr("beta", 1.0)
    y = a @ b if alpha == 1.0 else alpha * (a @ b)
    if c is not None:
        y = y + (c if beta == 1.0 else beta * c)
    return y


@op("Einsum")
def _einsum(call: Call, *xs: Tensor) -> Tensor:
    return torch.einsum(call.attr("equation"), *xs)


# --------------------------------------------------------------------------- reductions

_REDUCE: dict[str, Callable[[Tensor, tuple[int, ...], bool], Tensor]] = {
    "ReduceMean": lambda x, d, k: torch.mean(x, d, keepdim=k),
    "ReduceSum": lambda x, d, k: torch.sum(x, d, keepdim=k),
    "ReduceMax": lambda x, d, k: torch.amax(x, d, keepdim=k),
    "ReduceMin": lambda x, d, k: torch.amin(x, d, keepdim=k),
    "ReduceProd": lambda x, d, k: _prod(x, d, k),
    "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, d, keepdim=k)),
    "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, d, keepdim=k),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}


def _prod(x: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, d, keepdim=keep)
    return x


@op(*_REDUCE)
def _reduce(call: Call, x: Tensor, axes: Tensor | None = None) -> Tensor:
    dims = axes_of(call, axes)
    if not dims:
        if call.attr("noop_with_empty_axes", 0):
            return x
        dims = list(range(x.dim()))
    return _REDUCE[call.op_type](x, tuple(d % max(x.dim(), 1) for d in dims), bool(call.attr("keepdims", 1)))


@op("ArgMax", "ArgMin")
def _arg(call: Call, x: Tensor) -> Tensor:
    axis, keep = call.attr("axis", 0) % x.dim(), bool(call.attr("keepdims", 1))
    fn = torch.argmax if call.op_type == "ArgMax" else torch.argmin
    if call.attr("select_last_index", 0):
        return x.shape[axis] - 1 - fn(x.flip(axis), dim=axis, keepdim=keep)
    return fn(x, dim=axis, keepdim=keep)


# --------------------------------------------------------------------------- control flow


@op("If")
def _if(call: Call, cond: Tensor) -> list[Tensor]:
    """The condition is data: evaluate it and run only the branch it picks."""
    return call.run_graph("then_branch" if bool(cond.reshape(-1)[0]) else "else_branch")


from modelpress.compressors import torch_nn_ops, torch_rnn_ops, torch_shape_ops  # noqa: E402,F401  (register their ops)
