"""Before a run is continued: is it finished, does ``config.toml`` still say what its checkpoint
was trained with, and may it be extended to more epochs.

A checkpoint records the resolved configuration it was trained with and its digest
(:func:`fsapp.engine.plan.config_digest`) in its ``state``. ``--resume`` refuses, naming the
keys, when ``config.toml`` differs (a key edited or missing). The one change allowed is training
longer: ``extend_epochs`` larger than ``schedule.epochs``, recorded in ``manifest.json``
(``extended``) and in ``config.toml`` before training goes on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fsapp.checkpoint import read_checkpoint_state
from fsapp.config import load_tables
from fsapp.engine import events as ev
from fsapp.engine.plan import comparable
from fsapp.engine.rundir import MANIFEST, METRICS, MODEL, Follower
from fsapp.errors import FsappError, UsageError

MAX_HEADER = 16 * 2**20


class RunFinished(FsappError):
    """``--resume`` of a run that finished: nothing to do (a front end reports it and exits 0)."""


def finished(run_path: Path) -> ev.Finished | None:
    """The run's Finished event when it ended normally (model written, not stopped), else None."""
    if not (run_path / MODEL).is_file() or not (run_path / METRICS).is_file():
        return None
    events = Follower(run_path / METRICS).read()
    last = events[-1] if events else None
    return last if isinstance(last, ev.Finished) and not last.stopped else None


def refuse_finished(run_path: Path, epochs: int) -> None:
    """RunFinished with one line when ``run_path`` finished normally."""
    if finished(run_path) is not None:
        raise RunFinished(f"{run_path} already finished ({epochs} epochs, {MODEL} written); nothing to do. "
                          f"To train longer: fsapp train --resume {run_path} --set schedule.epochs=N")


def checkpoint_state(path: Path) -> dict[str, Any]:
    """The ``state`` a checkpoint records (epoch, step, config...), read from its header alone and
    checked as the checkpoint loader checks it."""
    return read_checkpoint_state(path)


def config_changes(stored: dict[str, Any], raw: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each key whose value in the file's tables ``raw`` differs from the
    checkpoint's recorded configuration ``stored`` (a key missing from the file, or added to it,
    counts). The file is compared as written, before validation, so even an edit that makes it
    invalid is named."""
    old, new = comparable(stored), comparable(raw if isinstance(raw, dict) else {})
    rows = []
    for key in list(old) + [k for k in new if k not in old]:
        if key not in new:
            if old[key] is not None:
                rows.append(f"{key}: {_show(old[key])} -> missing")
        elif old.get(key) != new[key]:
            rows.append(f"{key}: {_show(old.get(key))} -> {_show(new[key])}")
    return rows


def _show(value: Any) -> str:
    return json.dumps(value) if value is not None else "absent"


def pending_extension(run_path: Path, stored_epochs: Any, epochs: Any) -> bool:
    """Whether ``manifest.json`` records an extension from ``stored_epochs`` to ``epochs`` (the
    run was extended and stopped before its next checkpoint)."""
    try:
        manifest = json.loads((run_path / MANIFEST).read_text(encoding="utf-8"))
        steps = manifest.get("extended", [])
        return any(s.get("from_epochs") == stored_epochs and s.get("to_epochs") == epochs for s in steps)
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def check_config(run_path: Path, state: dict[str, Any], config_file: Path) -> bool:
    """Refuse (one line naming the keys) when ``config_file`` no longer says what the checkpoint
    was trained with. Returns False when the checkpoint records no configuration (older fsapp)."""
    stored = state.get("config")
    if not isinstance(stored, dict):
        return False
    raw, _ = load_tables(config_file)
    changes = config_changes(stored, raw)
    epochs = raw.get("schedule", {}).get("epochs") if isinstance(raw.get("schedule"), dict) else None
    if pending_extension(run_path, stored.get("schedule", {}).get("epochs"), epochs):
        changes = [c for c in changes if not c.startswith("schedule.epochs:")]
    if changes:
        raise UsageError(
            f"{config_file} no longer matches the configuration its checkpoint was trained with "
            f"({'; '.join(changes)}); put it back, or start a new run. To train longer: "
            f"fsapp train --resume {run_path} --set schedule.epochs=N")
    return True


def check_extension(epochs: int, extend_to: int) -> None:
    """``extend_to`` epochs must not be fewer than the run's ``epochs``."""
    if extend_to < epochs:
        raise UsageError(f"schedule.epochs can only grow when a run is resumed: this run has {epochs} epochs, "
                         f"asked for {extend_to}")
