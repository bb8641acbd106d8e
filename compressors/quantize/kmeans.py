"""k-means weight sharing (Deep Compression, Han et al. 2016).

before: float weight initializers of MatMul / Gemm / Conv / ConvTranspose, Gather embedding tables
and the W, R of LSTM / GRU / RNN, in the main graph or in If/Loop/Scan subgraphs, possibly pruned (exact zeros).
after:  each such weight ``W`` becomes two initializers — ``W_kmeans_idx`` (uint8, or packed uint4 when
bits <= 4) and ``W_kmeans_codebook`` (2^bits values, one codebook per channel group) — plus the
lookup ``Cast(idx -> int32) [-> Add(group offsets)] -> Gather(codebook)``, whose output takes the
name ``W`` and feeds the original consumers. Pruned zeros keep a dedicated, exact 0.0 entry (index 0).
With ``vectors: true`` the float vectors around them (Gemm/Conv biases, normalization parameters
and running statistics) are shared the same way: on a pruned, clustered model they are a large
share of what is left. With ``min_bits`` each tensor gets the fewest bits in [min_bits, bits]
whose clustering error stays under ``max_relative_error`` (MSE over the mean square of the
tensor's nonzero values), so large, redundant matrices get few bits and sensitive ones more.
With ``vector_size: d`` > 1 (product quantization) each codebook entry is a sub-vector of d
consecutive weights along the last axis: ``Gather`` yields [..., n/d, d] and a ``Reshape`` restores
the weight's shape; at b bits that is b/d bits per weight before entropy coding. Sub-vectors that
are entirely zero keep an exact zero entry; partly pruned ones do not stay exactly sparse.
``scale: channel`` divides each output channel (a table row, a MatMul column) by its RMS before
one codebook is shared, and a ``Mul`` by the channel scales follows the lookup; ``codebook:
uniform`` makes the entries integers times ``step`` (entropy-coded uniform quantization); ``method:
gptq`` rounds MatMul/Gemm weights onto the codebook with GPTQ error compensation from --data.
See ``kmeans_grid.py``: on all-MiniLM-L6-v2 this is what reaches 10x shipped at cosine 0.98.
The Lloyd codebooks themselves (bits, channel groups, sub-vectors) come from ``kmeans_codebooks.py``.

Why this lookup: stock onnxruntime constant-folds the all-initializer Cast -> Gather chain when the
session is created, so inference runs the same fp32 kernels as the original (measured: equal latency;
session creation a few ms longer). A DequantizeLinear-based lookup is never folded — ORT keeps DQ
nodes for its QDQ fusions — and ran ~25x slower on a 1024x1024 MatMul. Cast from UINT4 needs
opset 21; the pass upgrades the model with ONNX's version converter when bits <= 4, and falls back
to uint8 (noted in the stats) when that upgrade fails. ``index_dtype: uint8`` keeps the opset.
After an upgrade ``PassResult.model`` is a new object (the converter rebuilds the model): use it.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field, model_validator

from modelpress.compressors.errors import InputError
from modelpress.compressors.model import (
    EXTERNAL_DATA_THRESHOLD,
    ensure_opset,
    iter_graphs,
    iter_weights,
    opset_version,
)
from modelpress.compressors.pipeline import Pass, PassResult
from modelpress.compressors.quantize import kmeans_grid
from modelpress.compressors.quantize.kmeans_codebooks import channel_axis, choose_bits, group_offsets
from modelpress.compressors.selection import WeightFilterConfig, matches, select_weights

# UINT4 tensors and Cast-21 need IR version 10 and opset 21.
UINT4_OPSET = 21
UINT4_IR_VERSION = 10

_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
OpType = Literal["MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "LSTM", "GRU", "RNN"]


# Float vectors that may be shared when ``vectors`` is on: op type -> input positions.
VECTOR_INPUTS: dict[str, tuple[int, ...]] = {
    "Gemm": (2,), "Conv": (2,), "ConvTranspose": (2,), "BatchNormalization": (1, 2, 3, 4),
    "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2), "Add": (0, 1), "Mul": (0, 1),
}
# Statistics, not parameters: their codebooks are read through an Identity, so the recover pass
# (which trains Gather tables) leaves them frozen — torch's batch_norm refuses running statistics
# that require grad, and training them would not mean anything. ORT folds the Identity away.
STATISTICS_INPUTS: dict[str, tuple[int, ...]] = {"BatchNormalization": (3, 4)}


class KMeansConfig(WeightFilterConfig):
    bits: int = Field(5, ge=2, le=8, description="codebook of 2^bits shared values per tensor (or group); "
                                                  "the most bits any tensor gets when min_bits is set")
    min_bits: int | None = Field(None, ge=1, le=8, description="per-tensor bits: the fewest in [min_bits, bits] "
                                                                "whose error is below max_relative_error")
    max_relative_error: float = Field(0.01, gt=0.0, lt=1.0,
                                      description="with min_bits: MSE / mean square of the nonzero values, per tensor")
    vector_size: int = Field(1, ge=1, le=16, description="product quantization when > 1: each codebook entry is a "
                                                          "sub-vector of this many consecutive weights (last axis)")
    vectors: bool = Field(False, description="also share biases and normalization parameters (1-D float tensors)")
    min_vector_elements: int = Field(16, ge=4, description="smaller vectors are left as they are")
    init: Literal["linear", "density"] = "linear"
    iterations: int = Field(1000, ge=0, le=100_000, description="upper bound; Lloyd stops when stable")
    keep_zero: bool = True
    per_channel_groups: int = Field(1, ge=1, le=4096, description="codebooks per tensor, over output channels")
    index_dtype: Literal["auto", "uint8", "uint4"] = "auto"
    # A codebook costs 2^bits floats, so tiny tensors gain little; small classifier heads still do.
    min_elements: int = Field(256, ge=1, description="smaller tensors are left as they are")
    op_types: tuple[OpType, ...] = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "LSTM", "GRU", "RNN")
    codebook: Literal["kmeans", "uniform"] = Field(
        "kmeans", description="uniform: entries are the integers of a bits-wide grid times step "
        "(entropy-coded uniform quantization: fewer coded bits than Lloyd at the same error)")
    step: float = Field(0.5, gt=0.0, le=4.0, description="codebook: uniform — the grid step over the RMS of "
                                                         "the weights it scales (a channel or the tensor)")
    scale: Literal["tensor", "channel"] = Field(
        "tensor", description="channel: each output channel (table row, MatMul column) divided by its RMS "
        "before sharing one codebook, multiplied back by a Mul that ORT folds at load")
    method: Literal["nearest", "gptq"] = Field(
        "nearest", description="gptq: MatMul/Gemm weights rounded onto the codebook with GPTQ error "
        "compensation on --data (others to nearest)")
    damp: float = Field(0.01, gt=0.0, lt=1.0, description="GPTQ Hessian damping, a fraction of its mean diagonal")
    padding_mask: str | None = Field("attention_mask", description="method: gptq — model input whose zeros "
                                     "mark padding positions, left out of the Hessians")
    rounds: int = Field(1, ge=1, le=1000, description="method: gptq — capture runs; each sees the layers "
                        "before it already rounded (more runs: more accurate, slower)")

    @property
    def on_grid(self) -> bool:
        """Matrices go through kmeans_grid (channel scales, uniform grid or GPTQ)."""
        return self.codebook == "uniform" or self.scale == "channel" or self.method == "gptq"

    @model_validator(mode="after")
    def _uint4_fits(self):
        if self.on_grid and (self.vector_size > 1 or self.per_channel_groups > 1 or self.min_bits is not None):
            raise ValueError("codebook: uniform, scale: channel and method: gptq take one codebook of fixed bits: "
                             "leave vector_size, per_channel_groups and min_bits at their defaults")
        if self.index_dtype == "uint4" and self.bits > 4:
            raise ValueError(f"index_dtype uint4 holds at most 4 bits, but bits is {self.bits}")
        if self.vector_size > 1 and self.per_channel_groups > 1:
            raise ValueError("vector_size > 1 (product quantization) takes one codebook per tensor: "
                             "set per_channel_groups: 1")
        if self.min_bits is not None and self.min_bits > self.bits:
            raise ValueError(f"min_bits ({self.min_bits}) must not exceed bits ({self.bits})")
        return self


class KMeansQuantize(Pass):
    name = "kmeans"
    stage = "quantize"
    config_cls = KMeansConfig
    summary = "k-means weight sharing: 2^b-entry codebooks + uint8/uint4 indices (Deep Compression)"

    @classmethod
    def calibrates(cls, config: KMeansConfig) -> bool:
        return config.method == "gptq"

    def call(self, model: ir.Model) -> PassResult:
        config: KMeansConfig = self.config
        notes: list[str] = []
        candidates, skipped = self._select(model)

        # Under min_bits a tensor may get 4 bits or fewer even when ``bits`` is larger: uint4 is then
        # chosen per tensor (by its own bits), after one upgrade of the model.
        fewest = config.bits if config.min_bits is None else config.min_bits
        use_uint4 = config.index_dtype == "uint4" or (config.index_dtype == "auto" and fewest <= 4)
        if candidates and use_uint4 and opset_version(model) < UINT4_OPSET:
            model, use_uint4 = self._upgrade_for_uint4(model, notes)
            if use_uint4:
                candidates, skipped = self._select(model)  # the upgrade rebuilt the model
        if candidates and use_uint4:
            model.ir_version = max(model.ir_version or 0, UINT4_IR_VERSION)

        self._solved: dict[str, tuple] = {}
        if config.method == "gptq" and candidates:
            if not self.context.calibration:
                raise ValueError("the kmeans pass with method: gptq needs calibration data: run with --data "
                                 "(an .npz of model inputs), or set method: nearest")
            self._solved, solve_notes = kmeans_grid.solve_gptq(model, candidates, config, self.context, channel_axis)
            notes += solve_notes
        taken = _all_names(model)
        lookups: dict[int, tuple[ir.Graph, list[ir.Node]]] = {}
        per_tensor: dict[str, dict[str, Any]] = {}
        bytes_before = bytes_after = 0
        for index, value in enumerate(candidates):
            self.context.progress("k-means clustering", index, len(candidates))
            graph = value.graph
            nodes, info = self._share(graph, value, use_uint4, taken, notes)
            lookups.setdefault(id(graph), (graph, []))[1].extend(nodes)
            per_tensor[info.pop("tensor")] = info
            bytes_before += info["bytes_before"]
            bytes_after += info["bytes_after"]
        for graph, nodes in lookups.values():
            # Lookups read only initializers, so the front of the owning graph is always a valid place.
            if len(graph):
                graph.insert_before(graph[0], nodes)
            else:
                graph.extend(nodes)

        stats = {
            "tensors_clustered": len(per_tensor),
            "bits": config.bits,
            "bits_per_tensor": {name: info["bits"] for name, info in per_tensor.items()},
            "index_dtype": _index_dtypes(per_tensor),
            "bytes_before": bytes_before,
            "bytes_after": bytes_after,
            "size_ratio": round(bytes_before / bytes_after, 3) if bytes_after else None,
            "per_tensor": per_tensor,
            "skipped": skipped,
            "notes": notes,
        }
        return PassResult(model, modified=bool(per_tensor), stats=stats)

    def _upgrade_for_uint4(self, model: ir.Model, notes: list[str]) -> tuple[ir.Model, bool]:
        """Upgrade to opset 21 for uint4 indices; under ``auto`` a failure falls back to uint8."""
        forced = self.config.index_dtype == "uint4"
        before = opset_version(model)
        if sum(v.const_value.nbytes for _, v in iter_weights(model)) > EXTERNAL_DATA_THRESHOLD:
            # The version converter needs the whole model as one in-memory protobuf.
            reason = f"the model is too large to upgrade from opset {before} in memory"
            if forced:
                raise InputError(f"uint4 indices need opset {UINT4_OPSET}, but {reason}; "
                                 f"export it at opset {UINT4_OPSET} or use index_dtype: uint8")
            notes.append(f"kept uint8 indices: {reason}")
            return model, False
        try:
            upgraded = ensure_opset(model, UINT4_OPSET)
        except InputError as exc:
            if forced:
                raise
            notes.append(f"kept uint8 indices: {exc}")
            return model, False
        notes.append(f"opset upgraded {before} -> {UINT4_OPSET} for uint4 indices")
        return upgraded, True

    def _select(self, model: ir.Model) -> tuple[list[ir.Value], list[dict[str, str]]]:
        chosen, skipped = select_weights(model, set(self.config.op_types), self.config)
        if self.config.vectors:
            vectors, left = _select_vectors(model, self.config)
            chosen, skipped = chosen + vectors, skipped + left
        return chosen, skipped

    def _share(
        self, graph: ir.Graph, value: ir.Value, use_uint4: bool, taken: set[str], notes: list[str]
    ) -> tuple[list[ir.Node], dict[str, Any]]:
        """Cluster one weight, swap its initializer for indices + codebook, return the lookup nodes."""
        config: KMeansConfig = self.config
        name = value.name
        weights = value.const_value.numpy()
        is_vector = len(weights.shape) < 2
        axis = None if is_vector else channel_axis(value)
        groups = 1 if is_vector else config.per_channel_groups
        if groups > 1 and axis is None:
            notes.append(f"{name}: one codebook (its consumers disagree on the channel axis)")
            groups = 1
        groups = min(groups, weights.shape[axis]) if groups > 1 else 1
        size = 1 if is_vector else config.vector_size
        if size > 1 and weights.shape[-1] % size:
            notes.append(f"{name}: scalar codebook (its last dimension {weights.shape[-1]} is not a multiple "
                         f"of vector_size {size})")
            size = 1

        scales, figures = None, {}
        if config.on_grid and not is_vector:
            if config.scale == "channel" and axis is None:
                notes.append(f"{name}: one scale (its consumers disagree on the channel axis)")
            if name in self._solved:
                codebook, indices, scales, figures = self._solved[name][1]
            else:
                codebook, indices, scales, figures = kmeans_grid.share(weights, axis, config, None)
            bits, mse = config.bits, figures.pop("mse")
        else:
            bits, codebook, indices, mse = choose_bits(weights, groups, axis, size, config, self.context.seed)
        k = 1 << bits

        if use_uint4 and bits <= 4:
            import ml_dtypes  # an onnx-ir dependency: numpy's dtype for packed 4-bit values

            index_tensor = ir.Tensor(indices.astype(ml_dtypes.uint4), name=_fresh(f"{name}_kmeans_idx", taken))
        else:
            index_tensor = ir.Tensor(indices, name=_fresh(f"{name}_kmeans_idx", taken))
        codebook_tensor = ir.Tensor(codebook, name=_fresh(f"{name}_kmeans_codebook", taken))
        index_value = _initializer(graph, index_tensor)
        codebook_value = _initializer(graph, codebook_tensor)

        # int32 is enough for any index and is folded away with the rest of the chain.
        cast = ir.node("Cast", [index_value], {"to": ir.DataType.INT32}, name=f"{name}/kmeans_cast")
        # The int32 intermediates get no type/shape: onnx-ir would write a value_info for each, and
        # on small models those bytes show in the shipped size. ORT folds them away regardless.
        cast.outputs[0].name = _fresh(f"{name}_kmeans_idx32", taken)
        nodes = [cast]
        flat_index = cast.outputs[0]
        extra_bytes = 0
        if groups > 1:
            offsets = group_offsets(weights.shape, groups, axis, k).astype(np.int32)
            offsets_value = _initializer(graph, ir.Tensor(offsets, name=_fresh(f"{name}_kmeans_offsets", taken)))
            add = ir.node("Add", [flat_index, offsets_value], name=f"{name}/kmeans_group_offsets")
            add.outputs[0].name = _fresh(f"{name}_kmeans_idx_grouped", taken)
            nodes.append(add)
            flat_index = add.outputs[0]
            extra_bytes = offsets.nbytes
        if all(u.idx in STATISTICS_INPUTS.get(u.node.op_type, ()) for u in value.uses()):
            frozen = ir.node("Identity", [codebook_value], name=f"{name}/kmeans_frozen")
            frozen.outputs[0].name = _fresh(f"{name}_kmeans_codebook_frozen", taken)
            nodes.append(frozen)
            codebook_value = frozen.outputs[0]
        gather = ir.node("Gather", [codebook_value, flat_index], {"axis": 0}, name=f"{name}/kmeans_lookup")
        nodes.append(gather)
        looked_up = gather.outputs[0]
        stored = [index_tensor.name, codebook_tensor.name]
        if scales is not None:  # normalized entries times the channel scales, folded by ORT at load
            gather.outputs[0].name = _fresh(f"{name}_kmeans_normalized", taken)
            scales_value = _initializer(graph, ir.Tensor(scales, name=_fresh(f"{name}_kmeans_scales", taken)))
            mul = ir.node("Mul", [looked_up, scales_value], name=f"{name}/kmeans_scale")
            nodes.append(mul)
            looked_up = mul.outputs[0]
            extra_bytes += scales.nbytes
            stored.append(scales_value.name)
        if size > 1:  # [..., n/size, size] sub-vectors back to the weight's shape
            gather.outputs[0].name = _fresh(f"{name}_kmeans_subvectors", taken)
            shape = np.array(weights.shape, np.int64)
            shape_value = _initializer(graph, ir.Tensor(shape, name=_fresh(f"{name}_kmeans_shape", taken)))
            reshape = ir.node("Reshape", [looked_up, shape_value], name=f"{name}/kmeans_reshape")
            nodes.append(reshape)
            looked_up = reshape.outputs[0]
            extra_bytes += shape.nbytes
        # No type/shape either: ORT infers them, and on a model pruned and clustered to a few KB
        # one value_info per weight is ~2 % of the shipped artifact.

        value.replace_all_uses_with(looked_up)
        graph.initializers.pop(name)
        looked_up.name = name  # consumers keep reading a value named like the original weight

        info = {
            "tensor": name,
            "bits": bits,
            "vector_size": size,
            "elements": int(weights.size),
            "index_dtype": "uint4" if use_uint4 and bits <= 4 else "uint8",
            "stored_as": stored,  # the report maps shipped bytes back
            "groups": groups,
            "mse": mse,
            "zeros_kept": int(weights.size - np.count_nonzero(weights)) if config.keep_zero else 0,
            **figures,
            "bytes_before": int(weights.nbytes),
            "bytes_after": int(index_tensor.nbytes + codebook_tensor.nbytes + extra_bytes),
        }
        return nodes, info

def _index_dtypes(per_tensor: dict[str, dict[str, Any]]) -> str | None:
    kinds = sorted({info["index_dtype"] for info in per_tensor.values()})
    return "/".join(kinds) if kinds else None


def _select_vectors(model: ir.Model, config: KMeansConfig) -> tuple[list[ir.Value], list[dict[str, str]]]:
    """Float 1-D initializers used only as biases / normalization parameters (``VECTOR_INPUTS``)."""
    chosen: list[ir.Value] = []
    skipped: list[dict[str, str]] = []
    for _, value in iter_weights(model):
        tensor = value.const_value
        if tensor.dtype not in _FLOATS or len(tensor.shape) != 1:
            continue
        uses = list(value.uses())
        if not uses or any(u.node.op_type not in VECTOR_INPUTS or u.idx not in VECTOR_INPUTS[u.node.op_type]
                           for u in uses):
            continue  # shapes, scalars, anything read by other ops: not a parameter vector
        name = value.name or "?"
        if value.is_graph_input() or value.is_graph_output():
            reason = "is a graph input or output"
        elif not matches(name, config.include, config.exclude):
            reason = "excluded by include/exclude globs"
        elif tensor.size < config.min_vector_elements:
            reason = f"vector of fewer than min_vector_elements={config.min_vector_elements} elements"
        else:
            chosen.append(value)
            continue
        skipped.append({"tensor": name, "reason": reason})
    return chosen, skipped


def _initializer(graph: ir.Graph, tensor: ir.Tensor) -> ir.Value:
    value = ir.Value(name=tensor.name, type=ir.TensorType(tensor.dtype), shape=tensor.shape, const_value=tensor)
    graph.register_initializer(value)
    return value


def _all_names(model: ir.Model) -> set[str]:
    """Every value name in the model, subgraphs included: new names must not shadow any of them."""
    names: set[str] = set()
    for graph in iter_graphs(model):
        names.update(v.name for v in graph.inputs if v.name)
        names.update(graph.initializers)
        for node in graph:
            names.update(v.name for v in node.outputs if v.name)
    return names


def _fresh(base: str, taken: set[str]) -> str:
    name, n = base, 1
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name
