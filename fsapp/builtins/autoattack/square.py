"""Square Attack (Andriushchenko et al. 2020), L-inf, margin loss: score-based random search.
Follows the reference (fra31/auto-attack ``square.py``, as ported to torchattacks) draw for draw."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from fsapp.adversary import eval_mode
from fsapp.builtins.autoattack.common import (
    LinfAttack,
    bshape,
    check_common,
    keep_fooled,
    logits_of,
    seed_draws,
)


def _p_selection(p_init: float, it: int, n_queries: int, rescale: bool) -> float:
    """The schedule of the square size (fraction of pixels) over the queries."""
    if rescale:
        it = int(it / n_queries * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
                       (6000, 128), (8000, 256)):
        if it <= bound:
            return p_init / div
    return p_init / 512


def _margin(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``z_y - max_{j != y} z_j`` in float32 (the reference's margin, in fewer operations)."""
    z = logits_of(model, x).to(torch.float32)
    label = y.unsqueeze(1)
    return z.gather(1, label).squeeze(1) - z.scatter(1, label, -float("inf")).amax(1)


def _random_sign(shape: list[int], device: torch.device) -> Tensor:
    return torch.sign(2 * torch.rand(shape).to(device) - 1)


def _random_int(low: int, high: int) -> int:
    return int((low + (high - low) * torch.rand([1])).long())


def _square_run(model: nn.Module, x: Tensor, y: Tensor, eps: float, n_queries: int, p_init: float,
                rescale: bool) -> Tensor:
    """One Square run (margin loss); returns the best point found for each sample.

    The reference's arithmetic, value for value, with less work per query: the ball-and-box clip
    ``clamp(min(max(v, x - eps), x + eps), 0, 1)`` is one clamp to precomputed bounds (the same
    selection of values), and only the square that changes is added and clipped (outside it the
    reference adds zero to a point already inside the bounds, which leaves it unchanged).
    """
    c, h, w = x.shape[1:]
    n_features = c * h * w
    lower = (x - eps).clamp(0.0, 1.0)
    upper = (x + eps).clamp(0.0, 1.0)
    x_best = torch.clamp(x + eps * _random_sign([x.shape[0], c, 1, w], x.device), 0.0, 1.0)
    margin_min = _margin(model, x_best, y)
    shape = bshape(x)
    n = x.shape[0]
    for i_iter in range(n_queries):
        idx = (margin_min > 0.0).nonzero().flatten()
        if idx.numel() == 0:
            break
        everyone = idx.numel() == n  # no point fooled yet: work on the whole tensors, no gathers
        x_best_curr = x_best if everyone else x_best[idx]
        margin_min_curr = margin_min if everyone else margin_min[idx]
        p = _p_selection(p_init, i_iter, n_queries, rescale)
        s = max(int(round(math.sqrt(p * n_features / c))), 1)
        vh = _random_int(0, h - s)
        vw = _random_int(0, w - s)
        delta = 2.0 * eps * _random_sign([c, 1, 1], x.device)
        x_new = x_best_curr.clone()
        win = (slice(None), slice(None), slice(vh, vh + s), slice(vw, vw + s))
        low, high = (lower, upper) if everyone else (lower[idx], upper[idx])
        x_new[win] = torch.clamp(x_best_curr[win] + delta, low[win], high[win])
        margin = _margin(model, x_new, y if everyone else y[idx])
        improved = (margin < margin_min_curr) | (margin <= 0.0)
        if everyone:
            margin_min = torch.where(improved, margin, margin_min)
            x_best = torch.where(improved.view(shape), x_new, x_best)
        else:
            margin_min[idx] = torch.where(improved, margin, margin_min_curr)
            x_best[idx] = torch.where(improved.view(shape), x_new, x_best_curr)
    return x_best


def square_linf(model: nn.Module, x: Tensor, y: Tensor, eps: float = 8 / 255, n_queries: int = 5000,
                p_init: float = 0.8, restarts: int = 1, rescale_schedule: bool = False,
                seed: int | None = None) -> Tensor:
    """Square Attack (Andriushchenko et al. 2020), Linf, margin loss: score-based random search."""
    with torch.no_grad(), eval_mode(model):
        if x.dim() != 4:
            raise ValueError(f"Square needs images [N, C, H, W], got shape {tuple(x.shape)}")
        x = x.detach().clone()
        y = y.detach().clone()
        adv = x.clone()
        acc = logits_of(model, x).max(1)[1] == y
        seed_draws(seed)
        for _ in range(restarts):
            ind = acc.nonzero().flatten()
            if ind.numel() == 0:
                break
            xs, ys = x[ind], y[ind]
            adv_curr = _square_run(model, xs, ys, eps, n_queries, p_init, rescale_schedule)
            keep_fooled(acc, adv, ind, model(adv_curr).max(1)[1] != ys, adv_curr)
        return adv



@dataclass
class SquareParams:
    """Square Attack: score-based random search with square updates (margin loss)."""

    eps: float = 8 / 255
    queries: int = 5000
    p_init: float = 0.8
    restarts: int = 1
    rescale_schedule: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        check_common(self.eps, self.restarts)
        if self.queries < 1:
            raise ValueError(f"queries must be >= 1, got {self.queries}")
        if not 0 < self.p_init <= 1:
            raise ValueError(f"p_init must be in (0, 1], got {self.p_init}")



class Square(LinfAttack):
    """``square``: score-based (no gradients): ``attack(model, x, y) -> x_adv``."""

    access = "score"
    loss = "margin"

    def __init__(self, p: SquareParams) -> None:
        self.p = p
        self.eps = p.eps

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        p = self.p
        return square_linf(model, x, y, p.eps, p.queries, p.p_init, p.restarts, p.rescale_schedule, p.seed)

