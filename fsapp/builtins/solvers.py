"""Optimal-transport solvers: ``solver(cost[B, B]) -> plan[B, B]`` for uniform marginals 1/B.

- ``sinkhorn`` (``mode=faithful``, the paper's default) reproduces the reference code exactly,
  quirks included: log domain, u then v (using the new u), log-sum-exp computed as
  ``log(sum(exp(A)) + 1e-6)`` without a max shift, stop when ``sum|u - u_prev| < tol`` (absolute),
  at most ``max_iter`` iterations, and the plan stays in the autograd graph. It stops after a few
  iterations, far from convergence; that early-stopped plan defines the paper's attack direction.
  The unshifted log-sum-exp cannot overflow: after each half-update every entry of
  ``exp((-C + u + v) / reg)`` is below 1/B, so the sums stay <= 1; when all entries underflow,
  the ``+1e-6`` bounds the step of a potential by ``reg * (log(1/B) + 13.8)``.
- ``sinkhorn:mode=converged`` is a stable (max-shifted) log-domain Sinkhorn run to convergence:
  a different, legitimate method (equal to ``ot.sinkhorn(..., method="sinkhorn_log")``).
- ``ipot`` is the inexact proximal point method of the paper's Table 4.
- ``uniform`` (T = 1/B^2) and ``identity`` (T = I/B) are the degenerate matchings of Table 3(b).

Every solver computes in float32 (half types are upcast; float64 stays float64).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch

from fsapp.hookspecs import hookimpl
from fsapp.losses import compute_dtype
from fsapp.registry import NoParams

__all__ = [
    "IPOTParams",
    "Sinkhorn",
    "SinkhornParams",
    "identity_plan",
    "ipot",
    "sinkhorn_converged",
    "sinkhorn_faithful",
    "uniform_plan",
]

FAITHFUL_MAX_ITER = 100
FAITHFUL_TOL = 0.1
CONVERGED_MAX_ITER = 10000
CONVERGED_TOL = 1e-6
CONVERGED_CHECK_EVERY = 10
_LSE_FLOOR = 1e-6  # the reference's "+ 1e-6" inside the log of the log-sum-exp


def _as_cost(cost: torch.Tensor) -> torch.Tensor:
    if not isinstance(cost, torch.Tensor) or cost.dim() != 2:
        shape = tuple(cost.shape) if isinstance(cost, torch.Tensor) else type(cost).__name__
        raise ValueError(f"a solver needs a 2-D cost matrix [B, B], got {shape}")
    if cost.shape[0] == 0 or cost.shape[1] == 0:
        raise ValueError(f"a solver needs a non-empty cost matrix, got shape {tuple(cost.shape)}")
    return cost.to(compute_dtype(cost.dtype))


def _log_uniform(n: int, like: torch.Tensor) -> torch.Tensor:
    # float(1/n) rounded to the working dtype, then its log (as the reference computes log(mu)).
    return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device).log()


def sinkhorn_faithful(
    cost: torch.Tensor,
    reg: float = 0.01,
    max_iter: int = FAITHFUL_MAX_ITER,
    tol: float = FAITHFUL_TOL,
    *,
    return_iterations: bool = False,
    device_stop: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, int | torch.Tensor]:
    """The reference code's log-domain Sinkhorn, quirks included (see the module docstring).

    Differentiable: the plan keeps its dependence on ``cost`` through every iteration.
    With ``return_iterations`` it returns ``(plan, iterations_run)``. ``device_stop`` decides the
    early stop on the device instead of the host: all ``max_iter`` iterations run, those after
    the stop leave ``u`` and ``v`` frozen (``torch.where``), so plan and gradient are the same
    with no host-device sync (the iteration count is then a 0-dim tensor).
    """
    C = _as_cost(cost)
    m, n = C.shape
    log_mu, log_nu = _log_uniform(m, C), _log_uniform(n, C)
    u = C.new_zeros(m)
    v = C.new_zeros(n)

    def scaled(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (-C + u.unsqueeze(1) + v.unsqueeze(0)) / reg

    if device_stop:
        done = torch.zeros((), dtype=torch.bool, device=C.device)
        count = torch.zeros((), dtype=torch.long, device=C.device)
        for _ in range(max_iter):
            u_new = reg * (log_mu - torch.log(torch.exp(scaled(u, v)).sum(1) + _LSE_FLOOR)) + u
            v_new = reg * (log_nu - torch.log(torch.exp(scaled(u_new, v)).sum(0) + _LSE_FLOOR)) + v
            count = count + (~done).long()
            stop_now = (u_new - u).abs().sum() < tol
            u = torch.where(done, u, u_new)
            v = torch.where(done, v, v_new)
            done = done | stop_now
        plan = torch.exp(scaled(u, v))
        return (plan, count) if return_iterations else plan

    iterations = 0
    for _ in range(max_iter):
        iterations += 1
        u_prev = u
        u = reg * (log_mu - torch.log(torch.exp(scaled(u, v)).sum(1) + _LSE_FLOOR)) + u
        v = reg * (log_nu - torch.log(torch.exp(scaled(u, v)).sum(0) + _LSE_FLOOR)) + v
        if bool((u - u_prev).abs().sum() < tol):  # one host sync per iteration, as the reference
            break
    plan = torch.exp(scaled(u, v))
    return (plan, iterations) if return_iterations else plan


def sinkhorn_converged(
    cost: torch.Tensor,
    reg: float = 0.01,
    max_iter: int = CONVERGED_MAX_ITER,
    tol: float = CONVERGED_TOL,
    *,
    return_iterations: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, int]:
    """Stable log-domain Sinkhorn (max-shifted log-sum-exp) run until the marginals match.

    Stops when the L1 error of the row marginals (the columns are exact after each v update) is
    below ``tol``, checked every 10 iterations, or after ``max_iter`` iterations. Differentiable
    by unrolling (memory grows with the iterations; use ``detach`` when no gradient through the
    plan is wanted).
    """
    C = _as_cost(cost)
    m, n = C.shape
    log_a, log_b = _log_uniform(m, C), _log_uniform(n, C)
    a = log_a.exp()
    kernel = -C / reg
    u = C.new_zeros(m)
    v = C.new_zeros(n)
    iterations = 0
    for it in range(1, max_iter + 1):
        iterations = it
        u = log_a - torch.logsumexp(kernel + v.unsqueeze(0), dim=1)
        v = log_b - torch.logsumexp(kernel + u.unsqueeze(1), dim=0)
        if it % CONVERGED_CHECK_EVERY == 0 or it == max_iter:
            with torch.no_grad():
                rows = torch.exp(kernel + u.unsqueeze(1) + v.unsqueeze(0)).sum(1)
                if bool((rows - a).abs().sum() < tol):
                    break
    plan = torch.exp(kernel + u.unsqueeze(1) + v.unsqueeze(0))
    return (plan, iterations) if return_iterations else plan


def ipot(cost: torch.Tensor, beta: float = 1.0, iters: int = 50) -> torch.Tensor:
    """IPOT (Xie et al.) as in the reference: kernel exp(-C/beta), T from ones, inner loop 1.

    Each outer iteration: ``Q = A * T; delta = 1/(B Q sigma); sigma = 1/(B Q^T delta);
    T = diag(delta) Q diag(sigma)``. Tends to the exact OT plan as ``iters`` grows.
    """
    C = _as_cost(cost)
    m, n = C.shape
    tiny = torch.finfo(C.dtype).tiny
    A = torch.exp(-C / beta)
    T = torch.ones_like(C)
    sigma = C.new_full((n,), 1.0 / n)
    for _ in range(iters):
        Q = A * T
        delta = 1.0 / (m * (Q @ sigma)).clamp_min(tiny)
        sigma = 1.0 / (n * (Q.t() @ delta)).clamp_min(tiny)
        T = delta.unsqueeze(1) * Q * sigma.unsqueeze(0)
    return T


def uniform_plan(cost: torch.Tensor) -> torch.Tensor:
    """Every pair matched equally: ``T_ij = 1 / (m n)``."""
    C = _as_cost(cost)
    m, n = C.shape
    return torch.full_like(C, 1.0 / (m * n))


def identity_plan(cost: torch.Tensor) -> torch.Tensor:
    """Each sample matched with its own perturbation: ``T = I / B``."""
    C = _as_cost(cost)
    m, n = C.shape
    if m != n:
        raise ValueError(f"the identity matching needs a square cost matrix, got {m} x {n}")
    return torch.eye(m, dtype=C.dtype, device=C.device) / m


# --------------------------------------------------------------------------- parameters


@dataclass
class SinkhornParams:
    """Sinkhorn parameters. ``max_iter``/``tol`` left empty take the mode's defaults:
    faithful 100 iterations, stop when sum|u - u_prev| < 0.1; converged 10000 iterations,
    stop when the L1 marginal error < 1e-6."""

    reg: float = 0.01
    max_iter: int | None = None
    tol: float | None = None
    mode: Literal["faithful", "converged"] = "faithful"
    detach: bool = False
    # faithful mode: decide the early stop on the device (no host sync; the same plan). Empty:
    # on the device for CUDA tensors, on the host elsewhere (where reading it is free).
    device_stop: bool | None = None

    def __post_init__(self) -> None:
        if not (self.reg > 0 and math.isfinite(self.reg)):
            raise ValueError(f"reg must be > 0, got {self.reg}")
        if self.max_iter is not None and self.max_iter < 1:
            raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")
        if self.tol is not None and not self.tol >= 0:
            raise ValueError(f"tol must be >= 0, got {self.tol}")
        if self.mode not in ("faithful", "converged"):
            raise ValueError(f"mode must be 'faithful' or 'converged', got {self.mode!r}")

    @property
    def resolved_max_iter(self) -> int:
        """``max_iter`` or the mode's default."""
        if self.max_iter is not None:
            return self.max_iter
        return FAITHFUL_MAX_ITER if self.mode == "faithful" else CONVERGED_MAX_ITER

    @property
    def resolved_tol(self) -> float:
        """``tol`` or the mode's default."""
        if self.tol is not None:
            return self.tol
        return FAITHFUL_TOL if self.mode == "faithful" else CONVERGED_TOL


@dataclass
class IPOTParams:
    """IPOT parameters: proximal step ``beta`` and number of outer iterations."""

    beta: float = 1.0
    iters: int = 50

    def __post_init__(self) -> None:
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")


# --------------------------------------------------------------------------- components


class Sinkhorn:
    """The ``sinkhorn`` solver; ``last_iterations`` holds the iterations of the latest call."""

    def __init__(self, params: SinkhornParams | None = None) -> None:
        self.params = params or SinkhornParams()
        self.last_iterations = 0

    def __call__(self, cost: torch.Tensor) -> torch.Tensor:
        p = self.params
        if p.mode == "faithful":
            on_device = cost.is_cuda if p.device_stop is None else p.device_stop
            solve = functools.partial(sinkhorn_faithful, device_stop=on_device)
        else:
            solve = sinkhorn_converged
        if p.detach:
            with torch.no_grad():
                plan, its = solve(
                    cost.detach(),
                    p.reg,
                    p.resolved_max_iter,
                    p.resolved_tol,
                    return_iterations=True,
                )
        else:
            plan, its = solve(
                cost, p.reg, p.resolved_max_iter, p.resolved_tol, return_iterations=True
            )
        self.last_iterations = its
        return plan

    def __repr__(self) -> str:
        return f"Sinkhorn({self.params})"


class IPOT:
    """The ``ipot`` solver."""

    def __init__(self, params: IPOTParams | None = None) -> None:
        self.params = params or IPOTParams()

    def __call__(self, cost: torch.Tensor) -> torch.Tensor:
        return ipot(cost, self.params.beta, self.params.iters)

    def __repr__(self) -> str:
        return f"IPOT({self.params})"


@hookimpl
def register_solvers(register) -> None:  # noqa: ANN001 - the hook's register callback
    """Register the built-in OT solvers."""
    register(
        "sinkhorn",
        Sinkhorn,
        params=SinkhornParams,
        description="entropic OT, log domain; faithful = the reference's early-stopped, "
        "differentiable plan (paper default); converged = stable Sinkhorn to convergence",
    )
    register(
        "ipot", IPOT, params=IPOTParams, description="inexact proximal point OT (paper Table 4)"
    )
    register(
        "uniform",
        lambda params: uniform_plan,
        params=NoParams,
        description="degenerate matching T = 1/B^2 (paper Table 3b)",
    )
    register(
        "identity",
        lambda params: identity_plan,
        params=NoParams,
        description="degenerate matching T = I/B, each sample with its own perturbation",
    )
