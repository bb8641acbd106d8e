"""Weight-only int4 (or int8) block quantization: MatMul / Gemm weights by GPTQ or round-to-nearest,
Gather embedding tables per row.

before: a float model (float32 or float16 weights) — MatMul / Gemm weight matrices and Gather tables
in the main graph or in If/Loop/Scan subgraphs — and, for ``method: gptq``, calibration feeds.
after:  each selected matrix stored as ``bits``-bit integers in blocks of ``block_size`` inputs (one
scale, and for asymmetric one zero point, per block and output column), in one of two forms chosen
per consumer:

* ``matmulnbits`` — ``com.microsoft.MatMulNBits`` (packed uint4, scales [N, k_blocks], packed zero
  points, K padded to whole blocks, a Gemm's alpha folded into the scales and beta·C into the bias):
  the weight stays 4-bit in memory and the kernel dequantizes on the fly.
* ``folded`` — ``Cast(int4) [-> Sub(zero point)] -> Mul(scale) -> Reshape`` on constants only, which
  ORT constant-folds when the session loads: the op then runs the input model's fp32 kernel (the
  same speed), the file keeps 4 bits per weight. ``Cast`` from INT4 needs opset 21; the model is
  upgraded with ONNX's version converter, and if that fails every op that can use MatMulNBits does.

Why two forms, measured here (ORT 1.32 CPU, AVX512-VNNI, 1 thread, µs, median of 21 interleaved
rounds; block 32, symmetric). DequantizeLinear(int4, block_size) -> MatMul is fused by ORT into
this very MatMulNBits (accuracy level 4), so it timed the same and is not emitted.

    [M,K]x[K,N]     fp32   NBits acc0   NBits acc4   DQ(int4)->MatMul   folded
    1x384x384       12.2      19.2         10.2          10.2             12.2
    8x384x384       24.2      61.7         32.7          32.2             25.0
    128x384x384    234.3     275.1        397.7         396.7            236.7
    1x384x1536      72.7      60.1         20.5          20.4             70.7
    8x384x1536     129.5     233.5        103.2         100.6            129.7
    32x384x1536    288.3     396.5        376.7         364.9            289.7
    128x384x1536  1012.3    1116.1       1500.6        1487.8           1018.3
    1x1536x384      74.5      56.5         20.2          19.8             74.0
    128x1536x384  1024.0    1136.4       1515.7        1514.8           1035.7

MatMulNBits wins on matrix-vector products (a token at a time) and loses from ~32 rows on, where
the fp32 GEMM is compute-bound and fast; accuracy level 4 (int8 compute) beats 0 wherever the
kernel wins. ``format: auto`` therefore places MatMulNBits (``accuracy_level``, default 4) where the
rows of one run on the latency feed (one sample of the first calibration feed, as the benchmark
times it) are at most ``NBITS_ROWS`` (or ``NBITS_WIDE_ROWS`` for weights of ``NBITS_WIDE_WEIGHTS``
or more), and the folded form elsewhere or where the rows are unknown: never slower than the input.

Embedding tables (``embeddings: int8 | int4``) get one scale per row (or per ``embedding_block_size``
block of a row) in the folded form: a 128-token Gather took 20 µs as fp32 and folded, 165 µs as
``GatherBlockQuantized`` (uint8-packed; 1200 µs with an INT4 table). GatherBlockQuantized is used
only for int4 tables when the opset upgrade fails.

With ``method: gptq`` layers are solved in capture ``rounds`` as in the SparseGPT pass (later rounds
see the earlier layers already quantized). Weights the solver cannot reach — inside subgraphs,
shared in two layouts — are rounded to nearest instead (``fallback``, with the reason). Per tensor
the stats give the form, the bytes before / after and, where a Hessian was captured, the relative
layer output error ``||X(W - Ŵ)||² / ||XW||²`` of GPTQ and of round-to-nearest.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field, field_validator

from modelpress.compressors import data
from modelpress.compressors.calibration import Gram, capture, linear_layers, plan_rounds
from modelpress.compressors.errors import InputError
from modelpress.compressors.model import ensure_opset, opset_version
from modelpress.compressors.pipeline import Pass, PassResult
from modelpress.compressors.quantize.int8 import (
    _const,
    _float_attr,
    _inferred_shapes,
    _initializer,
    _initializer_bytes,
    _int_attr,
    _latency_feed,
    _Names,
    _replace_output,
)
from modelpress.compressors.selection import WeightFilterConfig, select_weights
from modelpress.kernels.gptq import BlockQuantized, dequantize_blocks, gptq_quantize, output_error, rtn_quantize
from modelpress.kernels.quant import pack_bits

# Cast from INT4 / UINT4 needs opset 21, and INT4 tensors IR version 10.
INT4_OPSET = 21
INT4_IR_VERSION = 10
# format: auto — MatMulNBits where the rows of one run are at most this many (table above).
NBITS_ROWS = 1
NBITS_WIDE_ROWS = 8
NBITS_WIDE_WEIGHTS = 1 << 19
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def _power_of_two(value: int | None, minimum: int = 16) -> int | None:
    if value is not None and (value < minimum or value & (value - 1)):
        raise ValueError(f"must be a power of two >= {minimum} (MatMulNBits / GatherBlockQuantized), got {value}")
    return value


class Int4Config(WeightFilterConfig):
    method: Literal["gptq", "rtn"] = Field("gptq", description="gptq: Hessian-based error compensation "
                                           "from --data; rtn: round to nearest, no data needed")
    bits: Literal[4, 8] = 4
    block_size: int = Field(32, description="inputs per scale (power of two >= 16)")
    symmetric: bool = Field(True, description="no zero points (else one per block)")
    damp: float = Field(0.01, gt=0.0, lt=1.0, description="GPTQ Hessian damping, a fraction of its mean diagonal")
    act_order: bool = Field(False, description="GPTQ: quantize inputs by decreasing Hessian diagonal")
    rounds: Literal["sequential"] | Annotated[int, Field(ge=1)] = Field(
        1, description="GPTQ capture runs: 1 = all statistics from the input model (fast); "
        "sequential = each layer sees the layers before it quantized")
    format: Literal["auto", "matmulnbits", "folded"] = Field(
        "auto", description="auto: MatMulNBits where it runs faster than fp32 (few rows per run), else folded")
    accuracy_level: Literal[0, 1, 4] = Field(4, description="MatMulNBits: 4 = int8 compute (measured fastest)")
    embeddings: Literal["int8", "int4", "keep"] = Field("int8", description="Gather tables, one scale per row")
    embedding_block_size: int | None = Field(None, description="scales per block of a row instead (power of two)")

    _blocks = field_validator("block_size")(lambda cls, v: _power_of_two(v))
    _embedding_blocks = field_validator("embedding_block_size")(lambda cls, v: _power_of_two(v))


@dataclass
class _Target:
    value: ir.Value
    kind: str  # "linear" | "embedding"
    layout: str  # "in_out" | "out_in": blocks run along the input axis (rows of a table: "out_in")
    bits: int
    block: int
    forms: dict[int, str] = field(default_factory=dict)  # id(node) -> "matmulnbits" | "folded" | "gather"
    method: str = "rtn"
    errors: dict[str, float] = field(default_factory=dict)
    result: BlockQuantized | None = None


class Int4Quantize(Pass):
    name = "int4"
    stage = "quantize"
    config_cls = Int4Config
    summary = "weight-only int4 (GPTQ or round-to-nearest) for MatMul/Gemm, int8/int4 embeddings"
    # The default method calibrates; the CLI then asks for --data instead of synthesizing inputs.
    needs_calibration = True

    def call(self, model: ir.Model) -> PassResult:
        config: Int4Config = self.config
        feeds = self.context.calibration
        if config.method == "gptq" and not feeds:
            raise ValueError("the int4 pass with method: gptq needs calibration data: run with --data "
                             "(an .npz of model inputs), or set method: rtn")
        notes: list[str] = []
        bytes_before = _initializer_bytes(model)
        shapes = self._shapes(model, feeds, notes)
        targets, skipped = self._select(model, shapes, contrib_only=False)
        folded_int4 = any(t.bits == 4 and "folded" in t.forms.values() for t in targets)
        if folded_int4 and opset_version(model) < INT4_OPSET:
            before = opset_version(model)
            try:
                model = ensure_opset(model, INT4_OPSET)
            except InputError as exc:
                notes.append(f"no folded int4 form ({exc}); MatMulNBits / GatherBlockQuantized instead")
                targets, skipped = self._select(model, shapes, contrib_only=True)
            else:
                notes.append(f"opset upgraded {before} -> {INT4_OPSET} for Cast from int4")
                targets, skipped = self._select(model, shapes, contrib_only=False)

        fallback = self._solve(model, targets)
        names = _Names(model)
        for target in targets:
            _emit(model, target, config, names)

        per_tensor = {
            t.value.name: {"kind": t.kind, "method": t.method, "bits": t.bits,
                           "forms": "+".join(sorted(set(t.forms.values()))), **t.errors}
            for t in targets
        }
        gptq = [t.errors for t in targets if "output_error" in t.errors and "rtn_output_error" in t.errors]
        bytes_after = _initializer_bytes(model)
        stats: dict[str, Any] = {
            "method": config.method,
            "bits": config.bits,
            "block_size": config.block_size,
            "tensors_quantized": len(targets),
            "forms": dict(Counter(f for t in targets for f in t.forms.values())),
            "bytes_before": bytes_before,
            "bytes_after": bytes_after,
            "size_ratio": round(bytes_before / bytes_after, 3) if bytes_after else None,
            "opset": opset_version(model),
            "per_tensor": per_tensor,
            "fallback": fallback,
            "skipped": skipped,
            "notes": notes,
        }
        if gptq:
            stats["mean_output_error"] = round(float(np.mean([e["output_error"] for e in gptq])), 6)
            stats["mean_rtn_output_error"] = round(float(np.mean([e["rtn_output_error"] for e in gptq])), 6)
        return PassResult(model, modified=bool(targets), stats=stats)

    # ----------------------------------------------------------------------- placement

    def _shapes(self, model: ir.Model, feeds, notes: list[str]) -> dict[str, tuple[int, ...]]:
        """Activation shapes on the latency feed (one sample), for ``format: auto``."""
        if self.config.format != "auto":
            return {}
        proto = ir.to_proto(model)
        if not feeds:
            try:
                feeds = data.synthesize(data.model_inputs(proto), samples=1, seed=self.context.seed).feeds
            except InputError as exc:
                notes.append(f"activation shapes unknown ({exc}): every weight folded")
                return {}
        return _inferred_shapes(proto, _latency_feed(model, feeds[0]))

    def _select(self, model: ir.Model, shapes, contrib_only: bool) -> tuple[list[_Target], list[dict[str, str]]]:
        """The tensors to quantize with each consumer's form, and every float matrix left alone."""
        config: Int4Config = self.config
        chosen, skipped = select_weights(model, {"MatMul", "Gemm", "Gather"}, config)
        targets = []
        for value in chosen:
            ops = {u.node.op_type for u in value.uses()}
            target, reason = None, None
            if value.const_value.dtype not in FLOAT_TYPES:
                reason = f"{value.const_value.dtype} weights: MatMulNBits takes float32 / float16 only"
            elif len(value.const_value.shape) != 2:
                reason = f"rank-{len(value.const_value.shape)} weight (block quantization here is 2-D)"
            elif ops == {"Gather"}:
                reason, target = self._embedding(value, contrib_only)
            elif "Gather" in ops:
                reason = "used by a Gather and by a MatMul/Gemm (tied weights); left float"
            else:
                reason, target = self._linear(value, shapes, contrib_only)
            if reason:
                skipped.append({"tensor": value.name, "reason": reason})
            else:
                targets.append(target)
        return targets, skipped

    def _embedding(self, value: ir.Value, contrib_only: bool) -> tuple[str | None, _Target | None]:
        config: Int4Config = self.config
        if config.embeddings == "keep":
            return "Gather table and embeddings: keep", None
        if any(_int_attr(u.node, "axis") % 2 != 0 for u in value.uses()):
            return "Gather along axis 1: per-row scales need axis 0", None
        bits = 4 if config.embeddings == "int4" else 8
        row = value.const_value.shape[1]
        block = min(config.embedding_block_size or row, row)
        form = "gather" if bits == 4 and contrib_only else "folded"
        forms = {id(u.node): form for u in value.uses()}
        return None, _Target(value, "embedding", "out_in", bits, block, forms)

    def _linear(self, value: ir.Value, shapes, contrib_only: bool) -> tuple[str | None, _Target | None]:
        config: Int4Config = self.config
        layouts = {"out_in" if u.node.op_type == "Gemm" and _int_attr(u.node, "transB") else "in_out"
                   for u in value.uses()}
        if len(layouts) > 1:
            return "shared by Gemm nodes with different transB (two layouts)", None
        layout = layouts.pop()
        forms = {}
        for use in value.uses():
            blocker = _nbits_blocker(use.node)
            if config.format == "folded" and not contrib_only:
                form = "folded"
            elif blocker is None and (config.format == "matmulnbits" or contrib_only):
                form = "matmulnbits"
            elif blocker is None and _nbits_pays(use.node, shapes, value.const_value.shape):
                form = "matmulnbits"
            elif contrib_only:
                return f"{blocker}, and the folded int4 form needs opset {INT4_OPSET}", None
            else:
                form = "folded"
            forms[id(use.node)] = form
        return None, _Target(value, "linear", layout, config.bits, config.block_size, forms)

    # ----------------------------------------------------------------------- solving

    def _solve(self, model: ir.Model, targets: list[_Target]) -> list[dict[str, str]]:
        """Quantize every target (``target.result``); GPTQ where the layer's inputs can be captured."""
        config: Int4Config = self.config
        fallback: list[dict[str, str]] = []
        solvable: list = []
        if config.method == "gptq":
            linear = {id(t.value): t for t in targets if t.kind == "linear"}
            layers, rest = linear_layers(model, [t.value for t in linear.values()])
            solvable = [(layer, linear[id(layer.weight)]) for layer in layers]
            for value, reason in rest:
                fallback.append({"tensor": value.name, "reason": f"{reason}: rounded to nearest instead"})
        by_layer = {id(t): layer for layer, t in solvable}
        for target in targets:
            if id(target) not in by_layer:
                weights = target.value.const_value.numpy()
                target.result = rtn_quantize(weights, bits=target.bits, block_size=target.block,
                                             symmetric=config.symmetric, layout=target.layout)
        rounds = plan_rounds([layer for layer, _ in solvable], config.rounds)
        done = 0
        for index, group in enumerate(rounds):
            stats = {key: Gram(key[1]) for layer in group for key in layer.inputs}
            capture(model, [(name, r) for (name, _), r in stats.items()], self.context.calibration, threads=self.context.threads, progress=self.context.progress)
            for layer in group:
                self.context.progress("int4: GPTQ", done, len(solvable))
                target = next(t for lay, t in solvable if lay is layer)
                self._gptq(target, sum(stats[key].hessian for key in layer.inputs), last=index == len(rounds) - 1)
                done += 1
        return fallback

    def _gptq(self, target: _Target, hessian: np.ndarray, last: bool) -> None:
        config: Int4Config = self.config
        weights = target.value.const_value.numpy()
        options = dict(bits=target.bits, block_size=target.block, symmetric=config.symmetric, layout=target.layout)
        target.result = gptq_quantize(weights, hessian, damp=config.damp, act_order=config.act_order, **options)
        target.method = "gptq"
        rtn = rtn_quantize(weights, **options)
        errors = {"output_error": output_error(weights, target.result, target.block, hessian, layout=target.layout),
                  "rtn_output_error": output_error(weights, rtn, target.block, hessian, layout=target.layout)}
        target.errors = {k: round(v, 6) for k, v in errors.items()}
        if not last:  # later capture rounds run the model with this layer already quantized
            restored = dequantize_blocks(target.result, target.block, layout=target.layout)
            target.value.const_value = ir.Tensor(restored.astype(weights.dtype), name=target.value.name)


def _nbits_pays(node: ir.Node, shapes: dict[str, tuple[int, ...]], weight_shape) -> bool:
    """``format: auto``: MatMulNBits for matrix-vector-like runs (see the table above)."""
    x = node.inputs[0]
    shape = shapes.get(x.name) if x is not None else None
    if not shape:
        return False
    rows = int(np.prod(shape[:-1]))
    k_times_n = int(np.prod(weight_shape))
    return rows <= NBITS_ROWS or (rows <= NBITS_WIDE_ROWS and k_times_n >= NBITS_WIDE_WEIGHTS)


def _nbits_blocker(node: ir.Node) -> str | None:
    """Why a consumer cannot become MatMulNBits, or None."""
    if node.op_type != "Gemm":
        return None
    if _int_attr(node, "transA"):
        return "Gemm with transA=1 (MatMulNBits takes A as it is)"
    c = node.inputs[2] if len(node.inputs) > 2 else None
    if c is not None:
        bias = _const(c)
        n = node.outputs[0].shape[-1] if node.outputs[0].shape is not None else None
        if bias is None or (bias.ndim == 2 and bias.shape[0] != 1) or bias.ndim > 2:
            return "Gemm whose C is not a constant row vector (MatMulNBits adds a bias [N])"
        if n is not None and isinstance(n, int) and bias.size not in (1, n):
            return "Gemm whose C does not match N"
    return None


# --------------------------------------------------------------------------- graph edits


def _int_dtype(bits: int, signed: bool):
    import ml_dtypes  # an onnx-ir dependency: numpy's dtypes for packed 4-bit values

    return {(4, True): ml_dtypes.int4, (4, False): ml_dtypes.uint4, (8, True): np.int8, (8, False): np.uint8}[(bits, signed)]


def _emit(model: ir.Model, target: _Target, config: Int4Config, names: _Names) -> None:
    """Replace ``target``'s float initializer by its quantized form at every consumer."""
    value, graph = target.value, target.value.graph
    folded = nbits = None
    for use in list(value.uses()):
        form = target.forms[id(use.node)]
        if form == "folded":
            if folded is None:
                folded = _folded(graph, target, config, names)
            use.node.replace_input_with(use.idx, folded)
        elif form == "matmulnbits":
            nbits = nbits or _nbits_inputs(graph, target, config, names)
            _to_matmulnbits(use.node, nbits, target, config, names)
        else:
            _to_gather_block(use.node, target, config, names)
    graph.initializers.pop(value.name)
    if folded is not None:
        folded.name = value.name  # the graph reads as before: W = Cast(Wq) * scale
    if any(f != "folded" for f in target.forms.values()):
        model.opset_imports["com.microsoft"] = 1
    if target.bits == 4 and "folded" in target.forms.values():
        model.ir_version = max(model.ir_version or 0, INT4_IR_VERSION)


def _folded(graph: ir.Graph, target: _Target, config: Int4Config, names: _Names) -> ir.Value:
    """``Cast(q) [- Cast(zero point)] * scale``, blocks reshaped out and back: constants only, so ORT
    folds the chain at session load and the consumer runs its fp32 kernel."""
    q, scales, zeros = target.result
    axis = 0 if target.layout == "in_out" else 1
    rows, cols = q.shape
    blocks, size = scales.shape[axis], target.block
    dtype = target.value.const_value.dtype
    half = 1 << (target.bits - 1)
    stored = q.astype(np.int16) - half if config.symmetric else q
    if blocks > 1:
        padding = [(0, 0), (0, 0)]
        padding[axis] = (0, blocks * size - q.shape[axis])
        stored = np.pad(stored, padding)
        stored = stored.reshape((blocks, size, cols) if axis == 0 else (rows, blocks, size))
    param_shape = (blocks, 1, cols) if axis == 0 else (rows, blocks, 1)
    if blocks == 1:
        param_shape = (1, cols) if axis == 0 else (rows, 1)
    int_type = _int_dtype(target.bits, config.symmetric)
    base = target.value.name
    head = []

    def node(op, inputs, suffix, **attrs):
        made = ir.node(op, inputs, attrs)
        made.outputs[0].name = names(f"{base}_{suffix}")
        head.append(made)
        return made.outputs[0]

    q_value = _initializer(graph, names(f"{base}_q{target.bits}"), stored.astype(int_type))
    x = node("Cast", [q_value], "cast", to=dtype)
    if not config.symmetric:
        zero = _initializer(graph, names(f"{base}_zp"), zeros.reshape(param_shape).astype(int_type))
        x = node("Sub", [x, node("Cast", [zero], "zp_cast", to=dtype)], "centred")
    scale = _initializer(graph, names(f"{base}_scale"), scales.reshape(param_shape).astype(dtype.numpy()))
    x = node("Mul", [x, scale], "dequantized")
    if blocks > 1:
        flat = (blocks * size, cols) if axis == 0 else (rows, blocks * size)
        x = node("Reshape", [x, _initializer(graph, names(f"{base}_shape"), np.array(flat, np.int64))], "blocks")
        if flat != q.shape:
            ends = _initializer(graph, names(f"{base}_ends"), np.array(q.shape, np.int64))
            starts = _initializer(graph, names(f"{base}_starts"), np.zeros(2, np.int64))
            x = node("Slice", [x, starts, ends], "unpadded")
    first = next(iter(graph), None)
    graph.insert_before(first, head) if first is not None else graph.extend(head)
    return x


def _nbits_inputs(graph: ir.Graph, target: _Target, config: Int4Config, names: _Names) -> dict[str, Any]:
    """MatMulNBits' packed B [N, k_blocks, blob], scales [N, k_blocks] and packed zero points."""
    q, scales, zeros = target.result
    if target.layout == "in_out":
        q, scales, zeros = q.T, scales.T, zeros.T
    n, k = q.shape
    blocks, size = scales.shape[1], target.block
    padded = np.full((n, blocks * size), 1 << (target.bits - 1), np.uint8)
    padded[:, :k] = q
    base = target.value.name
    found = {
        "K": k, "N": n,
        "B": _initializer(graph, names(f"{base}_nbits"), pack_bits(padded.reshape(n, blocks, size), target.bits)),
        "scales": scales.astype(target.value.const_value.dtype.numpy()),
        "zero_points": None,
    }
    if not config.symmetric:
        found["zero_points"] = _initializer(graph, names(f"{base}_nbits_zp"), pack_bits(zeros, target.bits))
    return found


def _to_matmulnbits(node: ir.Node, nbits: dict[str, Any], target: _Target, config: Int4Config, names: _Names) -> None:
    graph, base = node.graph, node.name or node.op_type
    scales, bias, c = nbits["scales"], None, None
    alpha = _float_attr(node, "alpha") if node.op_type == "Gemm" else 1.0
    if alpha != 1.0:
        scale = _initializer(graph, names(f"{base}_alpha_scale"), (scales * alpha).astype(scales.dtype))
    else:
        if "scale" not in nbits:  # shared by every plain use of the weight
            nbits["scale"] = _initializer(graph, names(f"{target.value.name}_nbits_scale"), scales)
        scale = nbits["scale"]
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        c = node.inputs[2]
        row = _const(c).reshape(-1) * np.float32(_float_attr(node, "beta"))
        bias = _initializer(graph, names(f"{base}_bias"), np.broadcast_to(row, (nbits["N"],)).astype(scales.dtype))
    inputs = [node.inputs[0], nbits["B"], scale, nbits["zero_points"], None, bias]
    while inputs[-1] is None:
        inputs.pop()
    attrs = {"K": nbits["K"], "N": nbits["N"], "bits": target.bits, "block_size": target.block,
             "accuracy_level": config.accuracy_level}
    new = ir.node("MatMulNBits", inputs, attrs, domain="com.microsoft")
    graph.insert_before(node, new)
    _replace_output(node, new.outputs[0])
    if c is not None and c.is_initializer() and not c.uses() and not c.is_graph_output() and c.name in graph.initializers:
        graph.initializers.pop(c.name)  # the Gemm's C now lives in the bias


def _to_gather_block(node: ir.Node, target: _Target, config: Int4Config, names: _Names) -> None:
    """An int4 table as ``com.microsoft.GatherBlockQuantized`` (uint8-packed rows)."""
    q, scales, zeros = target.result
    graph, base = node.graph, target.value.name
    block = target.block if scales.shape[1] > 1 else max(16, 1 << (q.shape[1] - 1).bit_length())
    inputs = [_initializer(graph, names(f"{base}_q4"), pack_bits(q, 4)), node.inputs[1],
              _initializer(graph, names(f"{base}_scale"), scales.astype(target.value.const_value.dtype.numpy()))]
    if not config.symmetric:
        inputs.append(_initializer(graph, names(f"{base}_zp"), pack_bits(zeros, 4)))
    attrs = {"bits": 4, "block_size": block, "gather_axis": 0, "quantize_axis": 1}
    new = ir.node("GatherBlockQuantized", inputs, attrs, domain="com.microsoft")
    graph.insert_before(node, new)
    _replace_output(node, new.outputs[0])
