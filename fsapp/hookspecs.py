"""The plugin contract: one pluggy hook per component kind.

A plugin is a module (or object) with functions named like the hooks below, marked with
``fsapp.hookimpl``. Each hook receives a ``register`` callback::

    register(name, factory, params=ParamsDataclass, description="one line")

``factory(params)`` receives an instance of ``params`` (a dataclass whose fields, types and
defaults are the component's parameters) and returns the component. Built-in components are
registered through exactly these hooks (see ``fsapp.builtins``). Third-party packages expose
their plugin module through the ``fsapp`` entry-point group::

    [project.entry-points.fsapp]
    my_plugin = "my_package.plugin"

What each kind's factory must return:

- model: an ``nn.Module`` taking inputs in [0, 1] (normalisation inside) and returning logits.
  Its params dataclass must subclass :class:`fsapp.registry.ModelParams` (num_classes, channels,
  size, mean, std are filled from the dataset).
- dataset: a :class:`fsapp.data.Dataset` (uint8 train/test tensors plus metadata).
- solver: a callable ``solver(cost[B, B]) -> plan[B, B]`` for uniform marginals.
- perturbation: a callable ``perturb(model, x, y) -> x_adv`` (training-time adversary).
- attack: a callable ``attack(model, x, y) -> x_adv`` (evaluation-time adversary).
- tracker: an object with ``on_event(event)`` and, optionally, ``open(run_dir, config)`` and
  ``close()`` (see :mod:`fsapp.engine.trackers`); it receives every training and evaluation event.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("fsapp")
hookimpl = pluggy.HookimplMarker("fsapp")

Register = Callable[..., None]


@hookspec
def register_models(register: Register) -> None:
    """Register image classifiers: ``register(name, factory, params=..., description=...)``."""


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets that load as uint8 image tensors with labels."""


@hookspec
def register_solvers(register: Register) -> None:
    """Register optimal-transport solvers mapping a [B, B] cost to a [B, B] plan."""


@hookspec
def register_perturbations(register: Register) -> None:
    """Register training-time perturbation schemes ``perturb(model, x, y) -> x_adv``."""


@hookspec
def register_attacks(register: Register) -> None:
    """Register evaluation attacks ``attack(model, x, y) -> x_adv``."""


@hookspec
def register_trackers(register: Register) -> None:
    """Register experiment trackers that receive the engine's events (``on_event(event)``)."""
