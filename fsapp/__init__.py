"""fsapp: Feature Scattering adversarial training and honest robustness evaluation.

The stable Python API::

    fsapp.available("attack")                      # -> ["cw", "fgsm", "pgd", ...]
    fsapp.create("attack", "pgd:eps=8/255,steps=20")(model, x, y)   # -> x_adv
    fsapp.evaluate(model, x, y, attacks=["pgd", "cw"]).accuracy     # {"clean", spec..., "worst_case"}
    for event in fsapp.train(config): ...
    fsapp.save_model(path, model, meta); fsapp.load_model(path)

The core imports none of typer, rich or textual.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fsapp._version import __version__
from fsapp.hookspecs import hookimpl

if TYPE_CHECKING:
    from fsapp.config import Config
    from fsapp.engine.evaluate import Report
    from fsapp.engine.events import Event

__all__ = [
    "__version__",
    "available",
    "create",
    "evaluate",
    "hookimpl",
    "load_model",
    "save_model",
    "train",
]


def available(kind: str) -> list[str]:
    """Names of the registered components of ``kind`` (model, dataset, solver, perturbation, attack)."""
    from fsapp.plugins import get_registry

    return get_registry().names(kind)


def create(kind: str, spec: str, **params: Any) -> Any:
    """Build a component from ``"name"`` or ``"name:key=value,..."`` plus keyword parameters."""
    from fsapp.plugins import get_registry

    return get_registry().create(kind, spec, **params)


def evaluate(model: Any, x: Any, y: Any, attacks: list[str] | tuple[str, ...] = ("pgd",), **kwargs: Any) -> "Report":
    """Clean and adversarial accuracy of ``model`` on (x, y), with the per-sample worst case."""
    from fsapp.engine.evaluate import evaluate as _evaluate

    return _evaluate(model, x, y, attacks=list(attacks), **kwargs)


def train(config: "Config | dict[str, Any] | str", **kwargs: Any) -> "Iterator[Event]":
    """Train as ``config`` says (a Config, a dict of sections, or a preset name); yields events.

    Keywords: ``run_dir``, ``resume`` (a run directory to continue), ``extend_epochs`` (with
    ``resume``: train it on to that many epochs), ``control``. The run's randomness is its own:
    other code drawing random numbers between its events does not change it, nor is it changed.
    """
    from fsapp.engine.train import train as _train

    return _train(config, **kwargs)


def load_model(path: Any, device: Any = "cpu") -> Any:
    """Rebuild a model from an fsapp ``.safetensors`` file (weights and metadata only)."""
    from fsapp.checkpoint import load_model as _load

    return _load(path, device=device)


def save_model(path: Any, model: Any, meta: dict[str, Any]) -> Any:
    """Save ``model`` as safetensors with the metadata needed to rebuild it by name."""
    from fsapp.checkpoint import save_model as _save

    return _save(path, model, meta)
