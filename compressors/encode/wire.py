"""Find tensor payloads inside serialized ONNX bytes without re-serializing (protobuf wire format).

The encoder cuts each tensor's ``raw_data`` out of the exact file bytes and the decoder splices
them back, so the restored file is identical by construction — no dependence on how a protobuf
library orders or re-encodes fields.
"""

from __future__ import annotations

from dataclasses import dataclass

# Field numbers from onnx.proto.
MODEL_GRAPH, MODEL_FUNCTIONS = 7, 25
FUNCTION_NODE = 7
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_SPARSE_INITIALIZER = 1, 5, 15
NODE_ATTRIBUTE = 5
ATTR_T, ATTR_G, ATTR_TENSORS, ATTR_GRAPHS, ATTR_SPARSE_TENSOR, ATTR_SPARSE_TENSORS = 5, 6, 10, 11, 22, 23
SPARSE_VALUES, SPARSE_INDICES = 1, 2
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_NAME, TENSOR_RAW_DATA = 1, 2, 8, 9

WIRE_VARINT, WIRE_I64, WIRE_LEN, WIRE_I32 = 0, 1, 2, 5


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


@dataclass(frozen=True)
class TensorSpan:
    name: str
    data_type: int
    dims: tuple[int, ...]
    start: int  # offset of the raw_data payload in the file
    length: int


def _varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("varint runs past the end of its message")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(data: memoryview, start: int, end: int):
    """Yield (field number, wire type, value or (payload start, payload end))."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if wire == WIRE_VARINT:
            value, pos = _varint(data, pos, end)
            yield number, wire, value
        elif wire == WIRE_LEN:
            length, pos = _varint(data, pos, end)
            if pos + length > end:
                raise WireError("length-delimited field runs past the end of its message")
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire == WIRE_I64:
            pos += 8
        elif wire == WIRE_I32:
            pos += 4
        else:
            raise WireError(f"unsupported wire type {wire}")
    if pos != end:
        raise WireError("message runs past its end")


def tensor_spans(onnx_bytes: bytes) -> list[TensorSpan]:
    """Every TensorProto's raw_data payload in the model, in file order (subgraphs included)."""
    data = memoryview(onnx_bytes)
    spans: list[TensorSpan] = []
    for number, wire, value in _fields(data, 0, len(data)):
        if number == MODEL_GRAPH and wire == WIRE_LEN:
            _graph(data, *value, spans)
        elif number == MODEL_FUNCTIONS and wire == WIRE_LEN:
            for n, w, v in _fields(data, *value):
                if n == FUNCTION_NODE and w == WIRE_LEN:
                    _node(data, *v, spans)
    return sorted(spans, key=lambda s: s.start)


def _graph(data, start, end, spans):
    for number, wire, value in _fields(data, start, end):
        if wire != WIRE_LEN:
            continue
        if number == GRAPH_NODE:
            _node(data, *value, spans)
        elif number == GRAPH_INITIALIZER:
            _tensor(data, *value, spans)
        elif number == GRAPH_SPARSE_INITIALIZER:
            _sparse(data, *value, spans)


def _node(data, start, end, spans):
    for number, wire, value in _fields(data, start, end):
        if number == NODE_ATTRIBUTE and wire == WIRE_LEN:
            for n, w, v in _fields(data, *value):
                if w != WIRE_LEN:
                    continue
                if n in (ATTR_T, ATTR_TENSORS):
                    _tensor(data, *v, spans)
                elif n in (ATTR_G, ATTR_GRAPHS):
                    _graph(data, *v, spans)
                elif n in (ATTR_SPARSE_TENSOR, ATTR_SPARSE_TENSORS):
                    _sparse(data, *v, spans)


def _sparse(data, start, end, spans):
    for number, wire, value in _fields(data, start, end):
        if number in (SPARSE_VALUES, SPARSE_INDICES) and wire == WIRE_LEN:
            _tensor(data, *value, spans)


def _tensor(data, start, end, spans):
    name, data_type, dims, raw = "", 0, [], None
    for number, wire, value in _fields(data, start, end):
        if number == TENSOR_NAME and wire == WIRE_LEN:
            name = bytes(data[value[0] : value[1]]).decode("utf-8", "replace")
        elif number == TENSOR_DATA_TYPE and wire == WIRE_VARINT:
            data_type = value
        elif number == TENSOR_DIMS:
            if wire == WIRE_VARINT:
                dims.append(value)
            elif wire == WIRE_LEN:  # packed dims
                pos, stop = value
                while pos < stop:
                    dim, pos = _varint(data, pos, stop)
                    dims.append(dim)
        elif number == TENSOR_RAW_DATA and wire == WIRE_LEN:
            raw = value
    if raw is not None and raw[1] > raw[0]:
        spans.append(TensorSpan(name, data_type, tuple(dims), raw[0], raw[1] - raw[0]))
