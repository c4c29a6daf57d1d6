"""Frozen event dataclasses: one stream for the CLI, the TUI and the run directory."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    """Base class; ``to_dict`` gives the JSON line written to ``metrics.jsonl``."""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["event"] = type(self).__name__
        return data


@dataclass(frozen=True)
class RunStarted(Event):
    run_dir: str
    device: str
    epochs: int
    steps_per_epoch: int
    start_epoch: int
    start_step: int
    resumed: bool
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepEnd(Event):
    epoch: int
    step: int
    global_step: int
    total_steps: int
    loss: float
    accuracy: float
    lr: float
    images_per_sec: float
    eta_sec: float


@dataclass(frozen=True)
class EpochEnd(Event):
    epoch: int
    loss: float
    accuracy: float
    lr: float
    seconds: float
    bad_steps: int = 0


@dataclass(frozen=True)
class EvalResult(Event):
    epoch: int
    n: int
    accuracy: dict[str, float]
    gap: float | None
    flags: list[dict[str, str]]
    seconds: float
    global_step: int = -1
    split: str = "test"  # "validation" (held out of the training split) or "test"


@dataclass(frozen=True)
class CheckpointSaved(Event):
    path: str
    epoch: int
    step: int
    global_step: int


@dataclass(frozen=True)
class Warning(Event):  # noqa: A001 - the event's name in metrics.jsonl
    message: str
    global_step: int = -1


@dataclass(frozen=True)
class ControlApplied(Event):
    """A front end's request (pause, resume, stop, checkpoint, evaluate) taken by the loop."""

    action: str
    global_step: int = -1


@dataclass(frozen=True)
class Finished(Event):
    model_path: str
    run_dir: str
    seconds: float
    stopped: bool = False


@dataclass(frozen=True)
class EvalStarted(Event):
    """An evaluation job began: the model file, samples, attack specs, sweeps and the report path."""

    model: str
    n: int
    attacks: list[str]
    sweeps: list[str]
    report: str


@dataclass(frozen=True)
class EvalProgress(Event):
    """Progress of one attack (``stage``: an AutoAttack stage, else empty): samples done of total,
    and how many of those are still robust."""

    key: str
    stage: str
    done: int
    total: int
    robust: int


@dataclass(frozen=True)
class EvalFinished(Event):
    """An evaluation job wrote its report."""

    report: str
    accuracy: dict[str, float]
    flags: list[dict[str, str]]
    seconds: float


@dataclass(frozen=True)
class JobFailed(Event):
    """A job (training or evaluation) ended with an error; ``message`` is its one line."""

    message: str


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (RunStarted, StepEnd, EpochEnd, EvalResult, CheckpointSaved, Warning, ControlApplied, Finished,
                EvalStarted, EvalProgress, EvalFinished, JobFailed)
}


def from_dict(data: dict[str, Any]) -> Event:
    """Rebuild an event from its ``metrics.jsonl`` line (unknown fields ignored)."""
    cls = EVENT_TYPES[data["event"]]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})
