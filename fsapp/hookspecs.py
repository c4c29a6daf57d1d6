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
- perturbation: a callable ``perturb(model, x, y) -> x_adv`` (training-time adversary), or
  ``-> (x_adv, targets)`` with soft labels ``targets`` [B, K] that replace the labels in the outer
  loss (:mod:`fsapp.method`; Bilateral's adversarial labels are such targets).
- attack: a callable ``attack(model, x, y) -> x_adv`` (evaluation-time adversary).
- tracker: an object with ``on_event(event)`` and, optionally, ``open(run_dir, config)`` and
  ``close()`` (see :mod:`fsapp.engine.trackers`); it receives every training and evaluation event.

The attack and perturbation contract (what fsapp gives, what it expects, what it checks):

- ``x`` is a float batch ``[N, C, H, W]`` in [0, 1] on the model's device, ``y`` its int64 labels.
  They are copies: editing them in place changes nothing fsapp measures (examples are checked
  against fsapp's own copy of the clean input).
- Return a tensor of ``x``'s shape: the adversarial examples (any float dtype and device; fsapp
  detaches it and moves it back). Anything else (None, a tuple from an attack, another shape) is
  an error that names the component and its plugin; so is an exception raised while it runs (one
  line, no traceback). A ``ValueError`` means "cannot run here" (too few classes, ...) and is reported as
  such.
- The model is yours to call, in any mode: its modes and buffers (BatchNorm running statistics)
  are saved before the call and restored after it. Use :func:`fsapp.adversary.eval_mode` and
  :func:`fsapp.adversary.input_grad_mode` for the usual setting (eval mode, autograd on).
- Every example is checked: inside the declared ball (plus 1e-6), inside [0, 1], finite. A
  violating example is projected back and counted (``invalid-examples`` flag), never trusted.
  Accuracy is recomputed by fsapp with an eval-mode forward; an output row that is not finite
  counts as misclassified (``non-finite-output`` flag).
- Randomness: draw from torch's default generator (or ``fsapp.adversary.random_start``). The
  evaluator seeds it per (attack, batch) from the evaluation's seed and restores the caller's
  state afterwards, so results are reproducible and never disturb training.
- Declare the threat model and kind as attributes of the attack object (or subclass
  :class:`fsapp.adversary.Attack`): ``norm`` ("Linf", "L2", "L1"), ``eps`` (None: unbounded),
  ``access`` ("gradient", "score", "decision") and ``loss`` ("ce", "margin", ...). Without them
  an ``eps`` parameter means Linf. A params dataclass may declare ``norm: ClassVar[str] = "L2"``
  so that a report's Linf eps is never filled into it. An ensemble sets ``stages``, a list of
  ``(name, attack)``; the evaluator runs them with :func:`fsapp.adversary.cascade`, each on the
  points the previous ones left robust, and reports each stage.
- A perturbation used in training is held to the same rules (copies in, modes and buffers
  restored, output checked and projected into its ``epsilon`` ball, violations reported). It may
  also return the pair ``(x_adv, targets)``: ``targets`` must be a float tensor [B, K] (else one
  line names the plugin), and a row that is not finite, has a negative entry or does not sum to 1
  is replaced by the one-hot label and counted with the violations.
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
    """Register training-time perturbation schemes ``perturb(model, x, y) -> x_adv`` (or
    ``(x_adv, targets)``, soft labels for the outer loss)."""


@hookspec
def register_attacks(register: Register) -> None:
    """Register evaluation attacks ``attack(model, x, y) -> x_adv``."""


@hookspec
def register_trackers(register: Register) -> None:
    """Register experiment trackers that receive the engine's events (``on_event(event)``)."""
