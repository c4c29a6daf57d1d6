"""Loss surfaces around an input, as in the paper's Figure 4.

For one image x with label y, :func:`loss_surface` measures ``CE(f(x + a*eps*d_a + b*eps*d_r), y)``
on a grid of (a, b) in [-1, 1] x [-1, 1], in eval mode, where ``d_a`` is an adversarial direction
(the sign of the input gradient of the cross-entropy, or the sign of a PGD-20 perturbation) and
``d_r`` a Rademacher vector (+-1 per pixel) drawn from a generator seeded by the caller. Inputs are
clipped to [0, 1] unless ``clip=False`` (then the surface also leaves the image domain, as a plain
"x + delta" plot does). :func:`plot_surfaces` draws one 3-D panel per model on a shared z-scale
with a contour floor (matplotlib, the optional ``fsapp[plots]`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsapp.adversary import eval_mode, input_grad_mode, preserved_state
from fsapp.checkpoint import atomic_write_bytes
from fsapp.engine.evaluate import _plan
from fsapp.errors import UsageError

DIRECTIONS = ("grad", "pgd")
"""``grad``: sign of the input gradient of the CE loss; ``pgd``: sign of the PGD-20 perturbation."""
PLOTS_HINT = "the landscape PNG needs matplotlib: pip install 'fsapp[plots]' (the grid is in the JSON report)"


@dataclass(frozen=True)
class Surface:
    """One image's loss surface: ``z[i][j]`` is the loss at ``a[i]``, ``b[j]``."""

    index: int
    label: int
    a: list[float]
    b: list[float]
    z: list[list[float]]
    clean_loss: float

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "a": self.a, "b": self.b, "z": self.z,
                "clean_loss": self.clean_loss}


def adversarial_direction(model: nn.Module, x: Tensor, y: Tensor, eps: float, direction: str = "grad",
                          seed: int = 0) -> Tensor:
    """``d_a`` for one image [1, C, H, W]: sign of the CE input gradient, or of a PGD-20 perturbation
    (step eps/4, random start from a generator seeded by ``seed``)."""
    if direction not in DIRECTIONS:
        raise UsageError(f"--landscape-direction {direction!r} is not known; valid: {', '.join(DIRECTIONS)}")
    if direction == "grad":
        with eval_mode(model), input_grad_mode():
            xg = x.detach().clone().requires_grad_(True)
            loss = F.cross_entropy(model(xg), y)
            (grad,) = torch.autograd.grad(loss, xg)
        return grad.sign()

    attack = _plan("pgd:steps=20", {"eps": eps, "step_size": eps / 4}, transfer=False).attack
    fork = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork), preserved_state(model):
        torch.manual_seed(seed)
        x_adv = attack(model, x, y)
    return (x_adv.detach() - x).sign()


def rademacher(shape: torch.Size, seed: int, device: torch.device) -> Tensor:
    """A +-1 vector of ``shape`` drawn from a CPU generator seeded by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, tuple(shape), generator=g) * 2 - 1).to(device=device, dtype=torch.float32)


@torch.no_grad()
def loss_surface(model: nn.Module, x: Tensor, y: Tensor, eps: float, d_a: Tensor, d_r: Tensor, *,
                 grid: int = 41, clip: bool = True, batch_size: int = 256, index: int = 0) -> Surface:
    """The cross-entropy on a ``grid`` x ``grid`` lattice of a, b in [-1, 1] around image ``x``
    ([1, C, H, W], label ``y`` [1]) along ``eps * d_a`` and ``eps * d_r``; eval mode, no gradient."""
    if grid < 2:
        raise UsageError(f"--grid must be at least 2, got {grid}")
    coords = torch.linspace(-1.0, 1.0, grid, device=x.device)
    aa, bb = torch.meshgrid(coords, coords, indexing="ij")
    a_flat, b_flat = aa.reshape(-1), bb.reshape(-1)
    losses = []
    with eval_mode(model):
        for start in range(0, a_flat.numel(), batch_size):
            a = a_flat[start:start + batch_size].view(-1, 1, 1, 1)
            b = b_flat[start:start + batch_size].view(-1, 1, 1, 1)
            points = x + a * eps * d_a + b * eps * d_r
            if clip:
                points = points.clamp(0.0, 1.0)
            logits = model(points)
            losses.append(F.cross_entropy(logits, y.expand(len(points)), reduction="none"))
        clean = float(F.cross_entropy(model(x), y))
    z = torch.cat(losses).view(grid, grid).cpu()
    axis = coords.cpu().tolist()
    return Surface(index, int(y), axis, axis, z.tolist(), clean)


def landscape(model: nn.Module, x: Tensor, y: Tensor, indices: list[int], eps: float, *, grid: int = 41,
              direction: str = "grad", clip: bool = True, seed: int = 0, batch_size: int = 256,
              directions: dict[int, tuple[Tensor, Tensor]] | None = None) -> tuple[list[Surface], dict[int, Any]]:
    """Surfaces of ``model`` around the images ``x[indices]``. The directions of each image come
    from ``directions`` when given (so several models are compared along the same ones), else they
    are computed on ``model``; returns the surfaces and the directions used."""
    out: list[Surface] = []
    used: dict[int, tuple[Tensor, Tensor]] = {}
    for i in indices:
        if not 0 <= i < len(y):
            raise UsageError(f"--index {i} is out of range; valid: 0..{len(y) - 1} (the evaluated test samples)")
        xi, yi = x[i:i + 1], y[i:i + 1]
        if directions is not None and i in directions:
            d_a, d_r = directions[i]
        else:
            d_a = adversarial_direction(model, xi, yi, eps, direction, seed + i)
            d_r = rademacher(xi.shape, seed * 1_000_003 + i, xi.device)
        used[i] = (d_a, d_r)
        out.append(loss_surface(model, xi, yi, eps, d_a, d_r, grid=grid, clip=clip, batch_size=batch_size,
                                index=i))
    return out, used


def plot_surfaces(panels: list[tuple[str, Surface]], path: Path, title: str = "") -> Path:
    """One 3-D surface per (name, surface), side by side on a shared z-scale, each with a contour
    floor; raises UsageError with :data:`PLOTS_HINT` when matplotlib is missing."""
    try:
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(PLOTS_HINT) from None
    import io


    zs = [np.asarray(s.z) for _, s in panels]
    z_low = min(float(z.min()) for z in zs)
    z_high = max(float(z.max()) for z in zs)
    floor = z_low - 0.15 * max(z_high - z_low, 1e-6)
    fig = Figure(figsize=(4.2 * len(panels), 4.4), dpi=90)
    FigureCanvasAgg(fig)
    for k, ((name, surface), z) in enumerate(zip(panels, zs, strict=True)):
        ax = fig.add_subplot(1, len(panels), k + 1, projection="3d")
        a, b = np.meshgrid(np.asarray(surface.a), np.asarray(surface.b), indexing="ij")
        ax.plot_surface(a, b, z, cmap="viridis", vmin=z_low, vmax=z_high, linewidth=0, antialiased=True, alpha=0.9)
        ax.contourf(a, b, z, zdir="z", offset=floor, levels=12, cmap="viridis", vmin=z_low, vmax=z_high)
        ax.set_zlim(floor, z_high)
        ax.set_xlabel("a (d_a)")
        ax.set_ylabel("b (d_r)")
        ax.set_zlabel("loss")
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write_bytes(path, buffer.getvalue())
