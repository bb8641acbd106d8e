"""Distillation math for recovery fine-tuning (torch only, no ONNX).

``kd_loss``: Hinton et al.'s knowledge-distillation loss, ``T² · KL(softmax(t/T) ‖ softmax(s/T))``
averaged over rows (the T² keeps gradient scale independent of the temperature).
``binary_kd_loss``: the same for a Sigmoid output, cross-entropy per element on the student's logits.
``relative_mse``: feature / regression matching scaled by the teacher's energy, so layers of
different magnitudes weigh alike. ``masked_`` helpers keep pruned zeros exactly zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over all rows (every axis but the last) of T²·KL(teacher ‖ student) on tempered softmax."""
    classes = student.shape[-1]
    s = F.log_softmax(student.reshape(-1, classes).float() / temperature, dim=-1)
    t = F.log_softmax(teacher.reshape(-1, classes).float() / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


def binary_kd_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of sigmoid(student_logits) against the teacher's probabilities, minus
    the teacher's own entropy: 0 for a perfect match. Its gradient, sigmoid(s) - t, does not vanish
    where the student saturates, as MSE on probabilities does."""
    s, t = student_logits.float(), teacher_probs.float().clamp(0.0, 1.0)
    entropy = F.binary_cross_entropy(t, t, reduction="mean") if t.numel() else t.sum()
    return F.binary_cross_entropy_with_logits(s, t) - entropy


def relative_mse(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``mean((s - t)²) / mean(t²)``: 0 for a perfect match, 1 for predicting all zeros."""
    s, t = student.float(), teacher.float()
    return torch.mean((s - t) ** 2) / (torch.mean(t * t) + eps)


def agreement(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Fraction of rows whose arg-max class is the same."""
    classes = student.shape[-1]
    same = student.reshape(-1, classes).argmax(-1) == teacher.reshape(-1, classes).argmax(-1)
    return float(same.float().mean())


def masked_grad_(param: torch.Tensor, mask: torch.Tensor) -> None:
    """Zero the gradient where the weight is pruned, so optimizer state never builds up there."""
    if param.grad is not None:
        param.grad.mul_(mask)


@torch.no_grad()
def masked_weight_(param: torch.Tensor, mask: torch.Tensor) -> None:
    """Put exact +0.0 back wherever the mask is False (weight decay or momentum may have moved it)."""
    param.copy_(torch.where(mask, param, torch.zeros((), dtype=param.dtype)))


def epoch_order(samples: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A fresh permutation of ``range(samples)`` cut into batches; the last one may be smaller."""
    return list(torch.randperm(samples, generator=generator).split(batch_size))
