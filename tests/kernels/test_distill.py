"""Distillation kernels against small numpy reference implementations."""

import numpy as np
import pytest
import torch

from modelpress.kernels.distill import (
    agreement,
    binary_kd_loss,
    epoch_order,
    kd_loss,
    masked_grad_,
    masked_weight_,
    relative_mse,
)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kd_reference(s, t, temperature):
    p, q = softmax(t / temperature), softmax(s / temperature)
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=-1)) * temperature**2)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_matches_reference_and_flattens_leading_axes(temperature):
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 3, 5)) * 3, rng.normal(size=(2, 3, 5)) * 3
    got = float(kd_loss(torch.tensor(s), torch.tensor(t), temperature))
    assert got == pytest.approx(kd_reference(s.reshape(6, 5), t.reshape(6, 5), temperature), rel=1e-5)
    assert float(kd_loss(torch.tensor(t), torch.tensor(t), temperature)) == pytest.approx(0, abs=1e-6)


def test_kd_loss_gradient_is_tempered_softmax_difference():
    """d/ds of T²·KL = T·(softmax(s/T) - softmax(t/T)) / rows."""
    rng = np.random.default_rng(1)
    s, t, temperature = rng.normal(size=(4, 6)), rng.normal(size=(4, 6)), 2.0
    student = torch.tensor(s, requires_grad=True)
    kd_loss(student, torch.tensor(t), temperature).backward()
    expected = temperature * (softmax(s / temperature) - softmax(t / temperature)) / 4
    np.testing.assert_allclose(student.grad.numpy(), expected, atol=1e-6)


def test_relative_mse_and_agreement():
    t = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    assert float(relative_mse(torch.zeros_like(t), t)) == pytest.approx(1.0)
    assert float(relative_mse(t, t)) == 0.0
    s = t + torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert float(relative_mse(s, t)) == pytest.approx((1 / 4) / (15 / 4))
    assert agreement(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[0.0, 2.0], [0.0, 2.0]])) == 0.5


def test_masked_helpers_keep_exact_positive_zeros():
    param = torch.nn.Parameter(torch.tensor([0.5, -0.25, 0.0]))
    mask = torch.tensor([True, False, True])
    param.grad = torch.ones(3)
    masked_grad_(param, mask)
    assert param.grad.tolist() == [1.0, 0.0, 1.0]
    masked_weight_(param, mask)
    assert param.tolist() == [0.5, 0.0, 0.0] and not torch.signbit(param[1])


def test_epoch_order_is_a_seeded_permutation_in_batches():
    batches = epoch_order(10, 4, torch.Generator().manual_seed(3))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    again = epoch_order(10, 4, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


def test_binary_kd_loss_matches_reference_and_keeps_a_gradient_when_saturated():
    rng = np.random.default_rng(3)
    s, t = rng.normal(0, 3, (4, 5)), rng.random((4, 5))
    p = 1 / (1 + np.exp(-s))
    cross = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    entropy = -(t * np.log(t) + (1 - t) * np.log(1 - t))
    got = binary_kd_loss(torch.tensor(s), torch.tensor(t))
    assert float(got) == pytest.approx(float(np.mean(cross - entropy)), rel=1e-5)
    assert float(binary_kd_loss(torch.logit(torch.tensor(t)), torch.tensor(t))) == pytest.approx(0.0, abs=1e-6)
    # A logit of -30 where the teacher says 0.9: gradient sigmoid(s) - t per element, not ~0.
    logits = torch.tensor([-30.0], requires_grad=True)
    binary_kd_loss(logits, torch.tensor([0.9])).backward()
    assert float(logits.grad) == pytest.approx(-0.9, abs=1e-6)
