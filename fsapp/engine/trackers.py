"""Experiment trackers: the engine's events passed on to TensorBoard, CSV files or a plugin's tracker.

A tracker is a component of kind ``tracker`` (hook ``register_trackers``). Its factory receives
its params dataclass and returns an object with

- ``open(run_dir, config)`` (optional): called once, before the first event, with the run
  directory (a :class:`pathlib.Path`) and the resolved configuration as nested tables;
- ``on_event(event)``: called with every event (:mod:`fsapp.engine.events`), in order;
- ``close()`` (optional): called once, after the last event.

A tracker that raises, in any of the three, costs one :class:`~fsapp.engine.events.Warning`
naming it and the error, and is disabled for the rest of the job; the job itself never stops
because of a tracker. :func:`with_trackers` wraps any event iterator (a training or an
evaluation job) so that a front end wires trackers in one line.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from fsapp.engine import events as ev
from fsapp.errors import PluginError
from fsapp.plugins import Registry, get_registry
from fsapp.registry import parse_spec

log = logging.getLogger("fsapp")

__all__ = ["Tracker", "Trackers", "with_trackers"]


class Tracker(Protocol):
    """What a tracker component provides (``open`` and ``close`` may be left out)."""

    def on_event(self, event: ev.Event) -> None: ...


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Trackers:
    """The trackers of one job, built from spec strings (``"tensorboard"``, ``"csv:dir=out"``).

    Unknown names and bad parameters are the user's mistake and raise a UsageError here, before
    the job starts. Everything that goes wrong afterwards (a plugin's factory, ``open``,
    ``on_event``, ``close``) is returned as one warning event per tracker, which is then disabled.
    """

    def __init__(self, specs: Sequence[str], registry: Registry | None = None) -> None:
        registry = registry or get_registry()
        self.names: list[str] = []
        self.active: dict[str, Any] = {}
        self.pending: list[ev.Warning] = []
        self.opened = False
        for spec in specs:
            parsed = parse_spec(spec)
            label = self._label(parsed.name)
            self.names.append(label)
            try:
                self.active[label] = registry.create("tracker", parsed)
            except PluginError as exc:  # a plugin's factory raised: one warning, the job goes on
                self.pending.append(ev.Warning(f"tracker '{label}' disabled: {exc}"))

    def _label(self, name: str) -> str:
        label, k = name, 1
        while label in self.names:
            k += 1
            label = f"{name}#{k}"
        return label

    def _call(self, label: str, what: str, fn: Any, *args: Any) -> ev.Warning | None:
        try:
            fn(*args)
        except (Exception, SystemExit) as exc:  # a plugin calling sys.exit() must not end the job either
            self.active.pop(label, None)
            message = f"tracker '{label}' failed in {what} and is disabled: {_one_line(exc)}"
            log.debug("fsapp: %s", message, exc_info=True)
            return ev.Warning(message)
        return None

    def _drain(self) -> list[ev.Warning]:
        out, self.pending = self.pending, []
        return out

    def open(self, run_dir: str | Path, config: dict[str, Any] | None = None) -> list[ev.Warning]:
        """Open every tracker on ``run_dir`` with the resolved config tables."""
        self.opened = True
        warnings = self._drain()
        for label, tracker in list(self.active.items()):
            fn = getattr(tracker, "open", None)
            if fn is not None:
                problem = self._call(label, "open", fn, Path(run_dir), dict(config or {}))
                if problem is not None:
                    warnings.append(problem)
        return warnings

    def on_event(self, event: ev.Event) -> list[ev.Warning]:
        """Pass one event to every tracker still active."""
        warnings = self._drain()
        for label, tracker in list(self.active.items()):
            problem = self._call(label, f"on_event({type(event).__name__})", tracker.on_event, event)
            if problem is not None:
                warnings.append(problem)
        return warnings

    def close(self) -> list[ev.Warning]:
        """Close every tracker still active (idempotent)."""
        warnings = self._drain()
        for label, tracker in list(self.active.items()):
            fn = getattr(tracker, "close", None)
            if fn is not None:
                problem = self._call(label, "close", fn)
                if problem is not None:
                    warnings.append(problem)
        self.active.clear()
        return warnings


def _where(event: ev.Event, run_dir: str | Path | None) -> Path:
    """The directory trackers write under: the given one, else the job's own."""
    if run_dir is not None:
        return Path(run_dir)
    if isinstance(event, ev.RunStarted):
        return Path(event.run_dir)
    if isinstance(event, ev.EvalStarted):
        return Path(event.report).parent
    return Path(".")


def with_trackers(events: Iterable[ev.Event], specs: Sequence[str], run_dir: str | Path | None = None,
                  config_tables: dict[str, Any] | None = None,
                  registry: Registry | None = None) -> Iterator[ev.Event]:
    """Every event of ``events``, unchanged, also fed to the trackers named by ``specs``.

    The trackers open at the first event, on ``run_dir`` (default: the run directory a
    ``RunStarted`` names, or the folder of an ``EvalStarted``'s report) with ``config_tables``
    (default: the ``RunStarted``'s resolved config). A tracker's failure is yielded as an extra
    ``Warning`` event right after the event that caused it. Unknown tracker names raise a
    UsageError now, before the first event.
    """
    if not specs:
        return iter(events)
    trackers = Trackers(specs, registry)
    return _feed(iter(events), trackers, run_dir, config_tables)


def _feed(events: Iterator[ev.Event], trackers: Trackers, run_dir: str | Path | None,
          config_tables: dict[str, Any] | None) -> Iterator[ev.Event]:
    done = False
    try:
        for event in events:
            warnings: list[ev.Warning] = []
            if not trackers.opened:
                config = config_tables
                if config is None and isinstance(event, ev.RunStarted):
                    config = event.config
                warnings += trackers.open(_where(event, run_dir), config)
            warnings += trackers.on_event(event)
            yield event
            yield from warnings
        done = True
        yield from trackers.close()
    finally:
        if not done:  # the job failed or the consumer stopped early: close quietly
            for warning in trackers.close():
                log.warning("fsapp: %s", warning.message)
