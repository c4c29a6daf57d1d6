"""Built-in trackers: ``tensorboard`` (event files for TensorBoard) and ``csv`` (one CSV file per event type).

Both are registered through the ``register_trackers`` hook like any plugin's tracker and receive
the events of :mod:`fsapp.engine.events` through :class:`fsapp.engine.trackers.Trackers`.

TensorBoard scalars (step: the training step the event belongs to; 0 for a stand-alone evaluation):

- ``train/loss``, ``train/accuracy``, ``train/lr`` from each logged step (``StepEnd``);
- ``train/epoch_loss``, ``train/epoch_accuracy`` at the end of each epoch (``EpochEnd``);
- ``val/<key>`` for every accuracy of a live evaluation (``clean``, each attack, ``worst_case``,
  ``autoattack``) and ``val/gap`` (CE minus margin) when measured (``EvalResult``);
- ``eval/<key>`` for every accuracy of a finished ``fsapp eval`` job (``EvalFinished``).

Text: ``config`` (the resolved configuration as TOML), ``flags`` (evaluation flags), ``warnings``
and ``control`` (requests taken by the loop).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsapp.config import to_toml
from fsapp.engine import events as ev
from fsapp.errors import UsageError
from fsapp.hookspecs import Register, hookimpl
from fsapp.registry import ranged

__all__ = ["CsvParams", "CsvTracker", "TensorBoardParams", "TensorBoardTracker"]

TENSORBOARD_HINT = "pip install 'fsapp[tensorboard]'"


def _verbatim(text: str) -> str:
    """Text shown as-is by TensorBoard's Markdown renderer (an indented code block)."""
    return "\n".join("    " + line for line in text.splitlines())


def _flags_text(flags: list[dict[str, str]]) -> str:
    return _verbatim("\n".join(f"{f.get('id', '?')}: {f.get('message', '')}" for f in flags))


# --------------------------------------------------------------------------- tensorboard


@dataclass
class TensorBoardParams:
    """Where the event files go and how often they are flushed to disk."""

    log_dir: str = ""  # empty: <run directory>/tb
    flush_secs: int = ranged(10, 1, 3600)


class TensorBoardTracker:
    """Writes TensorBoard event files with ``torch.utils.tensorboard.SummaryWriter``."""

    def __init__(self, params: TensorBoardParams) -> None:
        self.params = params
        self.writer: Any = None
        self.step = 0
        self.config_written = False

    def open(self, run_dir: Path, config: dict[str, Any]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError(f"the tensorboard tracker needs the tensorboard package: {TENSORBOARD_HINT}") from None
        log_dir = Path(self.params.log_dir).expanduser() if self.params.log_dir else run_dir / "tb"
        self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=self.params.flush_secs)
        if config:
            self._config(config)

    def _config(self, config: dict[str, Any]) -> None:
        try:
            text = to_toml(config)
        except (TypeError, AttributeError):
            text = json.dumps(config, indent=2, default=str)
        self.writer.add_text("config", _verbatim(text), 0)
        self.config_written = True

    def _scalars(self, group: str, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            if value is not None:
                self.writer.add_scalar(f"{group}/{key}", float(value), step)

    def on_event(self, event: ev.Event) -> None:
        w = self.writer
        step = getattr(event, "global_step", -1)
        if isinstance(step, int) and step >= 0:
            self.step = step
        if isinstance(event, ev.RunStarted):
            self.step = event.start_epoch * event.steps_per_epoch + event.start_step
            if not self.config_written and event.config:
                self._config(event.config)
        elif isinstance(event, ev.StepEnd):
            self._scalars("train", {"loss": event.loss, "accuracy": event.accuracy, "lr": event.lr}, self.step)
        elif isinstance(event, ev.EpochEnd):
            self._scalars("train", {"epoch_loss": event.loss, "epoch_accuracy": event.accuracy}, self.step)
        elif isinstance(event, ev.EvalResult):
            self._scalars("val", dict(event.accuracy), self.step)
            if event.gap is not None:
                self._scalars("val", {"gap": event.gap}, self.step)
            if event.flags:
                w.add_text("flags", _flags_text(event.flags), self.step)
        elif isinstance(event, ev.EvalFinished):
            self._scalars("eval", dict(event.accuracy), self.step)
            if event.flags:
                w.add_text("flags", _flags_text(event.flags), self.step)
        elif isinstance(event, ev.Warning):
            w.add_text("warnings", _verbatim(event.message), self.step)
        elif isinstance(event, ev.ControlApplied):
            w.add_text("control", _verbatim(event.action), self.step)
        elif isinstance(event, ev.JobFailed):
            w.add_text("warnings", _verbatim("failed: " + event.message), self.step)
        elif isinstance(event, ev.Finished):
            w.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# --------------------------------------------------------------------------- csv


@dataclass
class CsvParams:
    """Where the CSV files go."""

    dir: str = ""  # empty: <run directory>/csv


def family(event: ev.Event) -> str:
    """The CSV file stem of an event type: ``StepEnd`` -> ``step_end``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(event).__name__).lower()


def _row(event: ev.Event) -> dict[str, Any]:
    """An event as one flat CSV row: dicts as ``field.key`` columns, lists as JSON, no config."""
    row: dict[str, Any] = {}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if f.name == "config":  # the resolved config is config.toml; a CSV cell is no place for it
            continue
        if isinstance(value, dict):
            for key, item in value.items():
                row[f"{f.name}.{key}"] = item
        elif isinstance(value, (list, tuple)):
            row[f.name] = json.dumps(value)
        else:
            row[f.name] = "" if value is None else value
    return row


class CsvTracker:
    """Appends each event to ``<dir>/<event type>.csv``; the header is written with the first row
    (a later row with new columns rewrites the file once with the wider header)."""

    def __init__(self, params: CsvParams) -> None:
        self.params = params
        self.dir: Path | None = None
        self.headers: dict[str, list[str]] = {}

    def open(self, run_dir: Path, config: dict[str, Any]) -> None:
        self.dir = Path(self.params.dir).expanduser() if self.params.dir else run_dir / "csv"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _header(self, path: Path) -> list[str]:
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                return next(csv.reader(fh), [])
        except FileNotFoundError:
            return []

    def on_event(self, event: ev.Event) -> None:
        if self.dir is None:
            self.open(Path("."), {})
        assert self.dir is not None
        name = family(event)
        path = self.dir / f"{name}.csv"
        row = _row(event)
        header = self.headers.get(name)
        if header is None:
            header = self.headers[name] = self._header(path)
        new = [key for key in row if key not in header]
        if new and header:  # widen: rewrite what is there under the union of the columns
            with open(path, newline="", encoding="utf-8") as fh:
                old_rows = list(csv.DictReader(fh))
            header = self.headers[name] = header + new
            with open(path, "w", newline="", encoding="utf-8") as fh:
                writer = csv.DictWriter(fh, fieldnames=header)
                writer.writeheader()
                writer.writerows(old_rows)
        elif new:
            header = self.headers[name] = new
            with open(path, "w", newline="", encoding="utf-8") as fh:
                csv.DictWriter(fh, fieldnames=header).writeheader()
        with open(path, "a", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, fieldnames=header, restval="").writerow(row)


# --------------------------------------------------------------------------- registration


@hookimpl
def register_trackers(register: Register) -> None:
    """Register the built-in trackers."""
    register("tensorboard", TensorBoardTracker, params=TensorBoardParams,
             description="TensorBoard event files (train/, val/, eval/ scalars; config and flags as "
             f"text) in <run>/tb; needs {TENSORBOARD_HINT}")
    register("csv", CsvTracker, params=CsvParams,
             description="one CSV file per event type (step_end.csv, eval_result.csv, ...) in <run>/csv")
