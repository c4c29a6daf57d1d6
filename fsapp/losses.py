"""Losses: label-smoothed and soft-label cross-entropy, CW margin, OT cost matrix, TRADES's KL
term, and the outer loss of every training method (:class:`OuterLoss`).

Conventions follow the authors' reference code (see docs/ALGORITHM.md#label-smoothing): label
smoothing with factor ``d`` gives the true class ``1 - d`` and every other class ``d / (K - 1)``,
which equals PyTorch's ``label_smoothing = d * K / (K - 1)`` (NOT ``d``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from fsapp.method import Adversarial

Reduction = Literal["mean", "sum", "none"]

__all__ = [
    "LOSS_NAMES",
    "OuterLoss",
    "compute_dtype",
    "cost_matrix",
    "cw_margin_loss",
    "smoothed_targets",
    "soft_cross_entropy",
    "soft_label_cross_entropy",
    "trades_kl",
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


def soft_label_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, reduction: Reduction = "mean"
) -> torch.Tensor:
    """Cross-entropy of ``logits`` [B, K] against soft labels ``targets`` [B, K] (rows of
    probabilities): ``-sum_k t_k log softmax(z)_k`` per example. Float32 for half precision."""
    dtype = compute_dtype(logits.dtype)
    if targets.shape != logits.shape:
        raise ValueError(f"targets have shape {tuple(targets.shape)}, the logits {tuple(logits.shape)}")
    logp = F.log_softmax(logits.to(dtype), dim=1)
    return _reduce(-(targets.to(dtype) * logp).sum(dim=1), reduction)


def trades_kl(clean_logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
    """TRADES's robust term ``sum_i KL(p(x_i) || p(x'_i)) / B`` (KL summed over the batch, then
    divided by the batch size), ``p`` the softmax; gradients flow through both arguments."""
    dtype = compute_dtype(torch.promote_types(clean_logits.dtype, adv_logits.dtype))
    log_q = F.log_softmax(adv_logits.to(dtype), dim=1)
    p = F.softmax(clean_logits.to(dtype), dim=1)
    return F.kl_div(log_q, p, reduction="sum") / clean_logits.shape[0]


LOSS_NAMES = ("soft-ce", "ce", "trades")


@dataclass(frozen=True)
class OuterLoss:
    """The training loss on the perturbed batch, by name (``method.loss``):

    - ``soft-ce``: label-smoothed soft cross-entropy of ``f(x_adv)`` with factor ``smoothing``
      (the paper's); ``smoothing=0`` is cross-entropy and computed as such;
    - ``ce``: cross-entropy of ``f(x_adv)`` (``smoothing`` is ignored);
    - ``trades``: ``CE(f(x), y) + beta * sum_i KL(p(x_i) || p(x'_i)) / B`` (Zhang et al. 2019),
      gradients through both the clean and the adversarial forward.

    Soft labels from the perturbation (:class:`fsapp.method.Adversarial` ``targets``) replace the
    labels: ``soft-ce`` and ``ce`` become the soft-label cross-entropy of ``f(x_adv)`` against them,
    ``trades``'s clean term the soft-label cross-entropy of ``f(x)``. Runs in float32 for
    half-precision logits (float64 stays float64).
    """

    name: Literal["soft-ce", "ce", "trades"] = "soft-ce"
    smoothing: float = 0.5
    beta: float = 6.0

    def __post_init__(self) -> None:
        if self.name not in LOSS_NAMES:
            raise ValueError(f"loss must be one of {', '.join(LOSS_NAMES)}, got {self.name!r}")

    @property
    def uses_clean(self) -> bool:
        """Whether the loss needs the train-mode logits of the clean batch too."""
        return self.name == "trades"

    def __call__(
        self,
        logits: torch.Tensor,
        y: torch.Tensor,
        targets: torch.Tensor | None = None,
        clean: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of the adversarial ``logits`` (and, for ``trades``, the ``clean`` logits)."""
        logits = logits.to(compute_dtype(logits.dtype))
        if self.name == "trades":
            if clean is None:
                raise ValueError("the trades loss needs the clean logits too")
            clean = clean.to(compute_dtype(clean.dtype))
            natural = (F.cross_entropy(clean, y) if targets is None
                       else soft_label_cross_entropy(clean, targets))
            return natural + self.beta * trades_kl(clean, logits)
        if targets is not None:
            return soft_label_cross_entropy(logits, targets)
        if self.name == "soft-ce" and self.smoothing > 0:
            return soft_cross_entropy(logits, y, self.smoothing)
        return F.cross_entropy(logits, y)

    def on_batch(
        self, net: torch.nn.Module, x: torch.Tensor, adv: Adversarial, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The train-mode forwards this loss needs and its value: ``(loss, logits of x_adv)``.

        ``trades`` runs the clean batch first, then the adversarial one (two forwards, so
        BatchNorm normalises each batch with its own statistics, as the reference does)."""
        clean = net(x) if self.uses_clean else None
        logits = net(adv.x)
        return self(logits, y, adv.targets, clean), logits
