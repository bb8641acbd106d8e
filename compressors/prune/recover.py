"""Recovery by distillation: fine-tune the compressed model's weights against the original model.

before: a compressed model (e.g. pruned to 90 % zeros), the original model as teacher
(``PassContext.original``) and calibration feeds (``--data``; labels optional).
after:  the same graph — same nodes, initializer names and dtypes — with the trainable weights
fine-tuned so the model's first output matches the teacher's: KL divergence of the tempered
softmax for classifier outputs ([N, C]), relative MSE for other outputs (embeddings, regressions),
optionally mixed with cross-entropy on labels and with matching of named intermediate values.
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

import contextlib
import time
import warnings
from collections.abc import Iterator
from typing import Literal

import numpy as np
import onnx_ir as ir
import torch
from pydantic import Field

from modelpress.compressors.model import iter_weights, to_bytes
from modelpress.compressors.pipeline import Pass, PassConfig, PassResult
from modelpress.compressors.prune.recover_data import Batch, TrainingData, run_onnx
from modelpress.compressors.selection import matches
from modelpress.compressors.torch_graph import TorchGraph
from modelpress.kernels.distill import agreement, epoch_order, kd_loss, masked_grad_, masked_weight_, relative_mse

# op type -> input positions that hold trainable parameters
TRAINABLE_INPUTS: dict[str, tuple[int, ...]] = {
    "MatMul": (0, 1), "Gemm": (0, 1, 2), "Conv": (1, 2), "ConvTranspose": (1, 2), "Gather": (0,),
    "LayerNormalization": (1, 2), "BatchNormalization": (1, 2), "InstanceNormalization": (1, 2),
    "Add": (0, 1), "Sub": (0, 1), "Mul": (0, 1), "PRelu": (1,),
}
# Without ``epochs``: enough passes for this many optimizer steps, so a small --data set is not
# under-trained (digits MLP at 90 % sparsity: 1347 samples x 40 epochs or 512 x 120 both recover).
AUTO_STEPS = 1000
# Below this many elements in its largest trainable tensor a model trains on one thread: on the digits
# MLP two threads were 4.5x slower (per-op thread handoff dwarfs the tiny kernels).
SINGLE_THREAD_BELOW = 1 << 20
FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


class RecoverConfig(PassConfig):
    epochs: int | None = Field(None, ge=1, le=100_000, description=f"passes over the data; None: about {AUTO_STEPS} steps")
    batch_size: int = Field(64, ge=1, description="samples per step (feeds that cannot be split are used whole)")
    lr: float = Field(3e-3, gt=0.0, le=10.0, description="peak learning rate (cosine decay to 0)")
    optimizer: Literal["adam", "sgd"] = "adam"
    schedule: Literal["cosine", "constant"] = "cosine"
    loss: Literal["auto", "kl", "mse"] = Field("auto", description="auto: kl for [N, C] outputs, else mse")
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="softmax temperature of the kl loss")
    # Off by default: unless --eval-data is given, --data also evaluates, and fitting its labels would
    # inflate the accuracy the report and the gates see; distilling the teacher does not leak labels.
    label_weight: float = Field(0.0, ge=0.0, le=1.0, description="share of cross-entropy on labels; 0 = pure distillation")
    features: tuple[str, ...] = Field((), description="names of intermediate values to match as well")
    feature_weight: float = Field(1.0, ge=0.0, description="weight of the feature loss when features are named")
    max_seconds: float | None = Field(600.0, gt=0.0, description="training stops after this budget (then not reproducible)")
    include: tuple[str, ...] = Field(("*",), description="globs on initializer names")
    exclude: tuple[str, ...] = Field((), description="globs on initializer names, applied after include")
    keep_masks: bool = Field(True, description="every weight that is exactly 0 stays exactly 0")


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
        with _torch_settings(threads, self.context.seed):
            stats = self._recover(model, values)
        stats["threads"] = threads
        stats["skipped"] = skipped
        return PassResult(model, modified=stats["tensors_trained"] > 0, stats=stats)

    def _recover(self, model: ir.Model, values: list[ir.Value]) -> dict:
        config: RecoverConfig = self.config
        feeds = self.context.calibration
        student = TorchGraph(model, trainable=sorted({v.name for v in values}))
        teacher = run_onnx(self.context.original, feeds, config.features, self.context.threads)
        _check_parity(student, model, feeds[0], self.context.threads)
        data = TrainingData.build(feeds, teacher, self.context.labels, config, model.graph.outputs[0].name,
                                 _output_op(model))

        params = [p for _, p in student.trainable]
        zeros = sum(int((p == 0).sum()) for p in params)
        before = self._evaluate(student, data)
        run = self._train(student, data)
        after = self._evaluate(student, data)
        # Never hand back a model further from the teacher than it came (e.g. one barely pruned,
        # where Adam's first steps are noise): then the weights stay as they were.
        target = "kd_loss" if data.loss_kind == "kl" else "relative_error"
        improved = after[target] < before[target]
        if improved:
            _write_back(student)
        else:
            data.notes.append(f"training did not lower {target} ({before[target]} -> {after[target]}): "
                              "weights left as they were")
            after = before
        reached = run.pop("reached")
        trained = [v.name for v, p in student.trainable if id(p) in reached]
        stats: dict = {"tensors_trained": len(trained) if improved else 0}
        for key, value in before.items():  # the figures that matter first: the report shows a prefix
            stats[f"{key}_before"], stats[f"{key}_after"] = value, after[key]
        stats.update({
            **run,
            "loss": data.loss_kind,
            "samples": data.samples,
            "labels_used": data.labels_used,
            "zeros_kept": zeros if config.keep_masks else None,
            "trained": trained,
            "not_reached": [v.name for v, p in student.trainable if id(p) not in reached],
            "notes": data.notes,
        })
        return stats

    def _train(self, student: TorchGraph, data: TrainingData) -> dict:
        """The optimization loop; masked weights get neither gradient nor value."""
        config: RecoverConfig = self.config
        params = [p for _, p in student.trainable]
        masks = {id(p): p.detach() != 0 for p in params} if config.keep_masks else {}
        if config.optimizer == "adam":
            optimizer = torch.optim.Adam(params, lr=config.lr)
        else:
            optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9)
        per_epoch = data.steps_per_epoch(config.batch_size)
        planned = config.epochs or max(1, -(-AUTO_STEPS // per_epoch))
        total = planned * per_epoch
        scheduler = None
        if config.schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        generator = torch.Generator().manual_seed(self.context.seed)

        started = time.perf_counter()
        step, stopped, epoch_losses, reached = 0, False, [], set()
        for _ in range(planned):
            losses = []
            for batch in data.batches(epoch_order, generator, config.batch_size):
                self.context.progress("recover", step, total)
                optimizer.zero_grad(set_to_none=True)
                loss = self._loss(student, batch, data)
                loss.backward()
                for p in params:
                    if p.grad is not None:
                        reached.add(id(p))
                        if id(p) in masks:
                            masked_grad_(p, masks[id(p)])
                optimizer.step()
                for p in params:
                    if id(p) in masks:
                        masked_weight_(p, masks[id(p)])
                if scheduler is not None:
                    scheduler.step()
                losses.append(float(loss.detach()))
                step += 1
                if config.max_seconds is not None and time.perf_counter() - started > config.max_seconds:
                    stopped = True
                    break
            epoch_losses.append(float(np.mean(losses)))
            if stopped:
                break
        self.context.progress("recover", total, total)
        return {
            "epochs": len(epoch_losses),
            "steps": step,
            "seconds": round(time.perf_counter() - started, 3),
            "stopped_by_budget": stopped,
            "loss_first": round(epoch_losses[0], 6),
            "loss_last": round(epoch_losses[-1], 6),
            "reached": reached,
        }

    def _loss(self, student: TorchGraph, batch: Batch, data: TrainingData) -> torch.Tensor:
        config: RecoverConfig = self.config
        outputs = student.run(batch.feed, extra=config.features)
        out = data.view(outputs[data.output])
        if data.loss_kind == "kl":
            loss = kd_loss(out, batch.teacher, config.temperature)
            if batch.labels is not None and config.label_weight > 0:
                ce = torch.nn.functional.cross_entropy(out.reshape(len(batch.labels), -1), batch.labels)
                loss = (1 - config.label_weight) * loss + config.label_weight * ce
        else:
            loss = relative_mse(out, batch.teacher)
        if config.features and config.feature_weight > 0:
            matched = [relative_mse(outputs[n], t) for n, t in zip(config.features, batch.features)]
            loss = loss + config.feature_weight * torch.stack(matched).mean()
        return loss

    @torch.no_grad()
    def _evaluate(self, student: TorchGraph, data: TrainingData) -> dict[str, float]:
        """On all the data: the distillation loss (kl or relative error), agreement with the teacher
        and label accuracy (kl)."""
        config: RecoverConfig = self.config
        outs, teachers, labels = [], [], []
        for batch in data.in_order(512):
            outs.append(data.view(student.run(batch.feed)[data.output]))
            teachers.append(batch.teacher)
            if batch.labels is not None:
                labels.append(batch.labels)
        if data.loss_kind != "kl":
            errors = [float(relative_mse(o, t)) for o, t in zip(outs, teachers)]
            return {"relative_error": round(float(np.mean(errors)), 6)}
        out = torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])
        teacher = torch.cat([t.reshape(-1, t.shape[-1]) for t in teachers])
        result = {"agreement": round(agreement(out, teacher), 6),
                  "kd_loss": round(float(kd_loss(out, teacher, config.temperature)), 6)}
        if labels:
            result["label_accuracy"] = round(float((out.argmax(-1) == torch.cat(labels)).float().mean()), 6)
        return result


def _output_op(model: ir.Model) -> str | None:
    producer = model.graph.outputs[0].producer()
    return producer.op_type if producer is not None else None


def _check_parity(student: TorchGraph, model: ir.Model, feed: dict, threads: int) -> None:
    """Refuse to train when the interpreter and onnxruntime disagree on the compressed model."""
    reference = run_onnx(to_bytes(model), [feed], (), threads).outputs[0]
    with torch.no_grad():
        mine = next(iter(student.run(feed).values())).double().numpy()
    ref = reference.astype(np.float64)
    diff = float(np.max(np.abs(mine - ref))) if ref.size else 0.0
    if not diff <= 1e-3 * max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0):
        raise ValueError(f"the torch interpreter disagrees with onnxruntime on this model (max abs difference "
                         f"{diff:.3g} on its first output), so fine-tuning would train a different function")


def _write_back(student: TorchGraph) -> None:
    """Trained values into the same initializers: same names, same dtypes."""
    for value, param in student.trainable:
        array = param.detach().numpy().astype(value.const_value.dtype.numpy())
        value.const_value = ir.Tensor(array, name=value.name)


@contextlib.contextmanager
def _torch_settings(threads: int, seed: int) -> Iterator[None]:
    """A fixed thread count, seed and deterministic kernels for the pass; the caller's come back."""
    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), torch.get_rng_state())
    torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")  # a kernel without a deterministic version must not print
            yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        torch.set_rng_state(saved[3])
