"""AutoAttack (Croce & Hein 2020), native: APGD-CE, APGD-DLR, APGD-T, FAB-T, Square, and the ensemble.

The algorithms follow the reference implementation (github fra31/auto-attack) as ported to
torchattacks (MIT licence), step for step and random draw for draw, so that with the same seed
and the same batch they return the same examples; loops avoid host syncs where the reference
indexes with ``nonzero``. Linf only.

``autoattack`` is the *standard* version (the RobustBench protocol): APGD-CE (100 iterations,
1 restart), then APGD-T (DLR loss, 9 target classes, 100 iterations), then FAB-T (9 target
classes, 100 iterations), then Square (5000 queries), each on the points still robust. It takes
no knobs but ``eps`` and ``seed``; ``autoattack-fast`` is a cheaper variant with its own name.

Every attack object carries its threat model and kind for the evaluator: ``norm``, ``eps``,
``access`` ("gradient" or "score") and ``loss``; the ensembles expose ``stages`` (name, attack)
that the evaluator runs in order on the points still robust, checking each stage's examples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fsapp.builtins.perturbations import eval_mode, input_grad_mode
from fsapp.hookspecs import hookimpl
from fsapp.losses import compute_dtype

__all__ = [
    "APGD",
    "AutoAttack",
    "FABTargeted",
    "Square",
    "apgd",
    "dlr_loss",
    "dlr_loss_targeted",
    "fab_targeted",
    "square_linf",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- helpers


def _seed(seed: int | None) -> None:
    """Reseed like the reference does at the start of each attack (``None``: keep the stream)."""
    if seed is not None:
        torch.random.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)


def _bshape(x: Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (x.dim() - 1)


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)


def _ce(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.to(compute_dtype(logits.dtype)), y, reduction="none")


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Difference of logits ratio (untargeted), per sample; needs at least 3 classes."""
    z = logits.to(compute_dtype(logits.dtype))
    z_sorted, ind_sorted = z.sort(dim=1)
    ind = (ind_sorted[:, -1] == y).float()
    u = torch.arange(z.shape[0], device=z.device)
    return -(z[u, y] - z_sorted[:, -2] * ind - z_sorted[:, -1] * (1.0 - ind)) / (
        z_sorted[:, -1] - z_sorted[:, -3] + 1e-12
    )


def dlr_loss_targeted(logits: Tensor, y: Tensor, y_target: Tensor) -> Tensor:
    """Targeted DLR loss, per sample; needs at least 4 classes."""
    z = logits.to(compute_dtype(logits.dtype))
    z_sorted, _ = z.sort(dim=1)
    u = torch.arange(z.shape[0], device=z.device)
    return -(z[u, y] - z[u, y_target]) / (z_sorted[:, -1] - 0.5 * z_sorted[:, -3] - 0.5 * z_sorted[:, -4] + 1e-12)


def _check_common(eps: float, restarts: int) -> None:
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be >= 0, got {eps}")
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}")


# --------------------------------------------------------------------------- APGD


def _apgd_run(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, rho: float,
              loss_fn: LossFn) -> tuple[Tensor, Tensor]:
    """One APGD run from a random start; returns (robust after every iterate, first fooling iterate)."""
    n = x.shape[0]
    shape = _bshape(x)
    steps_2, steps_min, size_decr = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    t = 2 * torch.rand(x.shape).to(x.device) - 1
    x_adv = x + eps * torch.ones(n, *([1] * (x.dim() - 1)), device=x.device) * t / (
        t.reshape(n, -1).abs().max(dim=1, keepdim=True)[0].reshape(shape)
    )
    x_adv = x_adv.clamp(0.0, 1.0)
    x_best = x_adv.clone()
    x_best_adv = x_adv.clone()
    loss_steps = torch.zeros(steps, n, device=x.device)

    x_adv.requires_grad_(True)
    logits = model(x_adv)
    loss_indiv = loss_fn(logits, y)
    grad = torch.autograd.grad(loss_indiv.sum(), [x_adv])[0].detach()
    x_adv = x_adv.detach()
    grad_best = grad.clone()
    acc = logits.detach().max(1)[1] == y
    loss_best = loss_indiv.detach().clone()

    step_size = eps * torch.ones(n, *([1] * (x.dim() - 1)), device=x.device) * 2.0
    x_adv_old = x_adv.clone()
    k = steps_2
    counter3 = 0
    loss_best_last_check = loss_best.clone()
    reduced_last_check = torch.ones(n, dtype=torch.bool, device=x.device)

    for i in range(steps):
        with torch.no_grad():
            grad2 = x_adv - x_adv_old
            x_adv_old = x_adv.clone()
            a = 0.75 if i > 0 else 1.0
            x_adv_1 = x_adv + step_size * torch.sign(grad)
            x_adv_1 = torch.clamp(torch.min(torch.max(x_adv_1, x - eps), x + eps), 0.0, 1.0)
            x_adv_1 = torch.clamp(
                torch.min(torch.max(x_adv + (x_adv_1 - x_adv) * a + grad2 * (1 - a), x - eps), x + eps), 0.0, 1.0
            )
            x_adv = x_adv_1 + 0.0

        x_adv.requires_grad_(True)
        logits = model(x_adv)
        loss_indiv = loss_fn(logits, y)
        grad = torch.autograd.grad(loss_indiv.sum(), [x_adv])[0].detach()
        x_adv = x_adv.detach()

        with torch.no_grad():
            pred = logits.detach().max(1)[1] == y
            acc = acc & pred
            x_best_adv = torch.where((~pred).view(shape), x_adv, x_best_adv)
            y1 = loss_indiv.detach().float()
            loss_steps[i] = y1
            better = y1 > loss_best
            x_best = torch.where(better.view(shape), x_adv, x_best)
            grad_best = torch.where(better.view(shape), grad, grad_best)
            loss_best = torch.where(better, y1, loss_best)

            counter3 += 1
            if counter3 == k:
                rows = torch.tensor([(i - c) % steps for c in range(k)], device=x.device)
                prev = torch.tensor([(i - c - 1) % steps for c in range(k)], device=x.device)
                increases = (loss_steps[rows] > loss_steps[prev]).sum(0)
                fl_osc = increases <= k * rho
                fl_reduce_no_impr = (~reduced_last_check) & (loss_best_last_check >= loss_best)
                fl_osc = fl_osc | fl_reduce_no_impr
                reduced_last_check = fl_osc.clone()
                loss_best_last_check = loss_best.clone()
                osc = fl_osc.view(shape)
                step_size = torch.where(osc, step_size / 2.0, step_size)
                x_adv = torch.where(osc, x_best, x_adv)
                grad = torch.where(osc, grad_best, grad)
                counter3 = 0
                k = max(k - size_decr, steps_min)
    return acc, x_best_adv


def apgd(model: nn.Module, x: Tensor, y: Tensor, eps: float = 8 / 255, steps: int = 100, restarts: int = 1,
         loss: str = "ce", targets: int = 0, rho: float = 0.75, seed: int | None = None,
         strict: bool = True) -> Tensor:
    """APGD with ``loss`` "ce" or "dlr", or targeted DLR over ``targets`` classes (``targets > 0``).

    Each restart (and each target class) runs only on the points still robust; a point fooled at
    any iterate returns that iterate. With too few classes for the loss (DLR: 3, targeted: 4) it
    raises, or with ``strict=False`` returns ``x`` unchanged (AutoAttack skips the stage).
    """
    with input_grad_mode(), eval_mode(model):
        x = x.detach().clone()
        y = y.detach().clone()
        adv = x.clone()
        logits = _logits(model, x)
        acc = logits.max(1)[1] == y
        n_classes = logits.shape[1]
        _seed(seed)
        needed = 4 if targets > 0 else 3 if loss == "dlr" else 2
        if n_classes < needed:
            if strict:
                raise ValueError(f"APGD with this loss needs at least {needed} classes, the model has {n_classes}")
            return adv
        ranks: list[int | None] = list(range(2, min(targets, n_classes - 1) + 2)) if targets > 0 else [None]
        for rank in ranks:
            for _ in range(restarts):
                ind = acc.nonzero().flatten()
                if ind.numel() == 0:
                    break
                xs, ys = x[ind], y[ind]
                if rank is not None:
                    y_target = _logits(model, xs).sort(dim=1)[1][:, -rank]

                    def loss_fn(z: Tensor, t: Tensor, y_target: Tensor = y_target) -> Tensor:
                        return dlr_loss_targeted(z, t, y_target)
                else:
                    loss_fn = _ce if loss == "ce" else dlr_loss
                acc_curr, adv_curr = _apgd_run(model, xs, ys, eps, steps, rho, loss_fn)
                fooled = ~acc_curr
                acc[ind[fooled]] = False
                adv[ind[fooled]] = adv_curr[fooled]
        return adv.detach()


# --------------------------------------------------------------------------- FAB (targeted)


def projection_linf(points_to_project: Tensor, w_hyperplane: Tensor, b_hyperplane: Tensor) -> Tensor:
    """Minimal Linf step from each point onto its hyperplane ``w.x = b`` within the [0, 1] box.

    The batched bisection of the FAB reference implementation (fra31/auto-attack, torchattacks).
    """
    device = points_to_project.device
    t, w, b = points_to_project, w_hyperplane.clone(), b_hyperplane.clone()

    sign = 2 * ((w * t).sum(1) - b >= 0) - 1
    w.mul_(sign.unsqueeze(1))
    b.mul_(sign)

    a = (w < 0).float()
    d = (a - t) * (w != 0).float()

    p = a - t * (2 * a - 1)
    indp = torch.argsort(p, dim=1)

    b = b - (w * t).sum(1)
    b0 = (w * d).sum(1)

    indp2 = indp.flip((1,))
    ws = w.gather(1, indp2)
    bs2 = -ws * d.gather(1, indp2)

    s = torch.cumsum(ws.abs(), dim=1)
    sb = torch.cumsum(bs2, dim=1) + b0.unsqueeze(1)

    b2 = sb[:, -1] - s[:, -1] * p.gather(1, indp[:, 0:1]).squeeze(1)
    c_l = b - b2 > 0
    c2 = (b - b0 > 0) & (~c_l)
    lb = torch.zeros(int(c2.sum()), device=device)
    ub = torch.full_like(lb, w.shape[1] - 1)
    nitermax = math.ceil(math.log2(w.shape[1]))

    indp_, sb_, s_, p_, b_ = indp[c2], sb[c2], s[c2], p[c2], b[c2]
    for _ in range(nitermax):
        counter4 = torch.floor((lb + ub) / 2)
        counter2 = counter4.long().unsqueeze(1)
        indcurr = indp_.gather(1, indp_.size(1) - 1 - counter2)
        b2 = (sb_.gather(1, counter2) - s_.gather(1, counter2) * p_.gather(1, indcurr)).squeeze(1)
        c = b_ - b2 > 0
        lb = torch.where(c, counter4, lb)
        ub = torch.where(c, ub, counter4)
    lb = lb.long()

    if c_l.any():
        lmbd_opt = torch.clamp_min((b[c_l] - sb[c_l, -1]) / (-s[c_l, -1]), min=0).unsqueeze(-1)
        d[c_l] = (2 * a[c_l] - 1) * lmbd_opt

    lmbd_opt = torch.clamp_min((b[c2] - sb[c2, lb]) / (-s[c2, lb]), min=0).unsqueeze(-1)
    d[c2] = torch.min(lmbd_opt, d[c2]) * a[c2] + torch.max(-lmbd_opt, d[c2]) * (1 - a[c2])

    return d * (w != 0).float()


def _fab_targeted_run(model: nn.Module, x: Tensor, y: Tensor, rank: int, eps: float, steps: int,
                      alpha_max: float, eta: float, beta: float, rand_start: bool) -> Tensor:
    """One FAB-T run towards the ``rank``-th most likely class; points not fooled return x."""
    logits = _logits(model, x)
    pred = logits.max(1)[1] == y
    if not bool(pred.any()):
        return x
    keep = pred.nonzero().flatten()
    la_target = logits.sort(dim=-1)[1][:, -rank]
    im2, la2, la_target2 = x[keep].clone(), y[keep].clone(), la_target[keep].clone()
    bs = im2.shape[0]
    shape = _bshape(im2)
    u1 = torch.arange(bs, device=x.device)
    adv = im2.clone()
    adv_c = x.clone()
    res2 = 1e10 * torch.ones(bs, device=x.device)
    x1 = im2.clone()
    x0 = im2.clone().reshape(bs, -1)
    if rand_start:
        t = 2 * torch.rand(x1.shape).to(x.device) - 1
        x1 = im2 + torch.min(res2, eps * torch.ones_like(res2)).reshape(shape) * t / (
            t.reshape(bs, -1).abs().max(dim=1, keepdim=True)[0].reshape(shape)) * 0.5
        x1 = x1.clamp(0.0, 1.0)

    for _ in range(steps):
        im = x1.clone().requires_grad_(True)
        z = model(im)
        diffy = -(z[u1, la2] - z[u1, la_target2])
        (g,) = torch.autograd.grad(diffy.sum(), im)
        with torch.no_grad():
            df = diffy.detach().unsqueeze(1)
            dg = g.detach().unsqueeze(1)
            dist1 = df.abs() / (1e-12 + dg.abs().reshape(dg.shape[0], dg.shape[1], -1).sum(dim=-1))
            ind = dist1.min(dim=1)[1]
            dg2 = dg[u1, ind]
            b = -df[u1, ind] + (dg2 * x1).reshape(bs, -1).sum(dim=-1)
            w = dg2.reshape(bs, -1)
            d3 = projection_linf(torch.cat((x1.reshape(bs, -1), x0), 0), torch.cat((w, w), 0), torch.cat((b, b), 0))
            d1 = d3[:bs].reshape(x1.shape)
            d2 = d3[-bs:].reshape(x1.shape)
            a0 = d3.abs().max(dim=1, keepdim=True)[0].reshape(-1, *([1] * (x1.dim() - 1)))
            a0 = torch.max(a0, 1e-8 * torch.ones_like(a0))
            a1, a2 = a0[:bs], a0[-bs:]
            alpha = torch.min(torch.max(a1 / (a1 + a2), torch.zeros_like(a1)), alpha_max * torch.ones_like(a1))
            x1 = ((x1 + eta * d1) * (1 - alpha) + (im2 + d2 * eta) * alpha).clamp(0.0, 1.0)
            is_adv = model(x1).max(1)[1] != la2
            t = (x1 - im2).reshape(bs, -1).abs().max(dim=1)[0]
            better = is_adv & (t < res2)
            adv = torch.where(better.view(shape), x1, adv)
            res2 = torch.where(better, t, res2)
            x1 = torch.where(is_adv.view(shape), im2 + (x1 - im2) * beta, x1)

    ind_succ = res2 < 1e10
    adv_c[keep[ind_succ]] = adv[ind_succ]
    return adv_c


def fab_targeted(model: nn.Module, x: Tensor, y: Tensor, eps: float = 8 / 255, steps: int = 100, targets: int = 9,
                 restarts: int = 1, alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9,
                 seed: int | None = None) -> Tensor:
    """FAB-T: minimal-distortion targeted FAB towards each of the top ``targets`` other classes.

    An example counts only when it is misclassified within ``eps``; each target and restart runs
    on the points still robust.
    """
    with input_grad_mode(), eval_mode(model):
        x = x.detach().clone()
        y = y.detach().clone()
        adv = x.clone()
        logits = _logits(model, x)
        acc = logits.max(1)[1] == y
        n_classes = logits.shape[1]
        _seed(seed)
        for rank in range(2, min(targets, n_classes - 1) + 2):
            for counter in range(restarts):
                ind = acc.nonzero().flatten()
                if ind.numel() == 0:
                    break
                xs, ys = x[ind], y[ind]
                adv_curr = _fab_targeted_run(model, xs, ys, rank, eps, steps, alpha_max, eta, beta, counter > 0)
                with torch.no_grad():
                    acc_curr = model(adv_curr).max(1)[1] == ys
                res = (xs - adv_curr).abs().reshape(xs.shape[0], -1).max(1)[0]
                acc_curr = acc_curr | (res > eps)
                fooled = ~acc_curr
                acc[ind[fooled]] = False
                adv[ind[fooled]] = adv_curr[fooled]
        return adv.detach()


# --------------------------------------------------------------------------- Square


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
    z = _logits(model, x).to(torch.float32)
    u = torch.arange(x.shape[0], device=x.device)
    y_corr = z[u, y].clone()
    z[u, y] = -float("inf")
    return y_corr - z.max(dim=-1)[0]


def _random_sign(shape: list[int], device: torch.device) -> Tensor:
    return torch.sign(2 * torch.rand(shape).to(device) - 1)


def _random_int(low: int, high: int) -> int:
    return int((low + (high - low) * torch.rand([1])).long())


def _square_run(model: nn.Module, x: Tensor, y: Tensor, eps: float, n_queries: int, p_init: float,
                rescale: bool) -> Tensor:
    """One Square run (margin loss); returns the best point found for each sample."""
    c, h, w = x.shape[1:]
    n_features = c * h * w
    x_best = torch.clamp(x + eps * _random_sign([x.shape[0], c, 1, w], x.device), 0.0, 1.0)
    margin_min = _margin(model, x_best, y)
    for i_iter in range(n_queries):
        idx = (margin_min > 0.0).nonzero().flatten()
        if idx.numel() == 0:
            break
        x_curr = x[idx]
        x_best_curr = x_best[idx]
        y_curr = y[idx]
        margin_min_curr = margin_min[idx]
        p = _p_selection(p_init, i_iter, n_queries, rescale)
        s = max(int(round(math.sqrt(p * n_features / c))), 1)
        vh = _random_int(0, h - s)
        vw = _random_int(0, w - s)
        new_deltas = torch.zeros([c, h, w], device=x.device)
        new_deltas[:, vh:vh + s, vw:vw + s] = 2.0 * eps * _random_sign([c, 1, 1], x.device)
        x_new = x_best_curr + new_deltas
        x_new = torch.min(torch.max(x_new, x_curr - eps), x_curr + eps).clamp(0.0, 1.0)
        margin = _margin(model, x_new, y_curr)
        improved = (margin < margin_min_curr) | (margin <= 0.0)
        margin_min[idx] = torch.where(improved, margin, margin_min_curr)
        x_best[idx] = torch.where(improved.view(_bshape(x_new)), x_new, x_best_curr)
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
        acc = _logits(model, x).max(1)[1] == y
        _seed(seed)
        for _ in range(restarts):
            ind = acc.nonzero().flatten()
            if ind.numel() == 0:
                break
            xs, ys = x[ind], y[ind]
            adv_curr = _square_run(model, xs, ys, eps, n_queries, p_init, rescale_schedule)
            fooled = model(adv_curr).max(1)[1] != ys
            acc[ind[fooled]] = False
            adv[ind[fooled]] = adv_curr[fooled]
        return adv


# --------------------------------------------------------------------------- parameters


@dataclass
class APGDParams:
    """APGD (Croce & Hein 2020): PGD with momentum and an automatic step-size schedule."""

    eps: float = 8 / 255
    steps: int = 100
    restarts: int = 1
    rho: float = 0.75
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_common(self.eps, self.restarts)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0 < self.rho <= 1:
            raise ValueError(f"rho must be in (0, 1], got {self.rho}")


@dataclass
class APGDTParams(APGDParams):
    """APGD-T: targeted DLR loss, one run per target class (the top ``targets`` wrong classes)."""

    targets: int = 9

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.targets < 1:
            raise ValueError(f"targets must be >= 1, got {self.targets}")


@dataclass
class FABTParams:
    """FAB-T (Croce & Hein 2020): minimal-distortion targeted attack; counts within eps only."""

    eps: float = 8 / 255
    steps: int = 100
    targets: int = 9
    restarts: int = 1
    alpha_max: float = 0.1
    eta: float = 1.05
    beta: float = 0.9
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_common(self.eps, self.restarts)
        if self.steps < 1 or self.targets < 1:
            raise ValueError("steps and targets must be >= 1")


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
        _check_common(self.eps, self.restarts)
        if self.queries < 1:
            raise ValueError(f"queries must be >= 1, got {self.queries}")
        if not 0 < self.p_init <= 1:
            raise ValueError(f"p_init must be in (0, 1], got {self.p_init}")


@dataclass
class AutoAttackParams:
    """AutoAttack, standard version: APGD-CE, APGD-T, FAB-T, Square at the reference settings."""

    eps: float = 8 / 255
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_common(self.eps, 1)


@dataclass
class AutoAttackFastParams:
    """A cheaper AutoAttack-like ensemble (NOT the standard version): APGD-CE, APGD-T, [FAB-T], Square."""

    eps: float = 8 / 255
    steps: int = 20
    targets: int = 3
    fab: bool = False
    queries: int = 1000
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_common(self.eps, 1)
        if self.steps < 1 or self.targets < 1 or self.queries < 0:
            raise ValueError("steps and targets must be >= 1, queries >= 0")


# --------------------------------------------------------------------------- components


class _Linf:
    """Shared attributes: the threat model and the kind of access an attack needs."""

    norm = "Linf"
    access = "gradient"
    loss = "ce"
    eps: float

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class APGD(_Linf):
    """``apgd-ce`` / ``apgd-dlr`` / ``apgd-t``: ``attack(model, x, y) -> x_adv``."""

    def __init__(self, p: APGDParams, loss: str = "ce", targets: int = 0, strict: bool = True) -> None:
        self.eps, self.steps, self.restarts, self.rho, self.seed = p.eps, p.steps, p.restarts, p.rho, p.seed
        self.loss = "margin" if loss == "dlr" or targets else "ce"
        self.dlr = loss == "dlr"
        self.targets = targets
        self.strict = strict

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return apgd(model, x, y, self.eps, self.steps, self.restarts, "dlr" if self.dlr else "ce", self.targets,
                    self.rho, self.seed, self.strict)


class FABTargeted(_Linf):
    """``fab-t``: ``attack(model, x, y) -> x_adv``."""

    loss = "margin"

    def __init__(self, p: FABTParams) -> None:
        self.p = p
        self.eps = p.eps

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        p = self.p
        return fab_targeted(model, x, y, p.eps, p.steps, p.targets, p.restarts, p.alpha_max, p.eta, p.beta, p.seed)


class Square(_Linf):
    """``square``: score-based (no gradients): ``attack(model, x, y) -> x_adv``."""

    access = "score"
    loss = "margin"

    def __init__(self, p: SquareParams) -> None:
        self.p = p
        self.eps = p.eps

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        p = self.p
        return square_linf(model, x, y, p.eps, p.queries, p.p_init, p.restarts, p.rescale_schedule, p.seed)


class AutoAttack(_Linf):
    """An ensemble whose ``stages`` run in order, each on the points the previous ones left robust.

    Called directly it runs the cascade itself; :func:`fsapp.engine.evaluate.evaluate` runs the
    stages one by one instead, checking and reporting each.
    """

    loss = "mixed"

    def __init__(self, eps: float, stages: list[tuple[str, _Linf]]) -> None:
        self.eps = eps
        self.stages = stages

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with eval_mode(model):
            adv = x.detach().clone()
            robust = _logits(model, x).max(1)[1] == y
            for _, stage in self.stages:
                ind = robust.nonzero().flatten()
                if ind.numel() == 0:
                    break
                out = stage(model, x[ind], y[ind])
                fooled = _logits(model, out).max(1)[1] != y[ind]
                adv[ind[fooled]] = out[fooled]
                robust[ind[fooled]] = False
            return adv


def standard_autoattack(p: AutoAttackParams) -> AutoAttack:
    """The standard version, at the reference settings."""
    return AutoAttack(p.eps, [
        ("apgd-ce", APGD(APGDParams(eps=p.eps, steps=100, restarts=1, seed=p.seed), "ce")),
        ("apgd-t", APGD(APGDParams(eps=p.eps, steps=100, restarts=1, seed=p.seed), "dlr", targets=9, strict=False)),
        ("fab-t", FABTargeted(FABTParams(eps=p.eps, steps=100, targets=9, restarts=1, seed=p.seed))),
        ("square", Square(SquareParams(eps=p.eps, queries=5000, restarts=1, seed=p.seed))),
    ])


def fast_autoattack(p: AutoAttackFastParams) -> AutoAttack:
    """The cheaper variant (for live evaluation during training)."""
    stages: list[tuple[str, _Linf]] = [
        ("apgd-ce", APGD(APGDParams(eps=p.eps, steps=p.steps, seed=p.seed), "ce")),
        ("apgd-t", APGD(APGDParams(eps=p.eps, steps=p.steps, seed=p.seed), "dlr", targets=p.targets, strict=False)),
    ]
    if p.fab:
        stages.append(("fab-t", FABTargeted(FABTParams(eps=p.eps, steps=p.steps, targets=p.targets, seed=p.seed))))
    if p.queries > 0:
        stages.append(("square", Square(SquareParams(eps=p.eps, queries=p.queries, seed=p.seed))))
    return AutoAttack(p.eps, stages)


@hookimpl
def register_attacks(register) -> None:  # noqa: ANN001 - the hook's register callback
    """Register APGD, FAB-T, Square and the AutoAttack ensembles."""
    register("apgd-ce", lambda p: APGD(p, "ce"), params=APGDParams,
             description="APGD on cross-entropy (AutoAttack's first stage; 100 steps)")
    register("apgd-dlr", lambda p: APGD(p, "dlr"), params=APGDParams,
             description="APGD on the DLR margin loss (untargeted)")
    register("apgd-t", lambda p: APGD(p, "dlr", targets=p.targets), params=APGDTParams,
             description="APGD on the targeted DLR loss, top-9 target classes (AutoAttack's APGD-T)")
    register("fab-t", FABTargeted, params=FABTParams,
             description="targeted FAB, minimal Linf distortion, top-9 target classes (AutoAttack's FAB-T)")
    register("square", Square, params=SquareParams,
             description="Square Attack: score-based random search, 5000 queries (black-box)")
    register("autoattack", standard_autoattack, params=AutoAttackParams,
             description="AutoAttack, standard version: APGD-CE, APGD-T, FAB-T, Square (RobustBench protocol)")
    register("autoattack-fast", fast_autoattack, params=AutoAttackFastParams,
             description="cheaper AutoAttack-like ensemble (20-step APGD-CE/APGD-T, Square 1000); not standard")
