"""Model I/O: load and check an ONNX file, normalize what exporters produce, save atomically.

before: an ONNX file as an exporter wrote it (weights in ``Constant`` nodes, in ``If``/``Loop``
subgraphs, in external data files).
after:  an ``onnx_ir.Model`` whose weights are all initializers that passes can reach with
``iter_weights`` (subgraphs included), and on the way out a file written tensor by tensor to a
temporary name and renamed into place.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from modelpress.compressors.errors import InputError
from modelpress.compressors.fold import fold_weight_layouts

# Protobuf cannot serialize a message of 2 GiB or more; above this we write external data.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
QUANTIZED_OPS = frozenset({"DequantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul",
                           "MatMulNBits", "DynamicQuantizeMatMul"})


def load_model(path: str | os.PathLike) -> ir.Model:
    """Read an ONNX file; every failure becomes an InputError naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf raises several types for corrupt bytes
        raise InputError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc}). "
            "The file may be truncated or corrupt; export it again."
        ) from None
    if len(model.graph) == 0 and not model.graph.outputs:
        raise InputError(f"{path}: the ONNX graph is empty; the file may be truncated or not a model")
    _check_external_data(model, path)
    return model


def _check_external_data(model: ir.Model, path: Path) -> None:
    """Fail early (not mid-pass) when an external data file is missing or too short."""
    for graph in iter_graphs(model):
        for value in graph.initializers.values():
            tensor = value.const_value
            if not isinstance(tensor, ir.ExternalTensor):
                continue
            location = Path(tensor.base_dir) / tensor.location
            if not location.is_file():
                raise InputError(
                    f"{path}: tensor {value.name!r} keeps its data in {tensor.location!r}, "
                    f"which is missing (looked in {location.parent}). Put the data file beside the model."
                )
            needed = (tensor.offset or 0) + (tensor.length or 0)
            if location.stat().st_size < needed:
                raise InputError(
                    f"{path}: external data file {location} is shorter than tensor {value.name!r} "
                    f"needs ({location.stat().st_size} < {needed} bytes); the copy is truncated."
                )


def normalize(model: ir.Model) -> list[str]:
    """Make exporter quirks uniform in place; return a note for each quirk found."""
    quirks: list[str] = []
    # IR < 4 lists every initializer as a graph input too (the classic ONNX model zoo files, torch's
    # keep_initializers_as_inputs). As an input it is a default a caller could override, so no pass may
    # treat it as a weight: left so, every recipe would compress nothing and still pass its gates. A
    # one-element default (a threshold a caller may well feed) stays an input.
    listed = [v for v in model.graph.inputs if v.name in model.graph.initializers
              and v.const_value is not None and v.const_value.size > 1]
    if listed:
        for value in listed:
            model.graph.inputs.remove(value)
        model.ir_version = max(model.ir_version or 0, 4)  # IR 3 requires initializers among the inputs
        quirks.append(f"{len(listed)} initializer(s) were also listed as graph inputs (IR < 4 style); "
                      "they are treated as weights and no longer inputs of the output model")
    constants = [
        node
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx")
    ]
    # size_limit=2: tiny constants (shapes, axes) are not weights and stay as they are.
    lifted = LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=2)(model)
    if lifted.modified:
        remaining = sum(
            1 for node in ir.traversal.RecursiveGraphIterator(model.graph) if node.op_type == "Constant"
        )
        quirks.append(f"{len(constants) - remaining} Constant node(s) holding tensors were made initializers")
    folded = sum(fold_weight_layouts(graph) for graph in list(iter_graphs(model)))
    if folded:
        quirks.append(f"{folded} Reshape/Transpose-style node(s) of weights folded into the weights")
    subgraph_weights = sum(
        1 for graph in iter_graphs(model) if graph is not model.graph for _ in graph.initializers
    )
    if subgraph_weights:
        quirks.append(f"{subgraph_weights} initializer(s) live inside If/Loop/Scan subgraphs")
    quantized = quantized_nodes(model)
    if quantized:
        quirks.append(f"the model is already quantized ({quantized} quantize/integer node(s)): its integer weights "
                      "stay as they are; passes see only its float weights")
    shared = [v.name for _, v in iter_weights(model) if len(v.uses()) > 1]
    if shared:
        quirks.append(f"{len(shared)} initializer(s) are shared by several nodes")
    return quirks


def quantized_nodes(model: ir.Model) -> int:
    """How many quantize / integer-kernel nodes (QUANTIZED_OPS) the model holds, subgraphs included."""
    return sum(1 for node in ir.traversal.RecursiveGraphIterator(model.graph) if node.op_type in QUANTIZED_OPS)


def iter_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    """The main graph, then every subgraph (If branches, Loop/Scan bodies) at any depth."""
    yield model.graph
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield attr.value
            elif attr.type == ir.AttributeType.GRAPHS:
                yield from attr.value


def iter_weights(model: ir.Model) -> Iterator[tuple[ir.Graph, ir.Value]]:
    """Every initializer with a value, each once, with the graph that owns it."""
    for graph in iter_graphs(model):
        for value in list(graph.initializers.values()):
            if value.const_value is not None:
                yield graph, value


def opset_version(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


def ensure_opset(model: ir.Model, minimum: int) -> ir.Model:
    """Upgrade the default-domain opset to at least ``minimum`` with ONNX's version converter."""
    if opset_version(model) >= minimum:
        return model
    proto = ir.to_proto(model)
    try:
        converted = onnx.version_converter.convert_version(proto, minimum)
    except Exception as exc:
        raise InputError(
            f"the model is at opset {opset_version(model)} and could not be upgraded to opset "
            f"{minimum} by onnx.version_converter ({exc}); export it at opset >= {minimum}"
        ) from None
    return ir.from_proto(converted)


def to_bytes(model: ir.Model) -> bytes:
    """Serialize a model that fits in one protobuf (< 2 GiB)."""
    return to_proto(model).SerializeToString()


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """``ir.to_proto`` without the value_info entries it writes for initializers: the
    initializer already carries its type and dims, and on small models they cost ~1 % of the file."""
    proto = ir.to_proto(model)
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        initializers = {t.name for t in graph.initializer}
        kept = [v for v in graph.value_info if v.name not in initializers]
        if len(kept) != len(graph.value_info):
            del graph.value_info[:]
            graph.value_info.extend(kept)
        for node in graph.node:
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.HasField("g") else list(attr.graphs))
    return proto


def check_model(model: ir.Model) -> None:
    """Raise ValueError when the ONNX checker or an ORT CPU session rejects the model."""
    import onnxruntime as ort

    proto = to_proto(model)
    if proto.ByteSize() > EXTERNAL_DATA_THRESHOLD:
        return  # too large to check in memory; the final benchmark loads it from disk
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ValueError(f"onnx.checker rejects the result: {str(exc).splitlines()[0]}") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ValueError(f"onnxruntime cannot load the result: {str(exc).strip()[:500]}") from None


def write_atomic(data: bytes, path: str | os.PathLike) -> None:
    """Write bytes to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, _file_mode())  # mkstemp's 0600 would hide the output from a CI job's other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _file_mode() -> int:
    """The mode ``open()`` would give a new file: 0666 less the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def fits_in_protobuf(model: ir.Model) -> bool:
    """Whether the weights leave room to serialize the model as one protobuf (< 2 GiB)."""
    return sum(v.const_value.nbytes for _, v in iter_weights(model)) < EXTERNAL_DATA_THRESHOLD


def save_model(model: ir.Model, path: str | os.PathLike) -> None:
    """Save atomically; models too large for one protobuf get ``<name>.data`` beside them."""
    path = Path(path)
    if fits_in_protobuf(model):
        write_atomic(to_bytes(model), path)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        data_name = f"{path.name}.data"
        ir.save(model, tmp_dir / path.name, external_data=data_name, size_threshold_bytes=1024)
        os.replace(tmp_dir / data_name, path.parent / data_name)
        os.replace(tmp_dir / path.name, path)
    finally:
        for leftover in tmp_dir.glob("*"):
            leftover.unlink()
        tmp_dir.rmdir()


def check_output_path(model_path: str | os.PathLike, output: str | os.PathLike, force: bool) -> None:
    """The output may never be the input, and an existing output needs ``--force``."""
    model_path, output = Path(model_path), Path(output)
    if output.exists() and model_path.exists() and output.resolve() == model_path.resolve():
        raise InputError(f"{output}: the output would overwrite the input model; choose another --output")
    if output.exists() and not force:
        raise InputError(f"{output}: already exists; pass --force to replace it")
    if output.suffix != ".onnx":
        raise InputError(f"{output}: --output must end in .onnx")


# Which inputs of each op hold weight matrices a compression pass may change (a recurrent op's input
# and recurrence weights W and R; its bias B is a vector of the gates).
WEIGHT_INPUTS = {"MatMul": (1,), "Gemm": (1,), "Conv": (1,), "ConvTranspose": (1,), "Gather": (0,),
                 "LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2)}


def output_channel_axis(node: ir.Node, rank: int) -> int:
    """The axis of a weight read by ``node`` (at one of its WEIGHT_INPUTS) that indexes the op's
    output channels (a table's rows): per-channel scales and codebooks run along it."""
    op = node.op_type
    if op == "Gemm":
        trans_b = node.attributes.get("transB")
        return 0 if trans_b is not None and trans_b.as_int() else 1
    if op == "ConvTranspose":
        return 1
    if op == "Gather":
        axis = node.attributes.get("axis")
        return (axis.as_int() if axis is not None else 0) % rank
    if op in ("LSTM", "GRU", "RNN"):
        return 1  # W, R: [directions, gates * hidden, inputs]: a row per gate unit
    if op == "MatMul":
        return rank - 1  # [..., K, N]
    return 0  # Conv: [out, in, ...]


def weight_inputs(model: ir.Model, op_types: set[str]) -> Iterator[tuple[ir.Value, str | None]]:
    """Each float initializer of rank >= 2 with its verdict: None if every use is the weight
    input of an op in ``op_types``, else the reason it must be left alone."""
    for _, value in iter_weights(model):
        tensor = value.const_value
        if tensor.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE):
            continue
        if len(tensor.shape) < 2:
            continue  # biases, norm scales, shapes: never weight matrices
        uses = list(value.uses())
        if not uses:
            yield value, "not used by any node"
            continue
        if value.is_graph_output():
            yield value, "is a graph output"
            continue
        bad = [
            f"{use.node.op_type} input {use.idx}"
            for use in uses
            if use.node.op_type not in op_types or use.idx not in WEIGHT_INPUTS.get(use.node.op_type, ())
        ]
        yield value, (f"also used as {', '.join(sorted(set(bad)))}" if bad else None)
