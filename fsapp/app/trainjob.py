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
from dataclasses import dataclass, replace
from pathlib import Path

from fsapp import config as cfgmod
from fsapp.app.seeds import seed_group_runs
from fsapp.engine import events as ev
from fsapp.engine.resume import RunFinished
from fsapp.engine.rundir import Control
from fsapp.engine.trackers import with_trackers
from fsapp.engine.train import train
from fsapp.errors import UsageError

__all__ = ["RESUME_KEYS", "RunFinished", "TrainRequest", "seed_group", "train_command", "train_events"]

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
    trackers: tuple[str, ...] = ()
    """Tracker specs besides the config's ``run.trackers`` (they never change a number)."""


def seed_group(request: TrainRequest, seeds: int) -> list[TrainRequest]:
    """``--seeds N``: one request per seed (``run.seed``, ``run.seed + 1``, ...), runs named
    ``<name>-s<seed>`` under ``run.runs_dir``, so ``fsapp report`` groups them as mean +- std."""
    if request.resume is not None or request.run_dir is not None:
        raise UsageError("--seeds makes one run per seed under run.runs_dir; drop --resume and --run-dir")
    tables, _ = cfgmod.load_tables(request.config or request.preset)
    tables = cfgmod.apply_overrides(tables, list(request.overrides))
    return [replace(request, overrides=request.overrides + (f"run.seed={t['run']['seed']}", f"run.name={name}"))
            for name, t in seed_group_runs(tables, seeds)]


def train_events(request: TrainRequest, control: Control | None = None) -> Iterator[ev.Event]:
    """Check the request and return the run's events (training starts when they are read)."""
    if request.config and request.preset:
        raise UsageError("give either a config (preset or TOML file) or --preset, not both")
    if request.resume is not None:
        if request.config or request.preset or request.download:
            raise UsageError("--resume continues a run with its own config.toml; drop the config, --preset "
                             "and --download")
        extend = resume_epochs(request.overrides)
        specs = _config_trackers(request.resume) + request.trackers
        return with_trackers(train(resume=request.resume, control=control, extend_epochs=extend), specs)
    overrides = list(request.overrides)
    source = request.config or request.preset
    if request.download:
        overrides.append(_download_override(source, overrides))
    cfg = cfgmod.load(source, overrides)
    specs = tuple(cfg.run.trackers) + request.trackers
    return with_trackers(train(cfg, run_dir=request.run_dir, control=control), specs)


def _config_trackers(run_dir: Path) -> tuple[str, ...]:
    """The ``run.trackers`` of a run's own ``config.toml`` (none when it cannot be read: the
    engine's resume checks say why)."""
    try:
        return tuple(cfgmod.load(run_dir / "config.toml").run.trackers)
    except (UsageError, OSError):
        return ()


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
