"""The resolved run: a configuration turned, once, into what the training loop needs.

:func:`plan_run` reads a :class:`~fsapp.config.Config` and the registry once and returns a
:class:`RunPlan`: each chosen component (dataset, model, solver, perturbation) as a :class:`Part`
holding its parameters instance, the outer loss by name, the resolved tables written to
``config.toml`` and their digest. The loop builds components from the parts and never goes back
to the config's raw tables.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

from fsapp.config import Config, OptimSection, resolved_tables
from fsapp.losses import OuterLoss
from fsapp.registry import Spec, format_value, make_params

BUDGET = ("epsilon", "step_size", "steps")
"""``[method]`` keys passed to a perturbation that declares them."""

LOCATION_KEYS = ("run.name", "run.runs_dir")
"""Keys that say where a run lives, not how it trains: left out of the config digest."""


@dataclass(frozen=True)
class Part:
    """One chosen component: its kind and name, the plugin that provides it, the parameters
    given (by the config, or filled in by the loop) and the validated parameters instance."""

    kind: str
    name: str
    plugin: str
    given: dict[str, Any]
    params: Any

    def build(self) -> Any:
        """The component, built by the registry from the given parameters."""
        from fsapp.plugins import get_registry

        return get_registry().create(self.kind, self.name, **self.given)

    def with_values(self, **values: Any) -> "Part":
        """This part with more parameters given (validated again)."""
        return _part(self.kind, self.name, {**self.given, **values})

    def spec(self) -> str:
        """The part as a spec string (``name:key=value,...``) of the given parameters."""
        return str(Spec(self.name, {k: format_value(v) for k, v in self.given.items()}))


def _part(kind: str, name: str, given: dict[str, Any]) -> Part:
    from fsapp.plugins import get_registry

    component = get_registry().get(kind, name)
    return Part(kind, name, component.plugin, dict(given), make_params(component, given))


@dataclass(frozen=True)
class RunPlan:
    """Everything the training loop reads from the configuration, resolved once."""

    cfg: Config
    tables: dict[str, dict[str, Any]]
    digest: str
    dataset: Part
    model: Part
    solver: Part
    perturbation: Part
    loss: OuterLoss

    def model_for(self, dataset: Any) -> Part:
        """The model part with the dataset's shape, classes and normalisation filled in."""
        channels, height, _ = dataset.shape
        return self.model.with_values(num_classes=dataset.num_classes, channels=channels, size=height,
                                      mean=tuple(dataset.mean), std=tuple(dataset.std))

    def augment_for(self, dataset: Any) -> str:
        """``data.augment``, with ``auto`` meaning the dataset's own setting."""
        return self.cfg.data.augment if self.cfg.data.augment != "auto" else dataset.augment

    def lr_at(self, epoch: int) -> float:
        """Piecewise-constant learning rate: ``lr * gamma ** (milestones passed)``."""
        return lr_at(self.cfg, epoch)

    def optimizer_for(self, model: torch.nn.Module) -> torch.optim.SGD:
        """SGD over ``model``'s parameters as ``[optim]`` says (see :func:`make_optimizer`)."""
        return make_optimizer(model, self.cfg.optim)


def plan_run(cfg: Config) -> RunPlan:
    """Resolve ``cfg`` against the registry: every component's parameters checked once."""
    solver = _part("solver", cfg.method.solver, cfg.extras.get("solver", {}))
    perturbation = _part("perturbation", cfg.method.perturbation, _perturbation_values(cfg, solver))
    tables = resolved_tables(cfg)
    return RunPlan(
        cfg=cfg,
        tables=tables,
        digest=config_digest(tables),
        dataset=_part("dataset", cfg.data.name, cfg.extras.get("data", {})),
        model=_part("model", cfg.model.name, cfg.extras.get("model", {})),
        solver=solver,
        perturbation=perturbation,
        loss=OuterLoss(cfg.method.loss, cfg.method.label_smoothing, cfg.method.trades_beta),
    )


def _perturbation_values(cfg: Config, solver: Part) -> dict[str, Any]:
    """The perturbation's parameters: the ``[method]`` budget where it takes them, the solver (as
    the spec string the perturbation's ``solver`` parameter is declared to take), then
    ``[perturbation]``."""
    from fsapp.plugins import get_registry

    component = get_registry().get("perturbation", cfg.method.perturbation)
    names = {f.name for f in dataclasses.fields(component.params)}
    values: dict[str, Any] = {key: getattr(cfg.method, key) for key in BUDGET if key in names}
    if "solver" in names:
        values["solver"] = solver.spec()
    values.update(cfg.extras.get("perturbation", {}))
    return values


def make_optimizer(model: torch.nn.Module, optim: OptimSection) -> torch.optim.SGD:
    """SGD with ``optim``'s settings. ``weight_decay_on = "all"``: one group, every parameter
    decayed; ``"weights"``: two groups, the parameters with two or more dimensions (convolution
    and linear weights) decayed, the others (biases, BatchNorm scale and shift) not."""
    params = list(model.parameters())
    groups: list[Any] = params
    if optim.weight_decay_on == "weights":
        groups = [group for group in ({"params": [p for p in params if p.dim() > 1]},
                                      {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0})
                  if group["params"]]
    return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum,
                           weight_decay=optim.weight_decay, nesterov=optim.nesterov)


def lr_at(cfg: Config, epoch: int) -> float:
    """Piecewise-constant learning rate: ``lr * gamma ** (milestones passed)``."""
    passed = sum(1 for m in cfg.schedule.milestones if epoch >= m)
    return cfg.optim.lr * cfg.schedule.gamma ** passed


def comparable(tables: dict[str, Any]) -> dict[str, Any]:
    """Tables as flat ``section.key`` -> JSON value, without the location keys."""
    flat: dict[str, Any] = {}
    for table, values in tables.items():
        if not isinstance(values, dict):
            flat[str(table)] = json.loads(json.dumps(values, default=str))
            continue
        for key, value in values.items():
            if f"{table}.{key}" not in LOCATION_KEYS:
                flat[f"{table}.{key}"] = json.loads(json.dumps(value, default=str))
    return flat


def config_digest(tables: dict[str, dict[str, Any]]) -> str:
    """SHA-256 of the resolved configuration (location keys left out), as recorded in checkpoints."""
    text = json.dumps(comparable(tables), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
