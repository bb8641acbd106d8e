"""Recovery by distillation: fine-tune the compressed model's weights against the original model.

before: a compressed model (e.g. pruned to 90 % zeros), the original model as teacher
(``PassContext.original``) and calibration feeds (``--data``; labels optional).
after:  the same graph — same nodes, initializer names and dtypes — with the trainable weights
fine-tuned so the model's first output matches the teacher's: KL divergence of the tempered
softmax for classifier outputs ([N, C]), binary cross-entropy on the logits of a Sigmoid output
(against the teacher's probabilities), relative MSE for other outputs (embeddings, regressions),
optionally mixed with cross-entropy on labels and with matching of intermediate values, named
(``features``) or found by op type (``feature_ops``, e.g. every transformer block's LayerNorm output).
Every weight that was exactly zero stays exactly zero (``keep_masks``), so sparsity is unchanged.

How: the graph runs in torch through an interpreter whose parameters are the initializers
(``torch_graph.py``); the teacher runs once in onnxruntime. Before training the interpreter's
output is checked against onnxruntime on the compressed model, so it never trains a function the
shipped model does not compute; and when training does not bring the model closer to the teacher
on the calibration data, the weights are left as they came. Seeded batch order, deterministic
algorithms and a fixed thread count make two runs produce the same bytes (unless ``max_seconds``
cuts training short, which the stats say).

Trainable by default: float initializers of two or more elements whose every use is a weight-like
input — MatMul/Gemm operands (rank >= 2), Gemm/Conv/ConvTranspose weights and biases, Gather tables
(embeddings and k-means codebooks), normalization scales and shifts, Add/Sub/Mul operands (biases,
position embeddings) and PRelu slopes. Never trained: BatchNorm running statistics, shapes, scalars,
integer tensors (k-means indices), graph inputs. ``include``/``exclude`` globs narrow the choice.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

import onnx_ir as ir
from pydantic import Field

from modelpress.compressors.model import iter_weights
from modelpress.compressors.pipeline import Pass, PassConfig, PassResult
from modelpress.compressors.selection import matches

# op type -> input positions that hold trainable parameters
TRAINABLE_INPUTS: dict[str, tuple[int, ...]] = {
    "MatMul": (0, 1), "Gemm": (0, 1, 2), "Conv": (1, 2), "ConvTranspose": (1, 2), "Gather": (0,),
    "LayerNormalization": (1, 2), "BatchNormalization": (1, 2), "InstanceNormalization": (1, 2),
    "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1), "PRelu": (1,), "LSTM": (1, 2, 3, 7), "GRU": (1, 2, 3),
}
# Without ``epochs``: enough passes for this many optimizer steps, so a small --data set is not
# under-trained (digits MLP at 90 % sparsity: 1347 samples x 40 epochs or 512 x 120 both recover).
AUTO_STEPS = 1000
# ... but capped for large models, where that would take hours: at most this many forward multiply-adds
# per pass (each trainable weight x the positions it is applied at: every output pixel of a Conv,
# every row of a MatMul, every real token when the data has a mask), and at least one pass. The
# digits models stay far below it (about 3e9); all-MiniLM-L6-v2 with 256 calibration sentences of ~15
# tokens gets about 4 passes (a few minutes on 2 cores). Counting a Conv kernel once per sample, as
# before, let a 0.1 M-parameter OCR CNN on 16 images of 48 x 192 plan 1000 passes (6 minutes).
AUTO_WORK = 3e11
# Below this many elements in its largest trainable tensor a model trains on one thread: on the digits
# MLP (largest 19,200) two threads were 4.5x slower (per-op thread handoff dwarfs the tiny kernels); on
# all-MiniLM-L6-v2 (largest trained 589,824) two threads were 1.6x faster (512 sentences, one epoch:
# 16.2 s -> 10.0 s).
SINGLE_THREAD_BELOW = 1 << 16
# ``lr: auto`` tries these (Adam rates from-scratch to fine-tuning) for max(LR_PROBE_MIN_STEPS, a
# twentieth of the planned steps) each, from the same weights on the same batches, and trains at the best.
LR_CANDIDATES = (3e-3, 1e-3, 3e-4, 1e-4)
LR_PROBE_MIN_STEPS = 10
FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


class RecoverConfig(PassConfig):
    epochs: int | None = Field(None, ge=1, le=100_000, description=f"passes over the data; None: about {AUTO_STEPS} steps, fewer for large models (AUTO_WORK)")
    batch_size: int = Field(64, ge=1, description="samples per step (feeds that cannot be split are used whole)")
    lr: Annotated[float, Field(gt=0.0, le=10.0)] | Literal["auto"] = Field(
        "auto", description="peak learning rate (cosine decay to 0); auto: the best of LR_CANDIDATES over a short probe")
    optimizer: Literal["adam", "sgd"] = "adam"
    schedule: Literal["cosine", "constant"] = "cosine"
    # bce: a Sigmoid output (a detector's probability map, multi-label scores) is distilled through its
    # logits, so a student saturated at 0 where the teacher says 1 still gets a gradient; MSE on the
    # probabilities gave none (PP-OCRv4 det after structured pruning: relative error stuck at 1.0).
    loss: Literal["auto", "kl", "mse", "bce"] = Field(
        "auto", description="auto: bce for a Sigmoid output, kl for [N, C] outputs, else mse")
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="softmax temperature of the kl loss")
    # Off by default: unless --eval-data is given, --data also evaluates, and fitting its labels would
    # inflate the accuracy the report and the gates see; distilling the teacher does not leak labels.
    label_weight: float = Field(0.0, ge=0.0, le=1.0, description="share of cross-entropy on labels; 0 = pure distillation")
    features: tuple[str, ...] = Field((), description="names of intermediate values to match as well")
    # Per-block hidden states for transformers: ["LayerNormalization"] matches every block's normalized
    # output, a denser signal than the last layer alone when --data is a few hundred sentences.
    feature_ops: tuple[str, ...] = Field((), description="op types whose outputs are matched as features too, "
                                         "where the original computes the same value name with the same shape")
    feature_weight: float = Field(1.0, ge=0.0, description="weight of the feature loss when features are named")
    max_seconds: float | None = Field(600.0, gt=0.0, description="training stops after this budget (then not reproducible)")
    include: tuple[str, ...] = Field(("*",), description="globs on initializer names")
    exclude: tuple[str, ...] = Field((), description="globs on initializer names, applied after include")
    keep_masks: bool = Field(True, description="every weight that is exactly 0 stays exactly 0")
    padding_mask: str | None = Field(
        "attention_mask", description="a [batch, seq] 0/1 input marking real positions: padded ones are left out "
        "of the loss (and cut from batches when that does not change the outputs); None: every position counts")


def trainable_weights(model: ir.Model, config: RecoverConfig) -> tuple[list[ir.Value], list[dict[str, str]]]:
    """(initializers to train, [{tensor, reason}] for float tensors left frozen)."""
    chosen, skipped = [], []
    for _, value in iter_weights(model):
        tensor = value.const_value
        if tensor.dtype not in FLOATS or tensor.size < 2:
            continue  # indices, shapes and scalar constants: never parameters, not worth a line
        reason = None
        bad = sorted({
            f"{use.node.op_type} input {use.idx}" for use in value.uses()
            if use.idx not in TRAINABLE_INPUTS.get(use.node.op_type, ())
            or (use.node.op_type == "MatMul" and len(tensor.shape) < 2)
        })
        if not value.uses():
            reason = "not used by any node"
        elif bad:
            reason = f"used as {', '.join(bad)}"
        elif value.is_graph_input():
            reason = "is also a graph input, so callers may override it at run time"
        elif not matches(value.name or "?", config.include, config.exclude):
            reason = "excluded by include/exclude globs"
        if reason is None:
            chosen.append(value)
        else:
            skipped.append({"tensor": value.name or "?", "reason": reason})
    return chosen, skipped


class Recover(Pass):
    name = "recover"
    stage = "prune"  # runs after the pruning passes listed before it in the recipe's prune stage
    config_cls = RecoverConfig
    summary = "fine-tune the compressed weights by distillation from the original model (masks kept)"
    needs_calibration = True
    needs_original = True

    def call(self, model: ir.Model) -> PassResult:
        config: RecoverConfig = self.config
        if not self.context.calibration:
            raise ValueError("the recover pass needs calibration data: run with --data (an .npz of model inputs)")
        if self.context.original is None:
            raise ValueError("the recover pass needs the original model as teacher (PassContext.original)")
        values, skipped = trainable_weights(model, config)
        if not values:
            return PassResult(model, modified=False, stats={"tensors_trained": 0, "skipped": skipped})
        largest = max(v.const_value.size for v in values)
        threads = 1 if largest < SINGLE_THREAD_BELOW else self.context.threads
        # Busy-waiting OpenMP threads (torch's default) starve each other when the cores are shared:
        # one training step of all-MiniLM-L6-v2 took 28 s with 2 spinning threads on a loaded 2-core
        # machine, 5 s with passive waiting. Read when torch loads, so it only helps if torch is not
        # imported yet (the CLI); results do not depend on it.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from modelpress.compressors.prune.recover_train import RecoveryTrainer, torch_settings

        with torch_settings(threads, self.context.seed):
            stats = RecoveryTrainer(config, self.context).recover(model, values)
        stats["threads"] = threads
        stats["skipped"] = skipped
        return PassResult(model, modified=stats["tensors_trained"] > 0, stats=stats)


class RecoverQuantized(Recover):
    """The same distillation after quantization: with k-means it trains the codebooks (indices and
    pruned zeros stay fixed), with int8 weight-only the per-channel scales."""

    stage = "quantize"
    summary = "fine-tune what quantization left trainable (k-means codebooks, scales) by distillation"
