"""An fsapp plugin in one module: one component of each kind, registered through the hooks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fsapp import hookimpl
from fsapp.registry import ModelParams

# -- model ---------------------------------------------------------------------------------


@dataclass
class LinearParams(ModelParams):
    bias: bool = True


class LinearClassifier(nn.Module):
    """Normalise, flatten, one linear layer."""

    def __init__(self, p: LinearParams) -> None:
        super().__init__()
        c = p.channels
        self.register_buffer("mean", torch.tensor(p.mean).reshape(1, -1, 1, 1).expand(1, c, 1, 1).clone(), persistent=False)
        self.register_buffer("std", torch.tensor(p.std).reshape(1, -1, 1, 1).expand(1, c, 1, 1).clone(), persistent=False)
        self.fc = nn.Linear(c * p.size * p.size, p.num_classes, bias=p.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(((x - self.mean) / self.std).flatten(1))


@hookimpl
def register_models(register):
    register("example-linear", LinearClassifier, params=LinearParams,
             description="a linear classifier on the normalised pixels")


# -- dataset -------------------------------------------------------------------------------


@dataclass
class StripesParams:
    n_train: int = 200
    n_test: int = 100
    size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_train < 1 or self.n_test < 1 or self.size < 2:
            raise ValueError("n_train, n_test must be >= 1 and size >= 2")


def make_stripes(p: StripesParams):
    """Class 0: horizontal stripes, class 1: vertical stripes, with noise."""
    from fsapp.data import Dataset

    g = torch.Generator().manual_seed(p.seed)

    def split(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(0, 2, (n,), generator=g)
        rows = (torch.arange(p.size) % 2).float()
        horizontal = rows[:, None].expand(p.size, p.size)
        images = torch.where(y[:, None, None] == 0, horizontal, horizontal.T)
        images = images + 0.3 * torch.randn(n, p.size, p.size, generator=g)
        return (images.clamp(0, 1) * 255).round().to(torch.uint8)[:, None], y

    xtr, ytr = split(p.n_train)
    xte, yte = split(p.n_test)
    return Dataset("example-stripes", xtr, ytr, xte, yte, ("horizontal", "vertical"), (0.5,), (0.5,))


@hookimpl
def register_datasets(register):
    register("example-stripes", make_stripes, params=StripesParams,
             description="seeded toy data: horizontal vs vertical stripes")


# -- solver --------------------------------------------------------------------------------


@dataclass
class SoftminParams:
    temperature: float = 0.1

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")


@hookimpl
def register_solvers(register):
    def factory(p: SoftminParams):
        def solve(cost: Tensor) -> Tensor:
            cost = cost.float() if cost.dtype in (torch.float16, torch.bfloat16) else cost
            return torch.softmax(-cost / p.temperature, dim=1) / cost.shape[0]

        return solve

    register("example-softmin", factory, params=SoftminParams,
             description="row-wise soft-min plan (uniform row marginals only)")


# -- perturbation --------------------------------------------------------------------------


@dataclass
class SignNoiseParams:
    epsilon: float = 8 / 255


@hookimpl
def register_perturbations(register):
    def factory(p: SignNoiseParams):
        def perturb(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
            signs = torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1
            return (x + p.epsilon * signs).clamp(0, 1)

        return perturb

    register("example-sign-noise", factory, params=SignNoiseParams,
             description="x + eps * random signs, no gradient")


# -- attack --------------------------------------------------------------------------------


@dataclass
class NoiseAttackParams:
    eps: float = 8 / 255
    draws: int = 10

    def __post_init__(self) -> None:
        if self.eps < 0 or self.draws < 1:
            raise ValueError("eps must be >= 0 and draws >= 1")


class NoiseAttack:
    """Random search: the first of ``draws`` uniform-noise points in the eps-ball that fools the model.

    The class attributes declare the threat model and kind to fsapp's evaluator (it checks every
    returned example against them): an L-inf ball of radius ``eps``, and ``decision`` access (only
    the predicted labels are used), so it counts as a black-box attack in the flags.
    """

    norm = "Linf"
    access = "decision"
    loss = None

    def __init__(self, p: NoiseAttackParams) -> None:
        self.eps = p.eps
        self.draws = p.draws

    @torch.no_grad()
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        best = x.clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(self.draws):
            cand = (x + torch.empty_like(x).uniform_(-self.eps, self.eps)).clamp(0, 1)
            wrong = model(cand).argmax(1) != y
            take = wrong & ~fooled
            best[take] = cand[take]
            fooled |= wrong
        return best


@hookimpl
def register_attacks(register):
    register("example-noise", NoiseAttack, params=NoiseAttackParams,
             description="the first of k uniform-noise draws in the eps-ball that fools the model")


# -- tracker -------------------------------------------------------------------------------

from fsapp.engine.events import EvalResult  # noqa: E402  (kept beside the one component that uses it)


@dataclass
class SummaryParams:
    filename: str = "example-summary.txt"


class SummaryTracker:
    """One line per live evaluation (epoch, clean and worst-case accuracy) in a text file in the run
    directory. A tracker for MLflow or W&B has the same shape: log in ``on_event``."""

    def __init__(self, p: SummaryParams) -> None:
        self.filename = p.filename
        self.path = None

    def open(self, run_dir, config) -> None:
        self.path = run_dir / self.filename

    def on_event(self, event) -> None:
        if isinstance(event, EvalResult) and self.path is not None:
            acc = event.accuracy
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(f"epoch {event.epoch + 1}: clean {acc.get('clean', 0):.4f} "
                         f"worst case {acc.get('worst_case', acc.get('clean', 0)):.4f}\n")

    def close(self) -> None:
        self.path = None


@hookimpl
def register_trackers(register):
    register("example-summary", SummaryTracker, params=SummaryParams,
             description="one line per live evaluation (clean, worst case) in <run>/example-summary.txt")
