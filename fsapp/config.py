"""Run configuration: section dataclasses, presets, TOML files, ``--set`` overrides, validation.

A configuration has fixed sections (``run``, ``data``, ``model``, ``method``, ``optim``,
``schedule``, ``eval``) plus the parameter tables of the chosen components: extra keys in
``[model]`` and ``[data]`` are the model's and dataset's own parameters, and ``[perturbation]``
and ``[solver]`` hold the chosen perturbation's and solver's parameters. Every key is checked
against the dataclass (or the component's params) that owns it; a bad one is one clear line.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from fsapp.devices import check_device_name
from fsapp.errors import UsageError
from fsapp.registry import (
    ModelParams,
    Spec,
    apply_defaults,
    coerce,
    format_value,
    in_range,
    make_params,
    open_ends,
    parse_spec,
    range_text,
    ranged,
    type_name,
    value_range,
)

EPS8 = 8 / 255
STEP2 = 2 / 255


RUN_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]{0,99}")
RUN_NAME_RULE = ("a run name is one path component of 1-100 letters, digits, '.', '_' or '-', "
                 "not starting with '.' (leave it empty for a timestamped name)")
SEED = (0, 2**63 - 1)


def _shown(value: Any, limit: int = 60) -> str:
    """A value as messages show it: huge integers and strings past ``limit`` shortened, strings
    quoted (control characters escaped), one line."""
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**20:
        digits = str(abs(value))
        return f"{'-' if value < 0 else ''}{digits[0]}.{digits[1:4]}e+{len(digits) - 1}"
    if isinstance(value, str):
        return repr(value if len(value) <= limit else value[:limit] + "...")
    return format_value(value)


def check_run_name(name: str) -> str:
    """``name`` if it is a safe run name (one path component; empty: a timestamped name is made)."""
    if name != "" and not (isinstance(name, str) and RUN_NAME.fullmatch(name)):
        raise UsageError(f"run.name = {_shown(name)} is not allowed; {RUN_NAME_RULE}")
    return name


def _check_directory(text: str, what: str) -> Path:
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"{what} is empty; name a directory, e.g. runs")
    shown = _shown(text, limit=1000)
    if "\0" in text:
        raise UsageError(f"{what} = {shown} contains a NUL byte; name a directory")
    path = Path(text)
    try:
        if path.exists() and not path.is_dir():
            raise UsageError(f"{what} = {shown} exists and is not a directory; name a directory")
    except OSError as exc:
        raise UsageError(f"{what} = {shown} cannot be used: {exc.strerror or exc}") from None
    return path


def check_runs_dir(text: str) -> str:
    """``run.runs_dir``: a directory (new or existing) where runs are made."""
    _check_directory(text, "run.runs_dir")
    return text


def check_run_dir(path: str | Path) -> Path:
    """The ``--run-dir`` of a new run: a directory path, not empty, not ``.``/``..``, not a file.

    Give it the option's text as typed: ``Path("")`` is ``Path(".")``, refused here as well.
    """
    text = str(path) if isinstance(path, Path) else path
    result = _check_directory(text, "--run-dir")
    if result.name in ("", ".", ".."):
        raise UsageError(f"--run-dir = {_shown(text, limit=1000)} names no new directory; give the run's own "
                         "directory, e.g. runs/my-run")
    return result


class _Section:
    """Base of the fixed sections: every ``ranged`` field is checked on construction, with one
    line naming the key, the value and the valid range (one source of truth: the field)."""

    TABLE: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            bounds = value_range(f)
            value = getattr(self, f.name)
            if bounds is not None and not in_range(value, bounds, open_ends(f)):
                raise UsageError(f"{self.TABLE}.{f.name} = {_shown(value)} is out of range; "
                                 f"valid: {range_text(*bounds, *open_ends(f))}")
        self.check()

    def check(self) -> None:
        """Checks beyond ranges (names, orderings); raise UsageError naming the key."""


@dataclass
class RunSection(_Section):
    """Where the run lives and how it executes."""

    TABLE: ClassVar[str] = "run"
    name: str = ""
    runs_dir: str = "runs"
    seed: int = ranged(0, *SEED)
    device: str = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    sync_bn: bool = False  # SyncBatchNorm across torchrun processes (CUDA only; ignored in one process)
    log_every: int = ranged(10, 1, 10**9)
    checkpoint_every: int = ranged(0, 0, 10**9)  # 0: at the end of each epoch
    max_bad_steps: int = ranged(10, 0, 10**9)
    max_bad_fraction: float = ranged(0.5, 0.0, 1.0, high_open=True)  # abort at an epoch end when more were skipped
    host_checks: Literal["auto", "every-step", "log-points"] = "auto"
    trackers: tuple[str, ...] = ()  # tracker specs fed every event (tensorboard, csv, plugins'); numbers unchanged

    def check(self) -> None:
        check_run_name(self.name)
        check_runs_dir(self.runs_dir)
        try:
            check_device_name(self.device)
        except UsageError as exc:
            raise UsageError(f"run.device: {exc}") from None


@dataclass
class DataSection(_Section):
    """The dataset, its batching and augmentation (other keys: the dataset's parameters)."""

    TABLE: ClassVar[str] = "data"
    name: str = "digits"
    batch_size: int = ranged(60, 2, 65536)  # >= 2: the transport plan couples the batch
    train_limit: int = ranged(0, 0, 10**9)  # 0: all samples
    augment: Literal["auto", "none", "crop-flip"] = "auto"
    on_device: bool = True  # false: keep the uint8 set in (pinned) host memory, move each batch
    # Held out of the training split for live evaluation and best.safetensors: -1 auto (1,000 images, or
    # 10% when fewer), 0 none (the paper's behaviour: train on everything, live evaluation on the test
    # split), a fraction in (0, 1) or a number of images.
    validation: float = ranged(-1.0, -1, 10**9)
    validation_seed: int = ranged(0, *SEED)

    def check(self) -> None:
        if self.validation < 0 and self.validation != -1:
            raise UsageError(f"data.validation = {_shown(self.validation)} is not allowed; valid: -1 (auto), 0 (no "
                             "held-out split), a fraction in (0, 1) or a number of images")
        if self.validation > 1 and self.validation != int(self.validation):
            raise UsageError(f"data.validation = {_shown(self.validation)} must be a fraction below 1 or a whole "
                             "number of images")


@dataclass
class ModelSection(_Section):
    """The model's name (other keys: the model's parameters)."""

    TABLE: ClassVar[str] = "model"
    name: str = "small-cnn"


@dataclass
class MethodSection(_Section):
    """The training method: a perturbation scheme, its budget, a solver and the outer loss.
    Budgets are in [0, 1] pixel units (8/255 is the usual CIFAR eps). ``trades_beta`` weighs the KL
    term of the ``trades`` loss."""

    TABLE: ClassVar[str] = "method"
    perturbation: str = "feature-scatter"
    solver: str = "sinkhorn"
    epsilon: float = ranged(EPS8, 0, 1)
    step_size: float = ranged(EPS8, 0, 1)
    steps: int = ranged(1, 1, 10000)
    loss: Literal["soft-ce", "ce", "trades"] = "soft-ce"
    label_smoothing: float = ranged(0.5, 0, 1, high_open=True)
    trades_beta: float = ranged(6.0, 0, 1e6)


@dataclass
class OptimSection(_Section):
    """SGD with momentum and weight decay, on all parameters (``weight_decay_on = "all"``) or on
    the weights of convolutions and linear layers only (``"weights"``: every parameter with two or
    more dimensions; biases and BatchNorm's scale and shift are not decayed)."""

    TABLE: ClassVar[str] = "optim"
    lr: float = ranged(0.1, 0, 10, low_open=True)
    momentum: float = ranged(0.9, 0, 1, high_open=True)
    weight_decay: float = ranged(2e-4, 0, 1)
    nesterov: bool = False
    weight_decay_on: Literal["all", "weights"] = "all"


@dataclass
class ScheduleSection(_Section):
    """Epochs and a piecewise-constant learning rate (multiplied by gamma at each milestone)."""

    TABLE: ClassVar[str] = "schedule"
    epochs: int = ranged(15, 1, 100000)
    milestones: tuple[int, ...] = ranged((10, 13), 1, 100000)
    gamma: float = ranged(0.1, 0, 1, low_open=True)

    def check(self) -> None:
        if list(self.milestones) != sorted(set(self.milestones)):
            raise UsageError(f"schedule.milestones = {_shown(self.milestones)} must be increasing epoch numbers")


@dataclass
class EvalSection(_Section):
    """Live robustness evaluation after every ``every`` epochs on (at most ``n`` images of) the
    validation split (``data.validation``), or of the test split when there is none."""

    TABLE: ClassVar[str] = "eval"
    n: int = ranged(200, 0, 10**7)
    every: int = ranged(1, 1, 100000)
    eps: float = ranged(EPS8, 0, 1)
    step_size: float = ranged(STEP2, 0, 1)
    attacks: tuple[str, ...] = ("pgd:steps=20", "cw:steps=20")
    autoattack_n: int = ranged(0, 0, 10**7)
    batch_size: int = ranged(250, 1, 65536)
    seed: int = ranged(0, *SEED)
    select: str = "worst_case"  # what best.safetensors maximises: worst_case, clean or one of eval.attacks

    def check(self) -> None:
        valid = ("worst_case", "clean", *self.attacks)
        if self.select not in valid:
            raise UsageError(f"eval.select = {_shown(self.select)} is not a live-evaluation result; valid: "
                             f"{', '.join(valid)}")


SECTIONS: dict[str, type] = {
    "run": RunSection,
    "data": DataSection,
    "model": ModelSection,
    "method": MethodSection,
    "optim": OptimSection,
    "schedule": ScheduleSection,
    "eval": EvalSection,
}
COMPONENT_OF_TABLE: dict[str, tuple[str, str, str]] = {
    "model": ("model", "model", "name"),
    "data": ("dataset", "data", "name"),
    "perturbation": ("perturbation", "method", "perturbation"),
    "solver": ("solver", "method", "solver"),
}
"""Tables that hold a component's parameters: table -> (component kind, section and key naming it)."""
ALL_TABLES = tuple(SECTIONS) + ("perturbation", "solver")


@dataclass
class Config:
    """A whole run configuration. ``extras`` holds component parameters by table name."""

    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    method: MethodSection = field(default_factory=MethodSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    eval: EvalSection = field(default_factory=EvalSection)
    extras: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"model": {}, "data": {}, "perturbation": {}, "solver": {}}
    )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Sections as nested dicts, component parameters merged into their tables."""
        out: dict[str, dict[str, Any]] = {}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        for table, params in self.extras.items():
            out.setdefault(table, {}).update(params)
        return out

    # Derived component specs -------------------------------------------------------------
    def model_params(self) -> dict[str, Any]:
        return dict(self.extras.get("model", {}))

    def dataset_params(self) -> dict[str, Any]:
        return dict(self.extras.get("data", {}))

    def solver_spec(self) -> tuple[str, dict[str, Any]]:
        return self.method.solver, dict(self.extras.get("solver", {}))

    def perturbation_params(self) -> dict[str, Any]:
        """The perturbation's parameters: [method] budget where it takes them, then [perturbation]."""
        from fsapp.plugins import get_registry

        comp = get_registry().get("perturbation", self.method.perturbation)
        names = {f.name for f in dataclasses.fields(comp.params)}
        params: dict[str, Any] = {}
        for key in ("epsilon", "step_size", "steps"):
            if key in names:
                params[key] = getattr(self.method, key)
        if "solver" in names:
            name, sp = self.solver_spec()
            params["solver"] = str(Spec(name, {k: format_value(v) for k, v in sp.items()}))
        params.update(self.extras.get("perturbation", {}))
        return params

    def attack_specs(self) -> list[str]:
        """Live-evaluation attack specs with the eval eps and step size filled in, exactly as the
        evaluator fills them (:func:`fsapp.engine.evaluate.apply_defaults`)."""

        defaults = {"eps": self.eval.eps, "step_size": self.eval.step_size}
        return [apply_defaults(s, defaults) for s in self.eval.attacks]


# Presets --------------------------------------------------------------------------------

def _paper(dataset: str, lr: float, augment: str) -> dict[str, dict[str, Any]]:
    return {
        "data": {"name": dataset, "batch_size": 60, "augment": augment},
        "model": {"name": "wrn", "depth": 28, "widen": 10, "dropout": 0.0},
        "method": {"perturbation": "feature-scatter", "solver": "sinkhorn", "epsilon": EPS8,
                   "step_size": EPS8, "steps": 1, "loss": "soft-ce", "label_smoothing": 0.5},
        "solver": {"reg": 0.01, "max_iter": 100, "tol": 0.1, "mode": "faithful", "detach": False},
        "optim": {"lr": lr, "momentum": 0.9, "weight_decay": 2e-4, "nesterov": False},
        "schedule": {"epochs": 200, "milestones": [60, 90], "gamma": 0.1},
        "eval": {"n": 1000, "eps": EPS8, "step_size": STEP2, "attacks": ["pgd:steps=20", "cw:steps=20"]},
    }


def _cifar_baseline(perturbation: str, steps: int, loss: str) -> dict[str, dict[str, Any]]:
    preset = _paper("cifar10", 0.1, "crop-flip")
    preset["data"]["batch_size"] = 128
    preset["method"] = {"perturbation": perturbation, "solver": "sinkhorn", "epsilon": EPS8,
                        "step_size": STEP2, "steps": steps, "loss": loss, "label_smoothing": 0.0}
    preset.pop("solver")
    return preset


def _bilateral_cifar10() -> dict[str, dict[str, Any]]:
    """The official Bilateral script (train.sh): WRN-28-10, batch 128, one targeted step of 8/255
    from a random start, adversarial labels (beta 9), weight decay on conv/linear weights only,
    201 epochs with lr x0.1 at epochs 100 and 150."""
    preset = _cifar_baseline("bilateral", 1, "soft-ce")
    preset["method"].update({"step_size": EPS8, "label_smoothing": 0.0})
    preset["perturbation"] = {"random_start": True, "labels": "la", "beta": 9.0, "gamma": 0.01}
    preset["optim"]["weight_decay_on"] = "weights"
    preset["schedule"] = {"epochs": 201, "milestones": [100, 150], "gamma": 0.1}
    return preset


def _trades_cifar10() -> dict[str, dict[str, Any]]:
    """The official TRADES script (train_trades_cifar10.py): WRN-34-10, batch 128, KL-PGD-10
    (eps 0.031, step 0.007), beta 6, 76 epochs with lr x0.1 from its 75th epoch (index 74)."""
    preset = _cifar_baseline("trades", 10, "trades")
    preset["model"]["depth"] = 34
    preset["method"].update({"epsilon": 0.031, "step_size": 0.007, "trades_beta": 6.0})
    preset["perturbation"] = {"start_std": 0.001}
    preset["schedule"] = {"epochs": 76, "milestones": [74], "gamma": 0.1}
    return preset


def _digits(method: dict[str, Any], perturbation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A method at the demo's scale: digits, small-cnn, eps 0.2, 15 epochs."""
    preset = copy.deepcopy(PRESETS["demo"])
    preset["method"] = {"solver": "sinkhorn", "epsilon": 0.2, "step_size": 0.2, "steps": 1,
                        "label_smoothing": 0.0, **method}
    preset["perturbation"] = perturbation
    return preset


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "demo": {
        "data": {"name": "digits", "batch_size": 60},
        "model": {"name": "small-cnn"},
        "method": {"perturbation": "feature-scatter", "solver": "sinkhorn", "epsilon": 0.2,
                   "step_size": 0.2, "steps": 1, "loss": "soft-ce", "label_smoothing": 0.5},
        "optim": {"lr": 0.1},
        "schedule": {"epochs": 15, "milestones": [10, 13]},
        "eval": {"n": 200, "eps": 0.2, "step_size": 0.05, "attacks": ["pgd:steps=20", "cw:steps=20"]},
    },
    "paper-cifar10": _paper("cifar10", 0.1, "crop-flip"),
    "paper-cifar100": _paper("cifar100", 0.1, "crop-flip"),
    "paper-svhn": _paper("svhn", 0.01, "none"),
    "madry-cifar10": _cifar_baseline("supervised", 7, "ce"),
    "standard-cifar10": _cifar_baseline("none", 1, "ce"),
    "bilateral-cifar10": _bilateral_cifar10(),
    "trades-cifar10": _trades_cifar10(),
}
PRESETS["bilateral-digits"] = _digits({"perturbation": "bilateral", "loss": "soft-ce"}, {"labels": "la"})
PRESETS["trades-digits"] = _digits({"perturbation": "trades", "loss": "trades", "step_size": 0.05, "steps": 10,
                                    "trades_beta": 6.0}, {})
PRESET_DESCRIPTIONS = {
    "demo": "Feature Scattering on the embedded digits with small-cnn (minutes on a CPU)",
    "paper-cifar10": "the paper's CIFAR-10 run: WRN-28-10, eps 8/255, faithful Sinkhorn, 200 epochs",
    "paper-cifar100": "the paper's CIFAR-100 run (label smoothing 0.5 with 100 classes)",
    "paper-svhn": "the paper's SVHN run (lr 0.01, no augmentation)",
    "madry-cifar10": "Madry PGD-7 adversarial training (step 2/255, cross-entropy), WRN-28-10",
    "standard-cifar10": "standard (clean) training, WRN-28-10",
    "bilateral-cifar10": "Bilateral adversarial training as the official train.sh runs it (wjyouch/"
    "bilateral-adversarial-training): WRN-28-10, one targeted step 8/255, adversarial labels beta 9, "
    "201 epochs",
    "trades-cifar10": "TRADES as the official train_trades_cifar10.py runs it (yaodongyu/TRADES): "
    "WRN-34-10, KL-PGD-10 eps 0.031 step 0.007, beta 6, 76 epochs, lr x0.1 at epoch 75",
    "bilateral-digits": "Bilateral adversarial training on the embedded digits with small-cnn, eps 0.2",
    "trades-digits": "TRADES on the embedded digits with small-cnn, eps 0.2, KL-PGD-10 step 0.05",
}


# Building and validating ------------------------------------------------------------------

def _section_fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _valid_keys(table: str, cfg_tables: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Map of key -> type valid in ``table`` given the component names chosen in cfg_tables."""
    from fsapp.plugins import get_registry

    keys: dict[str, Any] = {}
    if table in SECTIONS:
        keys.update(_section_fields(SECTIONS[table]))
    if table in COMPONENT_OF_TABLE:
        kind, section, key = COMPONENT_OF_TABLE[table]
        comp = get_registry().get(kind, _component_name(table, cfg_tables))
        skip = {"model": set(_section_fields(ModelParams)),
                "perturbation": {"epsilon", "step_size", "steps", "solver"}}.get(table, set())
        keys.update({k: t for k, t in _section_fields(comp.params).items() if k not in skip})
    return keys


def _component_name(table: str, cfg_tables: dict[str, dict[str, Any]]) -> str:
    """The name of the component whose parameters ``table`` holds, as chosen in cfg_tables."""
    _, section, key = COMPONENT_OF_TABLE[table]
    return cfg_tables.get(section, {}).get(key, getattr(SECTIONS[section], key))


def from_tables(tables: dict[str, Any], source: str = "config") -> Config:
    """Build and validate a Config from nested tables (TOML-shaped)."""
    if not isinstance(tables, dict):
        raise UsageError(f"{source}: expected tables like [run], [model]; got {type(tables).__name__}")
    for table, values in tables.items():
        if table not in ALL_TABLES:
            raise UsageError(f"{source}: unknown section [{table}]; valid: {', '.join(ALL_TABLES)}")
        if not isinstance(values, dict):
            raise UsageError(f"{source}: [{table}] must be a table of key = value")
    cfg = Config()
    # Sections first (component names must be known before their parameters are checked).
    for table, cls in SECTIONS.items():
        values = tables.get(table, {})
        fields = _section_fields(cls)
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            if key not in fields:
                continue
            try:
                kwargs[key] = coerce(raw, fields[key])
            except ValueError as exc:
                raise UsageError(f"{source}: bad value for {table}.{key}: {exc}") from None
        try:
            setattr(cfg, table, cls(**kwargs))
        except UsageError as exc:  # names the key already
            raise UsageError(f"{source}: {exc}") from None
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{source}: bad [{table}]: {exc}") from None
    names = {t: dataclasses.asdict(getattr(cfg, t)) for t in SECTIONS}
    from fsapp.plugins import get_registry

    reg = get_registry()
    reg.get("model", cfg.model.name)
    reg.get("dataset", cfg.data.name)
    reg.get("perturbation", cfg.method.perturbation)
    reg.get("solver", cfg.method.solver)
    for table in ALL_TABLES:
        values = tables.get(table, {})
        valid = _valid_keys(table, names)
        section_keys = set(_section_fields(SECTIONS[table])) if table in SECTIONS else set()
        for key, raw in values.items():
            if key not in valid:
                where = _where(table, names)
                raise UsageError(
                    f"{source}: unknown key '{table}.{key}'{where}; valid: {', '.join(sorted(valid))}"
                )
            if key in section_keys:
                continue
            try:
                cfg.extras.setdefault(table, {})[key] = coerce(raw, valid[key])
            except ValueError as exc:
                raise UsageError(f"{source}: bad value for {table}.{key}: {exc}") from None
    _check_components(cfg, source)
    return cfg


def _where(table: str, names: dict[str, dict[str, Any]]) -> str:
    if table not in COMPONENT_OF_TABLE:
        return ""
    return f" for {COMPONENT_OF_TABLE[table][0]} '{_component_name(table, names)}'"


def _check_components(cfg: Config, source: str) -> None:
    """Build each component's params dataclass once, so bad combinations fail now."""
    from fsapp.plugins import get_registry

    reg = get_registry()
    try:
        make_params(reg.get("model", cfg.model.name), cfg.model_params())
        make_params(reg.get("dataset", cfg.data.name), cfg.dataset_params())
        name, sp = cfg.solver_spec()
        make_params(reg.get("solver", name), sp)
        make_params(reg.get("perturbation", cfg.method.perturbation), cfg.perturbation_params())
        for spec in cfg.attack_specs():
            parsed = parse_spec(spec)
            make_params(reg.get("attack", parsed.name), parsed.params)
    except UsageError as exc:
        raise UsageError(f"{source}: {exc}") from None


def preset(name: str) -> Config:
    """The named preset as a validated Config."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset '{name}'; available: {', '.join(PRESETS)}")
    return from_tables(copy.deepcopy(PRESETS[name]), source=f"preset {name}")


def parse_value(text: str) -> Any:
    """A ``--set`` value: TOML syntax when it parses (numbers, lists, quoted strings), else the raw text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(tables: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to nested tables (validated later)."""
    out = copy.deepcopy(tables)
    for item in overrides:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or "." not in key:
            raise UsageError(f"bad --set {item!r}; expected section.key=value, e.g. optim.lr=0.05")
        table, _, name = key.partition(".")
        if table not in ALL_TABLES:
            raise UsageError(f"bad --set {item!r}: unknown section '{table}'; valid: {', '.join(ALL_TABLES)}")
        if not name or "." in name:
            raise UsageError(f"bad --set {item!r}; expected section.key=value")
        section = out.setdefault(table, {})
        # Changing a component drops parameters that belonged to the previous one.
        if name == "name" and table in ("model", "data") and section.get("name") != value.strip():
            keep = set(_section_fields(SECTIONS[table]))
            out[table] = section = {k: v for k, v in section.items() if k in keep}
        if table == "method" and name in ("perturbation", "solver"):
            if section.get(name) != value.strip():
                out.pop(name, None)
        section[name] = parse_value(value.strip())
    return out


def load(source: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a preset name or a TOML file (default: the ``demo`` preset), then apply ``--set``s."""
    tables, label = load_tables(source)
    tables = apply_overrides(tables, overrides or [])
    return from_tables(tables, source=label)


def load_tables(source: str | Path | None) -> tuple[dict[str, Any], str]:
    """The raw tables of a preset or TOML file, and a label for error messages."""
    if source is None:
        return copy.deepcopy(PRESETS["demo"]), "preset demo"
    text = str(source)
    if text in PRESETS:
        return copy.deepcopy(PRESETS[text]), f"preset {text}"
    path = Path(text)
    if path.suffix != ".toml" and not path.exists():
        raise UsageError(
            f"'{text}' is neither a preset ({', '.join(PRESETS)}) nor a .toml file"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read config file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: invalid TOML: {exc}") from None
    return data, str(path)


def resolved_tables(cfg: Config) -> dict[str, dict[str, Any]]:
    """Every key with its value, component defaults written out."""
    from fsapp.plugins import get_registry

    reg = get_registry()
    tables = {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}
    model = make_params(reg.get("model", cfg.model.name), cfg.model_params())
    base = set(_section_fields(ModelParams))
    tables["model"].update({k: v for k, v in dataclasses.asdict(model).items() if k not in base})
    data = make_params(reg.get("dataset", cfg.data.name), cfg.dataset_params())
    tables["data"].update(dataclasses.asdict(data))
    pert = make_params(reg.get("perturbation", cfg.method.perturbation), cfg.perturbation_params())
    budget = {"epsilon", "step_size", "steps", "solver"}
    tables["perturbation"] = {k: v for k, v in dataclasses.asdict(pert).items() if k not in budget}
    name, sp = cfg.solver_spec()
    tables["solver"] = dataclasses.asdict(make_params(reg.get("solver", name), sp))
    return tables


def to_toml(tables: dict[str, dict[str, Any]]) -> str:
    """Serialise nested tables of scalars and lists as TOML."""
    lines: list[str] = []
    for table, values in tables.items():
        if lines:
            lines.append("")
        lines.append(f"[{table}]")
        for key, value in values.items():
            if value is None:
                continue
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def dataset_param_names(name: str) -> set[str]:
    """The parameter names of dataset ``name`` (UsageError if unknown)."""
    from fsapp.plugins import get_registry

    return set(_section_fields(get_registry().get("dataset", name).params))


def describe_keys() -> dict[str, dict[str, str]]:
    """Fixed section keys and their types (for help text and forms)."""
    return {t: {k: type_name(tp) for k, tp in _section_fields(c).items()} for t, c in SECTIONS.items()}
