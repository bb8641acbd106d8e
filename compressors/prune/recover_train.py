"""The torch side of the recover pass: interpreter, teacher outputs, training loop, write-back.

Kept apart from ``recover.py`` so that importing the pass registry (every CLI command does) does
not import torch; this module is imported only when a recover pass runs.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir
import torch

from modelpress.compressors.model import to_bytes
from modelpress.compressors.pipeline import PassContext
from modelpress.compressors.prune.recover import AUTO_STEPS, AUTO_WORK, LR_CANDIDATES, LR_PROBE_MIN_STEPS, RecoverConfig
from modelpress.compressors.prune.recover_data import Batch, TrainingData, run_onnx
from modelpress.compressors.torch_graph import TorchGraph
from modelpress.kernels.distill import (
    agreement,
    binary_kd_loss,
    epoch_order,
    kd_loss,
    masked_grad_,
    masked_weight_,
    relative_mse,
)


class RecoveryTrainer:
    """Distils one compressed model towards the teacher in ``context.original``."""

    def __init__(self, config: RecoverConfig, context: PassContext):
        self.config = config
        self.context = context
        self.features: list[tuple[int, str]] = []  # (index into the teacher's features, value name)
        self.logits: str | None = None  # loss bce: the Sigmoid's input, distilled instead of its output

    def recover(self, model: ir.Model, values: list[ir.Value]) -> dict:
        config: RecoverConfig = self.config
        feeds = self.context.calibration
        student = TorchGraph(model, trainable=sorted({v.name for v in values}))
        names = feature_names(model, self.context.original, config)
        teacher = run_onnx(self.context.original, feeds, names, self.context.threads, config.padding_mask)
        data = TrainingData.build(feeds, teacher, self.context.labels, config, model.graph.outputs[0].name,
                                 _output_op(model))
        del teacher  # the training data holds what it needs: the per-feed copies can go
        if data.loss_kind == "bce":
            self.logits = model.graph.outputs[0].producer().inputs[0].name
        first = next(data.in_order(8))
        probe = {name: t.numpy() for name, t in first.feed.items()}
        _check_parity(student, model, probe, self.context.threads)
        self.features = _same_shapes(student, first, names, set(config.features), data.notes)

        params = [p for _, p in student.trainable]
        zeros = sum(int((p == 0).sum()) for p in params)
        before = self._evaluate(student, data)
        target = "kd_loss" if data.loss_kind == "kl" else "relative_error"
        if before[target] == 0 and config.label_weight == 0:  # e.g. every weight was out of the pruner's reach
            data.notes.append(f"{target} is already 0 (the model matches the teacher on the data): not trained")
            run = {"epochs": 0, "steps": 0, "seconds": 0.0, "stopped_by_budget": False, "reached": set()}
            after = before
        else:
            run = self._train(student, data, weight_reuse(model, student, probe, data))
            after = self._evaluate(student, data)
        # Never hand back a model further from the teacher than it came (e.g. one barely pruned,
        # where Adam's first steps are noise): then the weights stay as they were.
        improved = after[target] < before[target]
        if improved:
            _write_back(student)
        elif run["steps"]:
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
            "features_matched": len(self.features),
            "zeros_kept": zeros if config.keep_masks else None,
            "trained": trained,
            "not_reached": [v.name for v, p in student.trainable if id(p) not in reached],
            "notes": data.notes,
        })
        return stats

    def _train(self, student: TorchGraph, data: TrainingData, reuse: dict[int, float]) -> dict:
        """The optimization loop; masked weights get neither gradient nor value."""
        config: RecoverConfig = self.config
        params = [p for _, p in student.trainable]
        masks = {id(p): p.detach() != 0 for p in params} if config.keep_masks else {}
        per_epoch = data.steps_per_epoch(config.batch_size)
        planned = config.epochs
        if planned is None:
            work = sum(p.numel() * reuse.get(id(p), 1.0) for p in params) * data.positions
            planned = max(1, min(-(-AUTO_STEPS // per_epoch), int(AUTO_WORK // work)))
        total = planned * per_epoch
        started = time.perf_counter()
        reached: set[int] = set()
        lr, probe = config.lr, None
        if lr == "auto":
            lr, probe = self._probe_lr(student, data, params, masks, reached, max(LR_PROBE_MIN_STEPS, total // 20))
        optimizer = self._optimizer(params, lr)
        scheduler = None
        if config.schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        generator = torch.Generator().manual_seed(self.context.seed)

        step, stopped, epoch_losses = 0, False, []
        for _ in range(planned):
            losses = []
            for batch in data.batches(epoch_order, generator, config.batch_size):
                self.context.progress("recover", step, total)
                losses.append(self._step(student, data, batch, optimizer, params, masks, reached))
                if scheduler is not None:
                    scheduler.step()
                step += 1
                if config.max_seconds is not None and time.perf_counter() - started > config.max_seconds:
                    stopped = True
                    break
            epoch_losses.append(float(np.mean(losses)))
            if stopped:
                break
        self.context.progress("recover", total, total)
        run = {
            "epochs": len(epoch_losses),
            "steps": step,
            "seconds": round(time.perf_counter() - started, 3),
            "stopped_by_budget": stopped,
            "loss_first": round(epoch_losses[0], 6),
            "loss_last": round(epoch_losses[-1], 6),
            "lr": lr,
            "reached": reached,
        }
        if probe is not None:
            run["lr_probe"] = probe
        return run

    def _optimizer(self, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
        if self.config.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr)
        return torch.optim.SGD(params, lr=lr, momentum=0.9)

    def _step(self, student: TorchGraph, data: TrainingData, batch: Batch, optimizer: torch.optim.Optimizer,
              params: list[torch.Tensor], masks: dict[int, torch.Tensor], reached: set[int]) -> float:
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
        return float(loss.detach())

    def _probe_lr(self, student: TorchGraph, data: TrainingData, params: list[torch.Tensor],
                  masks: dict[int, torch.Tensor], reached: set[int], steps: int) -> tuple[float, dict[str, float]]:
        """``lr: auto``: from the starting weights, ``steps`` constant-rate steps at each of
        LR_CANDIDATES on the same batches; the rate whose later half of those steps has the lowest
        mean loss wins (ties: the larger). The weights are restored after each try. A rate tuned on a
        small model trained from scratch (3e-3 on the digits CNN) wrecks a pretrained one at the first
        steps (PP-LCNet after structured pruning: KD loss 0.27 -> 0.24 in 431 steps at 3e-3, -> 0.0 at 3e-4)."""
        start = [p.detach().clone() for p in params]
        results: dict[str, float] = {}
        for lr in LR_CANDIDATES:
            optimizer = self._optimizer(params, lr)
            generator = torch.Generator().manual_seed(self.context.seed)
            losses: list[float] = []
            while len(losses) < steps:
                for batch in data.batches(epoch_order, generator, self.config.batch_size):
                    losses.append(self._step(student, data, batch, optimizer, params, masks, reached))
                    if len(losses) == steps:
                        break
            later = losses[len(losses) // 2:]
            results[f"{lr:g}"] = round(float(np.mean(later)), 6) if np.all(np.isfinite(later)) else float("inf")
            with torch.no_grad():
                for p, saved in zip(params, start):
                    p.copy_(saved)
            self.context.progress("recover: choosing the learning rate", len(results), len(LR_CANDIDATES))
        best = min(LR_CANDIDATES, key=lambda lr: (results[f"{lr:g}"], -lr))
        return best, results

    def _loss(self, student: TorchGraph, batch: Batch, data: TrainingData) -> torch.Tensor:
        config: RecoverConfig = self.config
        extra = [name for _, name in self.features] + ([self.logits] if self.logits else [])
        outputs = student.run(batch.feed, extra=extra)
        full = data.view(outputs[data.output])
        out, teacher = _real(full, batch.teacher, batch.mask)
        if data.loss_kind == "bce":
            loss = binary_kd_loss(*_real(outputs[self.logits], batch.teacher, batch.mask))
        elif data.loss_kind == "kl":
            loss = kd_loss(out, teacher, config.temperature)
            if batch.labels is not None and config.label_weight > 0:
                ce = torch.nn.functional.cross_entropy(full.reshape(len(batch.labels), -1), batch.labels)
                loss = (1 - config.label_weight) * loss + config.label_weight * ce
        else:
            loss = relative_mse(out, teacher)
        if self.features and config.feature_weight > 0:
            matched = [relative_mse(*_real(outputs[n], batch.features[i].float(), batch.mask)) for i, n in self.features]
            loss = loss + config.feature_weight * torch.stack(matched).mean()
        return loss

    @torch.no_grad()
    def _evaluate(self, student: TorchGraph, data: TrainingData) -> dict[str, float]:
        """On all the data: the distillation loss (kl or relative error), agreement with the teacher
        and label accuracy (kl)."""
        config: RecoverConfig = self.config
        outs, teachers, labels = [], [], []
        for batch in data.in_order(max(config.batch_size, 64)):
            full = data.view(student.run(batch.feed)[data.output])
            if batch.labels is not None:  # label rows are all rows, padded or not
                labels.append((full.reshape(len(batch.labels), -1).argmax(-1) == batch.labels).float())
            out, teacher = _real(full, batch.teacher, batch.mask)
            outs.append(out)
            teachers.append(teacher)
        if data.loss_kind != "kl":
            errors = [float(relative_mse(o, t)) for o, t in zip(outs, teachers)]
            return {"relative_error": round(float(np.mean(errors)), 6)}
        out = torch.cat([o.reshape(-1, o.shape[-1]) for o in outs])
        teacher = torch.cat([t.reshape(-1, t.shape[-1]) for t in teachers])
        result = {"agreement": round(agreement(out, teacher), 6),
                  "kd_loss": round(float(kd_loss(out, teacher, config.temperature)), 6)}
        if labels:
            result["label_accuracy"] = round(float(torch.cat(labels).mean()), 6)
        return result


def weight_reuse(model: ir.Model, student: TorchGraph, probe: dict, data: TrainingData) -> dict[int, float]:
    """id(parameter) -> multiply-adds per element per training position, where that is not 1: a Conv
    kernel is applied at every output pixel, a MatMul weight at every row of a sample (a token, when
    ``data.positions`` already counts real tokens, is one). From ONNX shape inference at the first
    batch's shapes; a weight whose shapes stay unknown counts once (the cap is then looser)."""
    from modelpress.compressors.quantize.ort_probe import batch_of, inferred_shapes

    shapes = inferred_shapes(ir.to_proto(model), probe)
    batch = batch_of(probe) or 1
    per_token = probe[data.mask_input].shape[1] if data.mask_input in probe else 1
    reuse: dict[int, float] = {}
    for value, param in student.trainable:
        uses = list(value.uses())
        if len(uses) != 1:
            continue
        node, index = uses[0].node, uses[0].idx
        if node.op_type in ("Conv", "ConvTranspose") and index == 1:
            measured = node.outputs[0] if node.op_type == "Conv" else node.inputs[0]
            shape = shapes.get(measured.name)
            if shape and len(shape) > 2:
                reuse[id(param)] = float(np.prod(shape[2:]))
        elif node.op_type in ("MatMul", "Gemm") and index in (0, 1):
            shape = shapes.get(node.outputs[0].name)
            if shape and len(shape) > 1:
                reuse[id(param)] = max(1.0, float(np.prod(shape[:-1])) / batch / per_token)
    return reuse


def feature_names(model: ir.Model, original: bytes, config: RecoverConfig) -> list[str]:
    """The named features, then the outputs of ``feature_ops`` nodes the original also computes
    (by name), in graph order; graph outputs are matched anyway and left out."""
    names = list(config.features)
    if not config.feature_ops:
        return names
    computed = {o for node in onnx.load_model_from_string(original).graph.node for o in node.output}
    outputs = {v.name for v in model.graph.outputs}
    for node in model.graph:
        value = node.outputs[0] if node.op_type in config.feature_ops and node.outputs else None
        if value is not None and value.name in computed and value.name not in outputs and value.name not in names:
            names.append(value.name)
    return names


@torch.no_grad()
def _same_shapes(student: TorchGraph, batch: Batch, names: list[str], named: set[str],
                 notes: list[str]) -> list[tuple[int, str]]:
    """(index into the teacher's features, name) of the features whose student value has the teacher's
    shape on a probe batch. A mismatch is an error for a feature named in ``features`` and left out
    (with a note) for one found through ``feature_ops`` — e.g. a Conv output that structured pruning
    narrowed."""
    if not names:
        return []
    values = student.run(batch.feed, extra=names)
    kept, dropped = [], []
    for i, name in enumerate(names):
        if tuple(values[name].shape) == tuple(batch.features[i].shape):
            kept.append((i, name))
        elif name in named:
            raise ValueError(f"feature {name!r} has shape {tuple(values[name].shape)} in the compressed model but "
                             f"{tuple(batch.features[i].shape)} in the original: name values both models share")
        else:
            dropped.append(name)
    if dropped:
        notes.append(f"{len(dropped)} feature_ops value(s) left out, shapes differ from the original's: "
                     + ", ".join(dropped[:5]) + (" ..." if len(dropped) > 5 else ""))
    if kept and len(kept) > len(named & set(names)):
        notes.append(f"{len(kept)} intermediate values matched as features")
    return kept


def _real(out: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Only the real (unpadded) positions of an output and its target, when the data has a mask over
    the output's first two axes: [n, seq, ...] -> [real positions, ...]."""
    if mask is None or tuple(out.shape[:2]) != tuple(mask.shape) or out.shape != teacher.shape:
        return out, teacher
    return out[mask], teacher[mask]


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
def torch_settings(threads: int, seed: int) -> Iterator[None]:
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
