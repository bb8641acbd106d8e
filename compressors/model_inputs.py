"""The inputs a model asks for, read from its ONNX signature: name, dtype, shape (ONNX dim names
kept, as error messages and ``--shape`` refer to them) and, for token-id inputs that index an
embedding table, the table's size. ``data.py`` checks ``--data`` against them; ``synthetic.py``
makes up inputs from them when there is no ``--data``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx

from modelpress.compressors.errors import InputError

Dim = int | str | None


@dataclass(frozen=True)
class InputSpec:
    """One real input of a model: ``shape`` holds ints for fixed dims, a str (the ONNX dim_param)
    or None for dynamic dims, and is None as a whole when the model declares no rank."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...] | None
    # Exclusive upper bound for index values, when the input feeds a Gather over an initializer
    # directly (token ids into an embedding table): synthesized ids stay inside the table.
    index_bound: int | None = None

    def describe(self) -> str:
        return f"{self.name} {self.dtype} {format_shape(self.shape)}"


def format_shape(shape: tuple[Dim, ...] | None) -> str:
    if shape is None:
        return "[rank unknown]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def model_inputs(model: bytes | str | os.PathLike | onnx.ModelProto) -> list[InputSpec]:
    """The inputs a feed must supply: graph inputs minus initializers listed as inputs.

    Read with onnx (external data not loaded), not an onnxruntime session: cheap for multi-GB
    models, and it keeps the ONNX dim names the error messages and ``--shape`` refer to.
    """
    if isinstance(model, onnx.ModelProto):
        proto, where = model, "the model"
    elif isinstance(model, (bytes, bytearray)):
        proto, where = _parse(lambda: onnx.load_from_string(bytes(model)), "the model bytes"), "the model"
    else:
        proto = _parse(lambda: onnx.load(os.fspath(model), load_external_data=False), str(model))
        where = str(model)
    graph = proto.graph
    initializers = {t.name: tuple(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    initializers[node.output[0]] = tuple(attr.t.dims)
    specs = []
    for value in graph.input:
        if value.name in initializers:
            continue
        if not value.type.HasField("tensor_type"):
            raise InputError(
                f"{where}: input {value.name!r} is a {value.type.WhichOneof('value') or 'typeless'} value, "
                "not a tensor; modelpress feeds tensor inputs only"
            )
        tensor_type = value.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except Exception:
            raise InputError(f"{where}: input {value.name!r} has an unsupported element type {tensor_type.elem_type}") from None
        shape = None
        if tensor_type.HasField("shape"):
            shape = tuple(_dim(d) for d in tensor_type.shape.dim)
        bound = _index_bound(graph, value.name, initializers) if dtype.kind in "iu" else None
        specs.append(InputSpec(value.name, dtype, shape, bound))
    return specs


def _parse(load, where: str) -> onnx.ModelProto:
    try:
        return load()
    except FileNotFoundError:
        raise InputError(f"{where}: no such model file") from None
    except Exception as exc:
        raise InputError(f"{where}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None


def _dim(dim) -> Dim:
    # Some exporters (paddle2onnx) write -1 for a dynamic dim; onnxruntime treats it as dynamic too.
    if dim.HasField("dim_value") and dim.dim_value >= 0:
        return int(dim.dim_value)
    if dim.HasField("dim_param") and dim.dim_param:
        return dim.dim_param
    return None


def _index_bound(graph, name: str, tables: dict[str, tuple[int, ...]]) -> int | None:
    bounds = []
    for node in graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name and node.input[0] in tables:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            dims = tables[node.input[0]]
            if dims and -len(dims) <= axis < len(dims):
                bounds.append(int(dims[axis]))
    return min(bounds) if bounds else None
