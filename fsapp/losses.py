"""Losses of Feature Scattering: label-smoothed soft cross-entropy, CW margin, OT cost matrix.

Conventions follow the authors' reference code (see REFERENCE.md): label smoothing with factor
``d`` gives the true class ``1 - d`` and every other class ``d / (K - 1)``, which equals PyTorch's
``label_smoothing = d * K / (K - 1)`` (NOT ``d``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "sum", "none"]

__all__ = [
    "OuterLoss",
    "compute_dtype",
    "cost_matrix",
    "cw_margin_loss",
    "smoothed_targets",
    "soft_cross_entropy",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype numerics run in: float64 stays float64, everything else becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reduce(values: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def smoothed_targets(
    y: torch.Tensor, num_classes: int, smoothing: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Soft targets ``(1 - d - d/(K-1)) * onehot + d/(K-1)``.

    True class ``1 - d``, every other class ``d/(K-1)`` (the reference code's convention).
    """
    if num_classes < 2:
        raise ValueError(f"label smoothing needs at least 2 classes, got {num_classes}")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
    off = smoothing / (num_classes - 1)
    onehot = F.one_hot(y.long(), num_classes).to(dtype)
    return onehot * (1.0 - smoothing - off) + off


def soft_cross_entropy(
    logits: torch.Tensor, y: torch.Tensor, smoothing: float = 0.5, reduction: Reduction = "mean"
) -> torch.Tensor:
    """Cross-entropy of ``logits`` [B, K] against :func:`smoothed_targets` (mean over the batch).

    Computed in float32 for half-precision logits. ``smoothing=0`` is the ordinary cross-entropy.
    """
    dtype = compute_dtype(logits.dtype)
    logp = F.log_softmax(logits.to(dtype), dim=1)
    targets = smoothed_targets(y, logits.shape[1], smoothing, dtype=dtype)
    return _reduce(-(targets * logp).sum(dim=1), reduction)


def cw_margin_loss(
    logits: torch.Tensor, y: torch.Tensor, kappa: float = 50.0, reduction: Reduction = "mean"
) -> torch.Tensor:
    """The CW loss attacks ascend: ``-max(0, z_y - max_{j != y} z_j + kappa)``.

    It is 0 once the best wrong logit beats the true one by ``kappa``; below that its gradient is
    the gradient of the margin ``max_{j != y} z_j - z_y``.
    """
    z = logits.to(compute_dtype(logits.dtype))
    mask = F.one_hot(y.long(), z.shape[1]).bool()
    true_logit = z.gather(1, y.long().view(-1, 1)).squeeze(1)
    wrong_logit = z.masked_fill(mask, float("-inf")).amax(dim=1)
    return _reduce(-torch.clamp(true_logit - wrong_logit + kappa, min=0.0), reduction)


def cost_matrix(z_clean: torch.Tensor, z_adv: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine cost ``C_ij = max(0, 1 - cos(z_i, z'_j))`` [B, B]: rows clean, columns perturbed.

    Runs in float32 (float64 stays float64); bf16/fp16 inputs are upcast first. Inputs of any
    shape [B, ...] are flattened per sample. Norms are clamped at ``eps`` (as
    ``F.cosine_similarity`` does).
    """
    dtype = compute_dtype(torch.promote_types(z_clean.dtype, z_adv.dtype))
    a = z_clean.reshape(z_clean.shape[0], -1).to(dtype)
    b = z_adv.reshape(z_adv.shape[0], -1).to(dtype)
    a = a / a.norm(dim=1, keepdim=True).clamp_min(eps)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(eps)
    return torch.clamp(1.0 - a @ b.t(), min=0.0)


@dataclass(frozen=True)
class OuterLoss:
    """The training loss on the perturbed batch, by name: ``soft-ce`` (label-smoothed soft
    cross-entropy with factor ``smoothing``, the paper's) or ``ce`` (cross-entropy; ``smoothing``
    is ignored). ``soft-ce`` with ``smoothing=0`` is cross-entropy and computed as such. Runs in
    float32 for half-precision logits (float64 stays float64)."""

    name: Literal["soft-ce", "ce"] = "soft-ce"
    smoothing: float = 0.5

    def __post_init__(self) -> None:
        if self.name not in ("soft-ce", "ce"):
            raise ValueError(f"loss must be soft-ce or ce, got {self.name!r}")

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = logits.to(compute_dtype(logits.dtype))
        if self.name == "soft-ce" and self.smoothing > 0:
            return soft_cross_entropy(logits, y, self.smoothing)
        return F.cross_entropy(logits, y)
