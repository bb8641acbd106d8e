"""What a model's output holds, read from the graph where the array alone is ambiguous:

* ``positions`` — class scores for each position, ``[N, T, classes]``: logits of a CTC recognizer
  (OCR, speech), a token tagger or a language model. Judged like ``[N, classes]`` scores: the argmax
  at each position is a decision (a character, a tag, a token), so ``agreement`` counts the positions
  whose argmax is unchanged. A cosine of 0.998 over a sequence of logits can hide a changed character
  in half the lines.
  Rule: walking back from the output through ops that keep the last axis last (Reshape, Squeeze,
  Unsqueeze, Identity, Cast, a Transpose that leaves the last axis in place, a constant bias Add/Sub),
  the first computing op is a classifier head — a Gemm or MatMul with a constant weight that widens
  (hidden -> more classes) or whose output is named like ``logits``, or Softmax / LogSoftmax over the
  last axis — and the output has rank 3 or more (``fidelity`` checks the rank). A linear output
  projection that keeps or narrows the width (mel frames, token vectors) stays a feature.
* ``embedding`` — an L2-normalized vector per sample, ``[N, D]`` (sentence-transformers, CLIP,
  face and speaker embeddings): compared by cosine, not by an argmax over its dimensions, which
  decides nothing. Rule: the last computing op is LpNormalization(p=2), or a Div whose divisor is
  computed from ReduceL2 or from Sqrt of a ReduceSum / ReduceSumSquare.
* ``auto`` — anything else: rank 2 is class scores, rank >= 3 features (``fidelity``).
"""

from __future__ import annotations

import hashlib
import os

import onnx

KEEPS_LAST_AXIS = {"Reshape", "Squeeze", "Unsqueeze", "Identity", "Cast"}
# Between an L2 norm and the Div that applies it: an epsilon floor, a broadcast, a reshape.
NORM_GLUE = {"Clip", "Max", "Add", "Expand", "Unsqueeze", "Reshape", "Identity", "Cast"}
MAX_STEPS = 32


def output_kind(model: bytes | str | os.PathLike, output: int | str = 0) -> str:
    """``positions``, ``embedding`` or ``auto`` for ``output`` (index or name) of the model."""
    kinds = output_kinds(model)
    if isinstance(output, str):
        return kinds.get(output, "auto")
    return list(kinds.values())[output] if 0 <= output < len(kinds) else "auto"


def output_kinds(model: bytes | str | os.PathLike) -> dict[str, str]:
    """The kind of every graph output, by name in graph order; the model is read once per content
    (bytes: by hash; a file: by path, size and mtime), however many outputs and callers ask."""
    if isinstance(model, (bytes, bytearray)):
        key = hashlib.blake2b(model, digest_size=16).hexdigest()
    else:
        stat = os.stat(model)
        key = f"{os.fspath(model)}:{stat.st_size}:{stat.st_mtime_ns}"
    if key not in _KINDS:
        if len(_KINDS) >= CACHED_MODELS:
            _KINDS.pop(next(iter(_KINDS)))
        _KINDS[key] = _read_kinds(model)
    return _KINDS[key]


_KINDS: dict[str, dict[str, str]] = {}  # content key -> output kinds (small: never the model itself)
CACHED_MODELS = 16


def _read_kinds(model: bytes | str | os.PathLike) -> dict[str, str]:
    try:
        if isinstance(model, (bytes, bytearray)):
            proto = onnx.load_model_from_string(bytes(model))
        else:
            proto = onnx.load(os.fspath(model), load_external_data=False)
    except Exception:  # unreadable here: the benchmark reports that itself
        return {}
    graph = _Graph(proto.graph)
    return {o.name: graph.kind(o.name) for o in proto.graph.output}


class _Graph:
    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producers = {out: node for node in graph.node for out in node.output}
        self.constants = {i.name for i in graph.initializer} | {
            n.output[0] for n in graph.node if n.op_type == "Constant"}
        self.shapes = {i.name: tuple(i.dims) for i in graph.initializer}
        for n in graph.node:
            value = _attribute(n, "value", None) if n.op_type == "Constant" else None
            if value is not None and hasattr(value, "dims"):
                self.shapes[n.output[0]] = tuple(value.dims)

    def kind(self, name: str) -> str:
        output, rank = name, _declared_rank(self.graph, name)
        for _ in range(MAX_STEPS):
            node = self.producers.get(name)
            if node is None or node.domain not in ("", "ai.onnx"):
                return "auto"
            op = node.op_type
            if op == "Gemm" or (op == "MatMul" and node.input[1] in self.constants):
                return "positions" if self.classifier(node, output) else "auto"
            if op in ("Softmax", "LogSoftmax"):
                axis = _attribute(node, "axis", -1)
                return "positions" if axis == -1 or (rank is not None and axis == rank - 1) else "auto"
            if op == "LpNormalization":
                return "embedding" if _attribute(node, "p", 2) == 2 else "auto"
            if op == "Div" and self.l2_norm(node.input[1]):
                return "embedding"
            if op == "Transpose":
                perm = _attribute(node, "perm", None)
                if perm is None or perm[-1] != len(perm) - 1:
                    return "auto"
            elif op in ("Add", "Sub") and len(node.input) == 2 and (
                    (node.input[0] in self.constants) != (node.input[1] in self.constants)):
                name = node.input[1] if node.input[0] in self.constants else node.input[0]  # a bias
                continue
            elif op not in KEEPS_LAST_AXIS:
                return "auto"
            name = node.input[0]
        return "auto"

    def classifier(self, node: onnx.NodeProto, output: str) -> bool:
        """A linear layer at the end is a classifier head when it widens (hidden -> more classes: CTC
        characters, a vocabulary) or the output is named like logits (exporters' convention for
        classifier, tagger and CTC heads); a projection that keeps or narrows the width (mel frames,
        ColBERT token vectors, an output projection) stays features."""
        if "logit" in output.lower():
            return True
        shape = self.shapes.get(node.input[1])
        if shape is None or len(shape) != 2:
            return False
        trans_b = node.op_type == "Gemm" and _attribute(node, "transB", 0)
        inputs, outputs = (shape[1], shape[0]) if trans_b else (shape[0], shape[1])
        return outputs > inputs

    def l2_norm(self, name: str) -> bool:
        """``name`` is ||x||₂ (ReduceL2, or Sqrt of a sum of squares), perhaps floored and broadcast."""
        for _ in range(8):
            node = self.producers.get(name)
            if node is None:
                return False
            if node.op_type == "ReduceL2":
                return True
            if node.op_type == "Sqrt":
                source = self.producers.get(node.input[0])
                return source is not None and source.op_type in ("ReduceSum", "ReduceSumSquare")
            if node.op_type not in NORM_GLUE:
                return False
            if node.op_type in ("Max", "Add"):  # a floor: the computed side carries the norm
                computed = [i for i in node.input if i and i not in self.constants]
                if len(computed) != 1:
                    return False
                name = computed[0]
            else:  # the data input; Expand's / Reshape's shape input is a side input
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
