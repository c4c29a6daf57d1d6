"""Runs driven by this process: their control flags, state, and the messages their worker posts."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from textual.message import Message

from fsapp.engine import events as ev

if TYPE_CHECKING:
    from textual.worker import Worker

    from fsapp.engine.rundir import Control


@dataclass
class LiveRun:
    """A training run in a worker thread of this app.

    ``phase`` is starting, running, stopping, done or failed; pausing is ``control.pause``.
    """

    path: Path
    control: Control
    resumed: bool = False
    phase: str = "starting"
    error: str = ""
    worker: Worker[Any] | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.phase in ("starting", "running", "stopping")

    @property
    def paused(self) -> bool:
        return self.active and self.control.pause.is_set()

    def describe(self) -> str:
        """Phase as a short word for status lines."""
        if self.phase == "running" and self.control.pause.is_set():
            return "paused"
        return self.phase


class TrainEvent(Message):
    """An engine event from the training worker of the run at ``path``."""

    def __init__(self, path: Path, event: ev.Event) -> None:
        super().__init__()
        self.path = path
        self.event = event


class TrainDone(Message):
    """The training worker of ``path`` ended (``error`` empty when it ended cleanly)."""

    def __init__(self, path: Path, error: str = "") -> None:
        super().__init__()
        self.path = path
        self.error = error
