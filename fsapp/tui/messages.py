"""Every message of the interface: requests screens post up to the app, and news the app sends down.

Up (they bubble from a screen to :class:`fsapp.tui.app.FsappApp`): open a run, start or resume a
training, control a run, open Evaluate, start an evaluation, the runs marked for Compare.
Down (posted by the app to the screens; they do not bubble): jobs started or ended, an evaluation
job's events, an evaluation that could not start.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from textual.message import Message

if TYPE_CHECKING:
    from fsapp.app.jobs import Job
    from fsapp.app.request import EvalRequest
    from fsapp.config import Config
    from fsapp.engine import events as ev


# -- up: a screen asks the app ---------------------------------------------------------------------

class OpenRun(Message):
    """Show the dashboard of the run at ``path``."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path


class StartRun(Message):
    """Train ``config`` as a new run (``fsapp train`` in its own process), then show its dashboard."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config


class ResumeRun(Message):
    """Continue the interrupted run at ``path`` (``fsapp train --resume``); ``show`` opens its dashboard."""

    def __init__(self, path: Path, show: bool = True) -> None:
        super().__init__()
        self.path = path
        self.show = show


class ControlRun(Message):
    """Ask the process training ``path`` to ``action`` (pause, resume, stop, checkpoint, evaluate)."""

    def __init__(self, path: Path, action: str) -> None:
        super().__init__()
        self.path = path
        self.action = action


class OpenEvaluate(Message):
    """Open the Evaluate screen on ``model`` (a path, or "" for an empty form)."""

    def __init__(self, model: str = "") -> None:
        super().__init__()
        self.model = model


class StartEval(Message):
    """Launch ``fsapp eval`` for ``request``; the answer comes down as :class:`EvalJobStarted` or
    :class:`EvalJobRefused` carrying the same ``ticket``."""

    def __init__(self, request: EvalRequest, ticket: str) -> None:
        super().__init__()
        self.request = request
        self.ticket = ticket


class OpenReport(Message):
    """Show the saved evaluation report at ``path``."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path


class MarksChanged(Message):
    """The runs marked for Compare."""

    def __init__(self, paths: frozenset[Path]) -> None:
        super().__init__()
        self.paths = paths


# -- down: the app tells the screens ---------------------------------------------------------------

class Down(Message, bubble=False):
    """News from the app to one screen."""


class JobsChanged(Down):
    """A job started or ended: re-read what depends on the jobs."""


class EvalJobStarted(Down):
    """The evaluation asked for with ``ticket`` runs as ``job``."""

    def __init__(self, ticket: str, job: Job) -> None:
        super().__init__()
        self.ticket = ticket
        self.job = job


class EvalJobRefused(Down):
    """The evaluation asked for with ``ticket`` could not start: ``error`` says why."""

    def __init__(self, ticket: str, error: str) -> None:
        super().__init__()
        self.ticket = ticket
        self.error = error


class EvalJobEvents(Down):
    """Events an evaluation job appended to its ``--events`` file."""

    def __init__(self, job_id: str, events: Sequence[ev.Event]) -> None:
        super().__init__()
        self.job_id = job_id
        self.events = list(events)
