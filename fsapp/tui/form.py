"""The New-run form as data: fields, component parameter rows, and validation by the CLI's code.

The form starts from a preset; each field becomes a ``section.key=value`` override, exactly what
``fsapp train --preset P --set ...`` would receive, and :func:`validate` calls
:func:`fsapp.config.load` so the messages are the CLI's.
"""

from __future__ import annotations

import copy
import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsapp.config import PRESETS, Config, describe_keys, load
from fsapp.errors import UsageError

COMPONENTS: tuple[tuple[str, str, str], ...] = (
    # (form id, registry kind, section.key holding the name)
    ("model", "model", "model.name"),
    ("dataset", "dataset", "data.name"),
    ("perturbation", "perturbation", "method.perturbation"),
    ("solver", "solver", "method.solver"),
)
FIELDS: tuple[tuple[str, str, str], ...] = (
    # (form id, label, section.key): what researchers change first
    ("epsilon", "train eps", "method.epsilon"),
    ("step_size", "train step", "method.step_size"),
    ("loss", "loss", "method.loss"),
    ("label_smoothing", "label smoothing", "method.label_smoothing"),
    ("lr", "lr", "optim.lr"),
    ("momentum", "momentum", "optim.momentum"),
    ("weight_decay", "weight decay", "optim.weight_decay"),
    ("epochs", "epochs", "schedule.epochs"),
    ("milestones", "lr milestones", "schedule.milestones"),
    ("batch_size", "batch size", "data.batch_size"),
    ("train_limit", "train limit", "data.train_limit"),
    ("seed", "seed", "run.seed"),
    ("device", "device", "run.device"),
    ("attacks", "eval attacks", "eval.attacks"),
    ("eval_eps", "eval eps", "eval.eps"),
    ("eval_n", "eval samples", "eval.n"),
    ("name", "run name", "run.name"),
)
MODEL_BASE = {"num_classes", "channels", "size", "mean", "std"}
BUDGET = {"epsilon", "step_size", "steps", "solver"}


@dataclass(frozen=True)
class ParamRow:
    """One component parameter in the form: where it goes, its type, default and first text."""

    table: str
    key: str
    type: str
    default: str
    initial: str

    @property
    def dotted(self) -> str:
        return f"{self.table}.{self.key}"


def to_text(value: Any) -> str:
    """A config value as the text a user would type (``8/255`` for multiples of 1/255)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        r = repr(value)
        k = value * 255
        if len(r) > 8 and abs(k - round(k)) < 1e-9 and round(k) != 0:
            return f"{round(k)}/255"
        return r
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(json.dumps(v) if isinstance(v, str) else to_text(v) for v in value) + "]"
    return str(value)


def preset_tables(preset: str) -> dict[str, dict[str, Any]]:
    """The preset's raw tables (a copy)."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset '{preset}'; available: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[preset])


def initial_values(preset: str) -> dict[str, str]:
    """Form id -> text for the component selects and main fields, from the preset."""
    cfg = load(preset)
    out: dict[str, str] = {}
    for form_id, _, dotted in COMPONENTS + FIELDS:
        section, _, key = dotted.partition(".")
        value = getattr(getattr(cfg, section), key)
        out[form_id] = " ".join(value) if form_id == "attacks" else to_text(value)
    return out


def param_rows(kind: str, name: str, preset: str) -> list[ParamRow]:
    """The parameter rows of component ``name`` of ``kind``, first texts from the preset."""
    from fsapp.plugins import get_registry

    component = get_registry().get(kind, name)
    tables = preset_tables(preset)
    table = {"dataset": "data"}.get(kind, kind)
    same = {
        "model": tables.get("model", {}).get("name") == name,
        "dataset": tables.get("data", {}).get("name") == name,
        "perturbation": tables.get("method", {}).get("perturbation", "feature-scatter") == name,
        "solver": tables.get("method", {}).get("solver", "sinkhorn") == name,
    }[kind]
    given = tables.get(table, {}) if same else {}
    method = load(preset).method
    rows = []
    for row in component.param_table():
        key = row["name"]
        if kind == "model" and key in MODEL_BASE:
            continue
        if kind == "perturbation" and key in BUDGET:
            if key == "steps":
                rows.append(ParamRow("method", key, row["type"], to_text(row["default"]),
                                     to_text(getattr(method, key))))
            continue
        initial = given.get(key, row["default"])
        rows.append(ParamRow(table, key, row["type"], to_text(row["default"]), to_text(initial)))
    return rows


def _quoted(text: str, type_name: str) -> str:
    """Quote text meant for a string key so TOML parsing cannot turn it into a number."""
    return json.dumps(text) if type_name.rstrip("?") == "str" else text


def overrides(
    values: dict[str, str],
    params: list[tuple[ParamRow, str]],
    extra: str = "",
    runs_dir: Path | None = None,
) -> list[str]:
    """``section.key=value`` strings for the form's state (names first, then values)."""
    types = describe_keys()
    out = [f"{dotted}={values[fid].strip()}" for fid, _, dotted in COMPONENTS if fid in values]
    for fid, _, dotted in FIELDS:
        if fid not in values:
            continue
        text = values[fid].strip()
        if fid == "attacks":
            text = json.dumps(text.split())
        else:
            section, _, key = dotted.partition(".")
            text = _quoted(text, types[section][key])
        out.append(f"{dotted}={text}")
    if runs_dir is not None:
        out.append(f"run.runs_dir={json.dumps(str(runs_dir))}")
    for row, text in params:
        if text.strip() != row.initial:
            out.append(f"{row.dotted}={_quoted(text.strip(), row.type)}")
    try:
        out.extend(shlex.split(extra))
    except ValueError as exc:
        raise UsageError(f"bad --set list: {exc}") from None
    return out


def mentions(message: str, dotted: str) -> bool:
    """Whether an error message names the key ``section.key``."""
    if not message:
        return False
    section, _, key = dotted.partition(".")
    return (dotted in message or f"[{section}]: {key} " in message
            or (section in ("model", "data", "perturbation", "solver") and f"parameter '{key}'" in message))


def validate(preset: str, sets: list[str]) -> Config:
    """The config ``fsapp train --preset <preset> --set ...`` would run; UsageError if invalid."""
    return load(preset, sets)
