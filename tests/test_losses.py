"""Losses: label-smoothing convention, CW margin, cosine cost matrix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fsapp.losses import cost_matrix, cw_margin_loss, smoothed_targets, soft_cross_entropy


def test_smoothed_targets_paper_convention():
    y = torch.tensor([0, 3, 9])
    t = smoothed_targets(y, 10, 0.5)
    assert t.shape == (3, 10)
    assert torch.allclose(t.sum(1), torch.ones(3))
    assert torch.allclose(t[1, 3], torch.tensor(0.5))
    assert torch.allclose(t[1, 0], torch.tensor(0.5 / 9))
    assert torch.allclose(t[2, 9], torch.tensor(0.5))


@pytest.mark.parametrize("classes, pytorch_smoothing", [(10, 5 / 9), (100, 50 / 99)])
def test_soft_cross_entropy_equals_pytorch_label_smoothing(classes, pytorch_smoothing):
    g = torch.Generator().manual_seed(classes)
    logits = torch.randn(32, classes, generator=g) * 3
    y = torch.randint(0, classes, (32,), generator=g)
    ours = soft_cross_entropy(logits, y, smoothing=0.5)
    ref = F.cross_entropy(logits, y, label_smoothing=pytorch_smoothing)
    assert torch.allclose(ours, ref, atol=1e-6)
    # NOT PyTorch's label_smoothing=0.5
    peaked = torch.zeros(1, classes)
    peaked[0, 0] = 10.0
    y0 = torch.tensor([0])
    wrong = F.cross_entropy(peaked, y0, label_smoothing=0.5)
    assert (soft_cross_entropy(peaked, y0) - wrong).abs() > 0.01


def test_soft_cross_entropy_without_smoothing_is_cross_entropy_and_differentiable():
    logits = torch.randn(8, 10, requires_grad=True)
    y = torch.randint(0, 10, (8,))
    loss = soft_cross_entropy(logits, y, smoothing=0.0)
    assert torch.allclose(loss, F.cross_entropy(logits, y), atol=1e-6)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert soft_cross_entropy(logits, y, reduction="none").shape == (8,)


def test_soft_cross_entropy_half_logits_in_float32():
    logits = torch.randn(4, 10).to(torch.bfloat16)
    y = torch.randint(0, 10, (4,))
    assert soft_cross_entropy(logits, y).dtype == torch.float32


def test_smoothed_targets_validation():
    with pytest.raises(ValueError, match="2 classes"):
        smoothed_targets(torch.tensor([0]), 1, 0.5)
    with pytest.raises(ValueError, match="smoothing"):
        smoothed_targets(torch.tensor([0]), 10, 1.5)


def test_cw_margin_loss_matches_definition():
    logits = torch.tensor([[5.0, 1.0, 2.0], [0.0, 3.0, -1.0], [1.0, 100.0, 0.0]])
    y = torch.tensor([0, 0, 1])
    per = cw_margin_loss(logits, y, kappa=50.0, reduction="none")
    # -max(0, z_y - max_{j != y} z_j + kappa)
    assert torch.allclose(per, torch.tensor([-(5 - 2 + 50.0), -(0 - 3 + 50.0), -(100 - 1 + 50.0)]))
    assert torch.allclose(cw_margin_loss(logits, y), per.mean())
    # zero once the best wrong logit beats the true one by kappa
    assert cw_margin_loss(torch.tensor([[0.0, 10.0]]), torch.tensor([0]), kappa=5.0).item() == 0.0


def test_cw_margin_gradient_is_margin_gradient():
    logits = torch.tensor([[2.0, 1.0, 0.5]], requires_grad=True)
    cw_margin_loss(logits, torch.tensor([0])).backward()
    assert torch.allclose(logits.grad, torch.tensor([[-1.0, 1.0, 0.0]]))


def test_cost_matrix_is_clamped_cosine_distance():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 10, generator=g)
    b = torch.randn(7, 10, generator=g)
    C = cost_matrix(a, b)
    ref = torch.clamp(1 - F.cosine_similarity(a[:, None, :], b[None, :, :], dim=2), min=0)
    assert C.shape == (7, 7)
    assert torch.allclose(C, ref, atol=1e-6)
    assert (C >= 0).all() and (C <= 2 + 1e-6).all()
    assert torch.allclose(cost_matrix(a, a).diagonal(), torch.zeros(7), atol=1e-6)
    # rows clean, columns perturbed
    assert torch.allclose(cost_matrix(a, b), cost_matrix(b, a).t(), atol=1e-7)


@pytest.mark.parametrize(
    "dtype, expected",
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_cost_matrix_dtype(dtype, expected):
    a = torch.randn(5, 10).to(dtype)
    b = torch.randn(5, 10).to(dtype)
    C = cost_matrix(a, b)
    assert C.dtype == expected
    ref = cost_matrix(a.double(), b.double())
    assert torch.allclose(C.double(), ref, atol=1e-5)


def test_cost_matrix_zero_vector_is_finite_and_flattens():
    a = torch.zeros(3, 2, 5)
    b = torch.randn(3, 2, 5)
    C = cost_matrix(a, b)
    assert C.shape == (3, 3) and torch.isfinite(C).all()
