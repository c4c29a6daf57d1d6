"""The train job both front ends run.

``fsapp train`` maps its options onto a :class:`TrainRequest` and renders the events of
:func:`train_events`; the TUI starts the same job as a process (:func:`train_command`) and follows
its run directory. Resuming takes the run's own ``config.toml``; the one change allowed is
training longer (``--set schedule.epochs=N``, see :mod:`fsapp.engine.resume`). A finished run is
left as it is: the engine raises :class:`~fsapp.engine.resume.RunFinished` before writing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fsapp import config as cfgmod
from fsapp.engine import events as ev
from fsapp.engine.resume import RunFinished
from fsapp.engine.rundir import Control
from fsapp.errors import UsageError

__all__ = ["RESUME_KEYS", "RunFinished", "TrainRequest", "train_command", "train_events"]

RESUME_KEYS = ("schedule.epochs",)
"""Keys ``--set`` may change when a run is resumed (training longer)."""


@dataclass(frozen=True)
class TrainRequest:
    """What to train: a preset or TOML file with ``--set`` overrides into a run directory, or a
    run directory to resume."""

    config: str | None = None
    preset: str | None = None
    overrides: tuple[str, ...] = ()
    run_dir: Path | None = None
    resume: Path | None = None
    download: bool = False


def train_events(request: TrainRequest, control: Control | None = None) -> Iterator[ev.Event]:
    """Check the request and return the run's events (training starts when they are read)."""
    from fsapp.engine.train import train

    if request.config and request.preset:
        raise UsageError("give either a config (preset or TOML file) or --preset, not both")
    if request.resume is not None:
        if request.config or request.preset or request.download:
            raise UsageError("--resume continues a run with its own config.toml; drop the config, --preset "
                             "and --download")
        return train(resume=request.resume, control=control, extend_epochs=resume_epochs(request.overrides))
    overrides = list(request.overrides)
    source = request.config or request.preset
    if request.download:
        overrides.append(_download_override(source, overrides))
    return train(cfgmod.load(source, overrides), run_dir=request.run_dir, control=control)


def resume_epochs(overrides: tuple[str, ...] | list[str]) -> int | None:
    """The ``schedule.epochs`` a resume asks for (None: as configured); other keys are refused."""
    epochs = None
    for item in overrides:
        key, eq, value = item.partition("=")
        if key.strip() not in RESUME_KEYS or not eq:
            raise UsageError(f"with --resume only --set schedule.epochs=N (train longer) is allowed; got {item!r}")
        number = cfgmod.parse_value(value.strip())
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise UsageError(f"bad --set {item!r}: schedule.epochs must be a whole number >= 1")
        epochs = number
    return epochs


def _download_override(source: str | None, overrides: list[str]) -> str:
    tables, _ = cfgmod.load_tables(source)
    tables = cfgmod.apply_overrides(tables, overrides)
    name = tables.get("data", {}).get("name", cfgmod.DataSection.name)
    if "download" not in cfgmod.dataset_param_names(name):
        raise UsageError(f"dataset '{name}' cannot be downloaded (it is embedded or generated)")
    return "data.download=true"


def train_command(config: str | Path, run_dir: Path, python: str | None = None) -> list[str]:
    """The command line that runs this job as its own process, quiet, into ``run_dir``."""
    return [python or sys.executable, "-m", "fsapp", "train", str(config), "--run-dir", str(run_dir), "-q"]
