"""Whether a model's output holds class scores for each position: ``[N, T, classes]`` logits of a
CTC recognizer (OCR, speech), a token tagger or a language model — read from the graph, because the
array alone looks like any feature map.

Such an output is judged like ``[N, classes]`` scores: the argmax at each position is a decision
(a character, a tag, a token), so ``agreement`` counts the positions whose argmax is unchanged. A
cosine of 0.998 over a whole sequence of logits can hide a changed character in half the lines.

The rule: walking back from the output through ops that keep the last axis last (Reshape, Squeeze,
Unsqueeze, Identity, Cast, a Transpose that leaves the last axis in place, a constant bias Add/Sub),
the first computing op is a classifier head — Gemm, MatMul with a constant weight, or Softmax /
LogSoftmax over the last axis. Hidden states end in LayerNormalization, an activation or a residual
Add; detector heads in Concat / Sigmoid: those stay features, judged by cosine.
"""

from __future__ import annotations

import functools
import hashlib
import os

import onnx

KEEPS_LAST_AXIS = {"Reshape", "Squeeze", "Unsqueeze", "Identity", "Cast"}
MAX_STEPS = 32


def scores_per_position(model: bytes | str | os.PathLike, output: int | str = 0) -> bool:
    """True when ``output`` (index or name) of the model is per-position class scores (see above)."""
    if isinstance(model, (bytes, bytearray)):
        return _cached(hashlib.blake2b(model, digest_size=16).hexdigest(), bytes(model), output)
    stat = os.stat(model)
    return _cached(f"{os.fspath(model)}:{stat.st_size}:{stat.st_mtime_ns}", os.fspath(model), output)


@functools.lru_cache(maxsize=16)
def _cached(key: str, model: bytes | str, output: int | str) -> bool:
    try:
        if isinstance(model, bytes):
            proto = onnx.load_model_from_string(model)
        else:
            proto = onnx.load(model, load_external_data=False)
    except Exception:  # unreadable here: the benchmark reports that itself; judge as features
        return False
    graph = proto.graph
    names = [o.name for o in graph.output]
    name = output if isinstance(output, str) else (names[output] if 0 <= output < len(names) else None)
    return name is not None and _head(graph, name)


def _head(graph: onnx.GraphProto, name: str) -> bool:
    producers = {out: node for node in graph.node for out in node.output}
    constants = {i.name for i in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    rank = _declared_rank(graph, name)
    for _ in range(MAX_STEPS):
        node = producers.get(name)
        if node is None or node.domain not in ("", "ai.onnx"):
            return False
        op = node.op_type
        if op == "Gemm" or (op == "MatMul" and node.input[1] in constants):
            return True
        if op in ("Softmax", "LogSoftmax"):
            axis = _attribute(node, "axis", -1)
            return axis == -1 or (rank is not None and axis == rank - 1)
        if op == "Transpose":
            perm = _attribute(node, "perm", None)
            if perm is None or perm[-1] != len(perm) - 1:
                return False
        elif op in ("Add", "Sub") and len(node.input) == 2 and (node.input[0] in constants) != (node.input[1] in constants):
            name = node.input[1] if node.input[0] in constants else node.input[0]  # a bias: follow the other side
            continue
        elif op not in KEEPS_LAST_AXIS:
            return False
        name = node.input[0]
    return False


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            value = onnx.helper.get_attribute_value(attribute)
            return list(value) if isinstance(value, (list, tuple)) else value
    return default


def _declared_rank(graph: onnx.GraphProto, name: str) -> int | None:
    for info in graph.output:
        if info.name == name and info.type.tensor_type.HasField("shape"):
            return len(info.type.tensor_type.shape.dim)
    return None

