"""FAB-T (Croce & Hein 2020): the minimal-distortion targeted attack of AutoAttack, L-inf. Follows
the reference (fra31/auto-attack ``fab_pt.py``, as ported to torchattacks) draw for draw."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from fsapp.adversary import eval_mode, input_grad_mode
from fsapp.builtins.autoattack.common import (
    LinfAttack,
    bshape,
    check_common,
    keep_fooled,
    logits_of,
    seed_draws,
)


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
    logits = logits_of(model, x)
    pred = logits.max(1)[1] == y
    if not bool(pred.any()):
        return x
    keep = pred.nonzero().flatten()
    la_target = logits.sort(dim=-1)[1][:, -rank]
    im2, la2, la_target2 = x[keep].clone(), y[keep].clone(), la_target[keep].clone()
    bs = im2.shape[0]
    shape = bshape(im2)
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
        logits = logits_of(model, x)
        acc = logits.max(1)[1] == y
        n_classes = logits.shape[1]
        seed_draws(seed)
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
                keep_fooled(acc, adv, ind, ~acc_curr, adv_curr)
        return adv.detach()



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
        check_common(self.eps, self.restarts)
        if self.steps < 1 or self.targets < 1:
            raise ValueError("steps and targets must be >= 1")



class FABTargeted(LinfAttack):
    """``fab-t``: ``attack(model, x, y) -> x_adv``."""

    loss = "margin"

    def __init__(self, p: FABTParams) -> None:
        self.p = p
        self.eps = p.eps

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        p = self.p
        return fab_targeted(model, x, y, p.eps, p.steps, p.targets, p.restarts, p.alpha_max, p.eta, p.beta, p.seed)

