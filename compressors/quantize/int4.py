"""Weight-only int4 (or int8) block quantization: MatMul / Gemm weights by GPTQ or round-to-nearest,
Gather embedding tables per row.

before: a float32 / float16 model — MatMul / Gemm weights and Gather tables, in the main graph or in
If/Loop/Scan bodies — and, for ``method: gptq``, calibration feeds.
after:  each selected matrix stored as ``bits``-bit integers in blocks of ``block_size`` inputs (a
scale, and unless symmetric a zero point, per block and output), in one of two forms per consumer:

* ``matmulnbits`` — ``com.microsoft.MatMulNBits`` (B packed [N, k_blocks, blob] with K padded to
  whole blocks, scales [N, k_blocks], packed zero points; a Gemm's alpha goes into the scales and
  beta·C into the bias): 4-bit in memory, dequantized on the fly by the kernel.
* ``folded`` — ``Cast(int4) [- zero point] * scale -> Reshape`` on constants only: ORT folds it at
  session load and the consumer runs the input model's fp32 kernel, while the file keeps 4 bits per
  weight. Cast from INT4 needs opset 21: the model is upgraded with ONNX's version converter; when
  that fails, every consumer that can be MatMulNBits is, and int4 tables use GatherBlockQuantized.

Why both, measured here (ORT 1.32 CPU, AVX512-VNNI; µs, 1 thread, median of 21 interleaved rounds;
block 32). ``DequantizeLinear(int4, block_size) -> MatMul`` is fused by ORT into this very
MatMulNBits (accuracy level 4): it timed the same, so it is not emitted.

    [M,K]x[K,N]     fp32   NBits acc0   NBits acc4   DQ(int4)->MatMul   folded
    1x128x256       12.3         -         13.5             -             12.2
    1x384x384       12.2      19.2         10.2          10.2             12.2
    8x384x384       24.2      61.7         32.7          32.2             25.0
    128x384x384    234.3     275.1        397.7         396.7            236.7
    1x384x1536      72.7      60.1         20.5          20.4             70.7
    8x384x1536     129.5     233.5        103.2         100.6            129.7
    32x384x1536    288.3     396.5        376.7         364.9            289.7
    128x384x1536  1012.3    1116.1       1500.6        1487.8           1018.3
    128x1536x384  1024.0    1136.4       1515.7        1514.8           1035.7

MatMulNBits wins on matrix-vector products (a token at a time) of weights from ~2^17 elements and
loses from ~32 rows on, where fp32 GEMM is fast; accuracy level 4 (int8 compute) beats 0 wherever
it wins. ``format: auto`` places MatMulNBits where the rows of one run on the latency feed (one
sample of the first calibration feed, as the benchmark times it) and the weight size fit the
``NBITS_*`` rule fitted to this table, and the folded form elsewhere or when the rows are unknown:
never slower than the input model.

Tables (``embeddings: int8 | int4``) get a scale and zero point per row (or per
``embedding_block_size`` block of a row), folded: a 128-token Gather took 20 µs as fp32 or folded,
165 µs as GatherBlockQuantized (uint8-packed; 1200 µs with an INT4 table).

GPTQ solves layers in capture ``rounds`` (as the SparseGPT pass does) from Hessians that leave out
padding positions (``padding_mask``). Weights it cannot reach (subgraphs, two layouts) are rounded
to nearest (``fallback``, with the reason). Per tensor the stats give the method, forms, bytes
before / after and, with a Hessian, the relative layer output error ``||X(W - Ŵ)||² / ||XW||²`` of
GPTQ and of round-to-nearest.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field, field_validator

from modelpress.compressors import synthetic
from modelpress.compressors.calibration import Gram, capture, linear_layers, plan_rounds
from modelpress.compressors.errors import InputError
from modelpress.compressors.model import ensure_opset, opset_version
from modelpress.compressors.model_inputs import model_inputs
from modelpress.compressors.pipeline import Pass, PassResult
from modelpress.compressors.quantize.graph_edits import (
    Names, const, float_attr, initializer, initializer_bytes, int_attr, replace_output)
from modelpress.compressors.quantize.ort_probe import inferred_shapes, latency_feed
from modelpress.compressors.selection import WeightFilterConfig, select_weights
from modelpress.kernels import gptq as kernel
from modelpress.kernels.quant import pack_bits

# Cast from INT4 / UINT4 needs opset 21, and INT4 tensors IR version 10.
INT4_OPSET = 21
INT4_IR_VERSION = 10
# format: auto — MatMulNBits where one run multiplies at most NBITS_ROWS rows by a weight of at
# least NBITS_MIN_WEIGHTS elements, or at most NBITS_WIDE_ROWS rows by one of NBITS_WIDE_WEIGHTS.
NBITS_ROWS, NBITS_MIN_WEIGHTS = 1, 1 << 17
NBITS_WIDE_ROWS, NBITS_WIDE_WEIGHTS = 8, 1 << 19
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
# rounds: auto — the float64 Hessians held at once (one per distinct layer input of a round).
HESSIAN_BUDGET = 1 << 30
# Activations captured per ORT run (calibration.capture): a small transformer's all in one run.
CAPTURE_GROUP = 32


def _power_of_two(value: int | None) -> int | None:
    if value is not None and (value < 16 or value & (value - 1)):
        raise ValueError(f"must be a power of two >= 16 (MatMulNBits / GatherBlockQuantized), got {value}")
    return value


class Int4Config(WeightFilterConfig):
    method: Literal["gptq", "rtn"] = Field(
        "gptq", description="gptq: Hessian-based error compensation from --data; rtn: round to nearest")
    bits: Literal[4, 8] = 4
    block_size: int = Field(32, description="inputs per scale and zero point (a power of two >= 16)")
    symmetric: bool = Field(False, description="no zero points (asymmetric measured more accurate at 4 bits "
                            "for ~2 % more bytes)")
    damp: float = Field(0.01, gt=0.0, lt=1.0, description="GPTQ Hessian damping, a fraction of its mean diagonal")
    act_order: bool = Field(True, description="GPTQ: quantize inputs by decreasing Hessian diagonal")
    scale_search: bool = Field(True, description="per block, also try ranges shrunk by up to 25 % and keep "
                               "the least rounding error (helps round-to-nearest, costs GPTQ nothing)")
    padding_mask: str | None = Field(
        "attention_mask", description="model input whose zeros mark padding: those positions are left out "
        "of the GPTQ statistics (when the feeds have it and its shape matches the layer input's rows)")
    rounds: Literal["auto", "sequential"] | Annotated[int, Field(ge=1)] = Field(
        "auto", description="GPTQ capture runs: auto = as few as keep a run's Hessians within "
        "HESSIAN_BUDGET; sequential = each layer sees the layers before it quantized")
    format: Literal["auto", "matmulnbits", "folded"] = Field(
        "auto", description="auto: MatMulNBits where it runs faster than fp32 (few rows per run), else folded")
    accuracy_level: Literal[0, 1, 4] = Field(4, description="MatMulNBits: 4 = int8 compute (measured fastest)")
    embeddings: Literal["int8", "int4", "keep"] = Field("int8", description="Gather tables, one scale per row")
    embedding_block_size: int | None = Field(None, description="a scale per block of a row instead")

    _check_blocks = field_validator("block_size", "embedding_block_size")(lambda cls, v: _power_of_two(v))


@dataclass
class _Target:
    value: ir.Value
    kind: str  # "linear" | "embedding"
    layout: str  # blocks run along the input axis: "in_out" [K, N], "out_in" [N, K] (table rows)
    bits: int
    block: int
    forms: dict[int, str]  # id(consumer node) -> "matmulnbits" | "folded" | "gather"
    method: str = "rtn"
    figures: dict[str, Any] = field(default_factory=dict)
    result: kernel.BlockQuantized | None = None


class Int4Quantize(Pass):
    name = "int4"
    stage = "quantize"
    config_cls = Int4Config
    summary = "weight-only int4 (GPTQ or round-to-nearest) for MatMul/Gemm, int8/int4 embeddings"
    # The default method calibrates, so the CLI asks for --data rather than synthesizing inputs.
    needs_calibration = True

    @classmethod
    def calibrates(cls, config: Int4Config) -> bool:
        return config.method == "gptq"  # round-to-nearest needs no inputs

    def call(self, model: ir.Model) -> PassResult:
        config: Int4Config = self.config
        feeds = self.context.calibration
        if config.method == "gptq" and not feeds:
            raise ValueError("the int4 pass with method: gptq needs calibration data: run with --data "
                             "(an .npz of model inputs), or set method: rtn")
        notes: list[str] = []
        bytes_before = initializer_bytes(model)
        shapes = self._shapes(model, feeds, notes)
        targets, skipped = self._select(model, shapes, contrib_only=False)
        if opset_version(model) < INT4_OPSET and any(
            t.bits == 4 and "folded" in t.forms.values() for t in targets
        ):
            before = opset_version(model)
            try:
                model = ensure_opset(model, INT4_OPSET)
                notes.append(f"opset upgraded {before} -> {INT4_OPSET} for Cast from int4")
                contrib_only = False
            except InputError as exc:
                notes.append(f"no folded int4 form ({exc}); MatMulNBits / GatherBlockQuantized instead")
                contrib_only = True
            targets, skipped = self._select(model, shapes, contrib_only)  # values of the new model
        fallback = self._solve(model, targets)
        names = Names(model)
        for target in targets:
            _emit(model, target, config, names)
        bytes_after = initializer_bytes(model)
        solved = [t.figures for t in targets if "rtn_output_error" in t.figures]
        stats: dict[str, Any] = {
            "method": config.method, "bits": config.bits, "block_size": config.block_size,
            "tensors_quantized": len(targets),
            "forms": dict(Counter(f for t in targets for f in t.forms.values())),
            "bytes_before": bytes_before, "bytes_after": bytes_after,
            "size_ratio": round(bytes_before / bytes_after, 3) if bytes_after else None,
            "opset": opset_version(model),
        }
        if solved:
            for key in ("output_error", "rtn_output_error"):
                stats[f"mean_{key}"] = round(float(np.mean([f[key] for f in solved])), 6)
        stats["per_tensor"] = {t.value.name: {"kind": t.kind, "method": t.method, "bits": t.bits,
                                              "forms": "+".join(sorted(set(t.forms.values()))), **t.figures}
                               for t in targets}
        stats.update(fallback=fallback, skipped=skipped, notes=notes)
        return PassResult(model, modified=bool(targets), stats=stats)

    # ----------------------------------------------------------------------- placement

    def _shapes(self, model: ir.Model, feeds, notes: list[str]) -> dict[str, tuple[int, ...]]:
        """Activation shapes on the latency feed (one sample), for ``format: auto``."""
        if self.config.format != "auto":
            return {}
        proto = ir.to_proto(model)
        if not feeds:
            try:
                feeds = synthetic.synthesize(model_inputs(proto), samples=1, seed=self.context.seed).feeds
            except InputError as exc:
                notes.append(f"activation shapes unknown ({exc}): every weight folded")
                return {}
        return inferred_shapes(proto, latency_feed(model, feeds[0]))

    def _select(self, model: ir.Model, shapes, contrib_only: bool) -> tuple[list[_Target], list[dict[str, str]]]:
        """The tensors to quantize with each consumer's form, and every float matrix left alone."""
        chosen, skipped = select_weights(model, {"MatMul", "Gemm", "Gather"}, self.config)
        targets = []
        for value in chosen:
            ops = {u.node.op_type for u in value.uses()}
            tensor = value.const_value
            if tensor.dtype not in FLOAT_TYPES:
                reason = f"{tensor.dtype} weights: MatMulNBits takes float32 / float16 only"
            elif len(tensor.shape) != 2:
                reason = f"rank-{len(tensor.shape)} weight (blocks here are 2-D)"
            elif ops == {"Gather"}:
                reason = self._embedding(value, contrib_only, targets)
            elif "Gather" in ops:
                reason = "used by a Gather and by a MatMul/Gemm (tied weights)"
            else:
                reason = self._linear(value, shapes, contrib_only and self.config.bits == 4, targets)
            if reason:
                skipped.append({"tensor": value.name, "reason": reason})
        return targets, skipped

    def _embedding(self, value: ir.Value, contrib_only: bool, targets: list[_Target]) -> str | None:
        config: Int4Config = self.config
        if config.embeddings == "keep":
            return "Gather table, and embeddings: keep"
        if any(int_attr(u.node, "axis") % 2 for u in value.uses()):
            return "Gather along axis 1 (per-row scales need axis 0)"
        bits, row = (4 if config.embeddings == "int4" else 8), value.const_value.shape[1]
        form = "gather" if bits == 4 and contrib_only else "folded"
        block = min(config.embedding_block_size or row, row)
        targets.append(_Target(value, "embedding", "out_in", bits, block, {id(u.node): form for u in value.uses()}))
        return None

    def _linear(self, value: ir.Value, shapes, contrib_only: bool, targets: list[_Target]) -> str | None:
        config: Int4Config = self.config
        layouts = {"out_in" if int_attr(u.node, "transB") else "in_out" for u in value.uses()}
        if len(layouts) > 1:
            return "shared by Gemm nodes with different transB (two layouts)"
        forms = {}
        for use in value.uses():
            blocker = _nbits_blocker(use.node)
            if blocker is None and (contrib_only or config.format == "matmulnbits" or (
                    config.format == "auto" and _nbits_pays(use.node, shapes, value.const_value.shape))):
                forms[id(use.node)] = "matmulnbits"
            elif contrib_only:
                return f"{blocker}, and the folded int4 form needs opset {INT4_OPSET}"
            else:
                forms[id(use.node)] = "folded"
        targets.append(_Target(value, "linear", layouts.pop(), config.bits, config.block_size, forms))
        return None

    # ----------------------------------------------------------------------- solving

    def _solve(self, model: ir.Model, targets: list[_Target]) -> list[dict[str, str]]:
        """Quantize every target (``target.result``): GPTQ where the layer's inputs can be captured."""
        config: Int4Config = self.config
        fallback, solvable = [], {}
        if config.method == "gptq":
            linear = {id(t.value): t for t in targets if t.kind == "linear"}
            layers, rest = linear_layers(model, [t.value for t in linear.values()])
            solvable = {id(layer): linear[id(layer.weight)] for layer in layers}
            fallback = [{"tensor": v.name, "reason": f"{why}: rounded to nearest instead"} for v, why in rest]
        options = dict(symmetric=config.symmetric, search=config.scale_search)
        solved = {id(t) for t in solvable.values()}
        for target in (t for t in targets if id(t) not in solved):
            target.result = kernel.rtn_quantize(target.value.const_value.numpy(), bits=target.bits,
                                                    block_size=target.block, layout=target.layout, **options)
        if not solvable:
            return fallback
        rounds = plan_rounds(layers, _round_count(layers, config.rounds))
        feeds = self.context.calibration
        masks = [feed.get(config.padding_mask) if config.padding_mask else None for feed in feeds]
        done = 0
        for index, group in enumerate(rounds):
            stats = {key: _MaskedGram(key[1], masks=masks) for layer in group for key in layer.inputs}
            capture(model, [(name, r) for (name, _), r in stats.items()], feeds, values_per_run=CAPTURE_GROUP,
                    threads=self.context.threads, progress=self.context.progress)
            factored: dict[tuple, tuple] = {}  # Q, K and V read one input: factor its Hessian once
            for layer in group:
                self.context.progress("int4: GPTQ", done, len(solvable))
                key = tuple(sorted(layer.inputs))
                if key not in factored:
                    hessian = sum(stats[k].hessian for k in layer.inputs)
                    factored[key] = (hessian, kernel.prepare_hessian(hessian, config.damp, config.act_order))
                target = solvable[id(layer)]
                weights = target.value.const_value.numpy()
                shape = dict(bits=target.bits, block_size=target.block, layout=target.layout)
                target.result = kernel.gptq_quantize(weights, factored[key][1], **shape, **options)
                target.method = "gptq"
                rtn = kernel.rtn_quantize(weights, **shape, **options)
                for label, result in (("output_error", target.result), ("rtn_output_error", rtn)):
                    error = kernel.output_error(weights, result, target.block, factored[key][0], layout=target.layout)
                    target.figures[label] = round(error, 6)
                if index < len(rounds) - 1:  # later rounds capture with this layer already quantized
                    restored = kernel.dequantize_blocks(target.result, target.block, layout=target.layout)
                    target.value.const_value = ir.Tensor(restored.astype(weights.dtype), name=target.value.name)
                done += 1
        return fallback


@dataclass
class _MaskedGram(Gram):
    """``X^T X`` over the rows of real positions only: in a padded batch of sentences the padding
    (mask 0) can outnumber the real tokens and would tune the layer to it (measured on MiniLM:
    embedding cosine 0.9927 with padding rows, 0.9951 without)."""

    masks: list = field(default_factory=list)
    seen: int = 0

    def update(self, batch: np.ndarray) -> None:
        mask = self.masks[self.seen] if self.seen < len(self.masks) else None
        self.seen += 1  # capture() folds each value once per feed, in feed order
        batch = np.asarray(batch)
        if mask is not None and not self.transposed and batch.ndim >= 2 and np.prod(batch.shape[:-1]) == np.size(mask):
            batch = batch.reshape(-1, batch.shape[-1])[np.asarray(mask).reshape(-1) != 0]
        super().update(batch)


def _round_count(layers, rounds) -> int | str:
    """``rounds: auto``: the fewest capture rounds whose Hessians stay within HESSIAN_BUDGET."""
    if rounds != "auto":
        return rounds
    inputs = {key: layer.weight.const_value.shape[layer.in_axis] for layer in layers for key in layer.inputs}
    return max(1, -(-sum(8 * k * k for k in inputs.values()) // HESSIAN_BUDGET))


def _nbits_pays(node: ir.Node, shapes: dict[str, tuple[int, ...]], weight_shape) -> bool:
    """``format: auto``: MatMulNBits for matrix-vector-like runs (see the table above)."""
    shape = shapes.get(node.inputs[0].name) if node.inputs[0] is not None else None
    if not shape:
        return False
    rows, size = int(np.prod(shape[:-1])), int(np.prod(weight_shape))
    return (rows <= NBITS_ROWS and size >= NBITS_MIN_WEIGHTS) or (rows <= NBITS_WIDE_ROWS and size >= NBITS_WIDE_WEIGHTS)


def _nbits_blocker(node: ir.Node) -> str | None:
    """Why a consumer cannot become MatMulNBits, or None."""
    if node.op_type != "Gemm":
        return None
    if int_attr(node, "transA"):
        return "Gemm with transA=1 (MatMulNBits takes A as it is)"
    c = node.inputs[2] if len(node.inputs) > 2 else None
    bias = const(c) if c is not None else np.zeros(1)
    n = node.outputs[0].shape[-1] if node.outputs[0].shape is not None else None
    if bias is None or bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1) or (
            isinstance(n, int) and bias.size not in (1, n)):
        return "Gemm whose C is not a constant row (MatMulNBits adds a bias [N])"
    return None


# --------------------------------------------------------------------------- graph edits


def _emit(model: ir.Model, target: _Target, config: Int4Config, names: Names) -> None:
    """Replace ``target``'s float initializer by its quantized form at every consumer."""
    value, graph = target.value, target.value.graph
    made: list[ir.Value] = []

    def add(suffix: str, array: np.ndarray, graph: ir.Graph = graph) -> ir.Value:
        made.append(initializer(graph, names(f"{value.name}_{suffix}"), array))
        return made[-1]

    folded, nbits = None, {}
    for use in list(value.uses()):
        form = target.forms[id(use.node)]
        if form == "folded":
            folded = _folded(target, config, add, names) if folded is None else folded
            use.node.replace_input_with(use.idx, folded)
        elif form == "matmulnbits":
            _to_matmulnbits(use.node, nbits, target, config, add)
        else:
            _to_gather_block(use.node, target, config, add)
    target.figures.update(bytes_before=value.const_value.nbytes,
                          bytes_after=sum(v.const_value.nbytes for v in made if v.uses()))
    graph.initializers.pop(value.name)
    if folded is not None:
        folded.name = value.name  # the graph reads as before: W = Cast(Wq) * scale
    if any(f != "folded" for f in target.forms.values()):
        model.opset_imports["com.microsoft"] = 1
    if target.bits == 4 and "folded" in target.forms.values():
        model.ir_version = max(model.ir_version or 0, INT4_IR_VERSION)


def _folded(target: _Target, config: Int4Config, add, names: Names) -> ir.Value:
    """``Cast(q) [- Cast(zero point)] * scale`` [-> Reshape -> Slice], constants only: ORT folds it
    when the session loads, so the consumer runs its fp32 kernel."""
    q, scale, zero = kernel.folded_arrays(target.result, target.block, target.bits, config.symmetric,
                                          layout=target.layout)
    dtype, shape = target.value.const_value.dtype, tuple(target.value.const_value.shape)
    graph, head = target.value.graph, []

    def node(op: str, inputs: list, suffix: str, **attrs) -> ir.Value:
        head.append(ir.node(op, inputs, attrs))
        head[-1].outputs[0].name = names(f"{target.value.name}_{suffix}")
        return head[-1].outputs[0]

    x = node("Cast", [add(f"q{target.bits}", q)], "cast", to=dtype)
    if zero is not None:
        x = node("Sub", [x, node("Cast", [add("zp", zero)], "zp_cast", to=dtype)], "centred")
    x = node("Mul", [x, add("scale", scale.astype(dtype.numpy()))], "dequantized")
    if q.ndim == 3:
        padded = (q.shape[0] * q.shape[1], q.shape[2]) if target.layout == "in_out" else (q.shape[0], q.shape[1] * q.shape[2])
        x = node("Reshape", [x, add("shape", np.array(padded, np.int64))], "blocks")
        if padded != shape:
            x = node("Slice", [x, add("starts", np.zeros(2, np.int64)), add("ends", np.array(shape, np.int64))], "unpadded")
    first = next(iter(graph), None)
    graph.insert_before(first, head) if first is not None else graph.extend(head)
    return x


def _to_matmulnbits(node: ir.Node, nbits: dict, target: _Target, config: Int4Config, add) -> None:
    """MatMul / Gemm -> MatMulNBits(A, B, scales[, zero points][, bias]); a weight's B, scales and
    zero points are shared by all its consumers (``nbits``)."""
    if not nbits:
        b, scales, zeros = kernel.matmulnbits_arrays(target.result, target.block, target.bits, layout=target.layout)
        nbits.update(B=add("nbits", b), scales=scales.astype(target.value.const_value.dtype.numpy()),
                     zeros=None if config.symmetric else add("nbits_zp", zeros), N=b.shape[0])
    graph, bias, c = node.graph, None, None
    alpha = float_attr(node, "alpha") if node.op_type == "Gemm" else 1.0
    if alpha != 1.0:
        scale = add("alpha_scale", (nbits["scales"] * alpha).astype(nbits["scales"].dtype), graph)
    else:
        if "scale" not in nbits:
            nbits["scale"] = add("nbits_scale", nbits["scales"])
        scale = nbits["scale"]
    if node.op_type == "Gemm":
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = node.inputs[2]
            row = const(c).reshape(-1) * np.float32(float_attr(node, "beta"))
            bias = add("bias", np.broadcast_to(row, (nbits["N"],)).astype(nbits["scales"].dtype), graph)
    inputs = [node.inputs[0], nbits["B"], scale, nbits["zeros"], None, bias]
    while inputs[-1] is None:
        inputs.pop()
    k = target.value.const_value.shape[0 if target.layout == "in_out" else 1]
    attrs = {"K": k, "N": nbits["N"], "bits": target.bits, "block_size": target.block,
             "accuracy_level": config.accuracy_level}
    new = ir.node("MatMulNBits", inputs, attrs, domain="com.microsoft")
    graph.insert_before(node, new)
    replace_output(node, new.outputs[0])
    if c is not None and c.is_initializer() and not c.uses() and not c.is_graph_output():
        c.graph.initializers.pop(c.name)  # the Gemm's C now lives in the bias


def _to_gather_block(node: ir.Node, target: _Target, config: Int4Config, add) -> None:
    """An int4 table as ``com.microsoft.GatherBlockQuantized`` (uint8-packed rows)."""
    q, scales, zeros = target.result
    block = target.block if scales.shape[1] > 1 else max(16, 1 << (q.shape[1] - 1).bit_length())
    inputs = [add("q4", pack_bits(q, 4)), node.inputs[1], add("scale", scales.astype(target.value.const_value.dtype.numpy()))]
    if not config.symmetric:
        inputs.append(add("zp", pack_bits(zeros, 4)))
    attrs = {"bits": 4, "block_size": block, "gather_axis": 0, "quantize_axis": 1}
    new = ir.node("GatherBlockQuantized", inputs, attrs, domain="com.microsoft")
    node.graph.insert_before(node, new)
    replace_output(node, new.outputs[0])
