"""Run directories: their layout, the writer's lock and log, the follower, and the control channel.

One module owns everything a run directory is made of, so the engine that writes one, the front
ends that follow one and ``fsapp ctl`` that steers one agree on names and rules. Nothing here
imports torch or a UI package: it is quick to import and safe to call on a timer.

Layout (docs/ALGORITHM.md and the README describe the files)::

    runs/<name>/
      config.toml  manifest.json  metrics.jsonl  checkpoint.safetensors  model.safetensors
      eval/<time>.json   .lock   control/<request>.json
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fsapp.engine import events as ev
from fsapp.errors import UsageError

CONFIG = "config.toml"
MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.safetensors"
MODEL = "model.safetensors"
BEST = "best.safetensors"  # the weights of the best live evaluation on the validation split
EVAL_DIR = "eval"
LOCK_NAME = ".lock"
CONTROL_DIR = "control"
STALE_SECONDS = 300.0
"""A run with no Finished event whose log grew this recently counts as running (runs without a lock)."""


def new_run_dir(runs_dir: str | Path, name: str, perturbation: str, dataset: str,
                taken: set[Path] | frozenset[Path] = frozenset()) -> Path:
    """The run directory for a new run: ``runs_dir/name``, or ``<time>-<perturbation>-<dataset>``
    (with ``-2``, ``-3``... appended) when unnamed, avoiding directories that exist or are ``taken``."""
    root = Path(runs_dir)
    if name:
        return root / name
    base = time.strftime("%Y%m%d-%H%M%S") + f"-{perturbation}-{dataset}"
    path, suffix = root / base, 1
    while path.exists() or path in taken:
        suffix += 1
        path = root / f"{base}-{suffix}"
    return path


# -- the writer ----------------------------------------------------------------------------------


class RunLog:
    """Appends events to ``metrics.jsonl`` (one JSON object per line).

    A torn last line (a writer killed mid-append) is closed with a newline before the first new
    event, so it never glues onto the next one; the follower skips it as malformed.
    """

    def __init__(self, path: Path) -> None:
        self.fh = open(path, "a+b")
        self.fh.seek(0, os.SEEK_END)
        if self.fh.tell() > 0:
            self.fh.seek(-1, os.SEEK_END)
            if self.fh.read(1) != b"\n":
                self.fh.seek(0, os.SEEK_END)
                self.fh.write(b"\n")
        self.fh.seek(0, os.SEEK_END)

    def write(self, event: ev.Event) -> ev.Event:
        self.fh.write((json.dumps(event.to_dict()) + "\n").encode("utf-8"))
        self.fh.flush()
        return event

    def close(self) -> None:
        self.fh.close()


class NullLog(RunLog):
    """What ranks other than 0 log to under torchrun: nothing."""

    def __init__(self) -> None:
        pass

    def write(self, event: ev.Event) -> ev.Event:
        return event

    def close(self) -> None:
        pass


# -- the lock -----------------------------------------------------------------------------------

class RunLock:
    """An exclusive lock on ``run_dir/.lock``; a crashed holder leaves nothing stuck (the OS
    releases ``flock`` locks when the process dies)."""

    def __init__(self, run_dir: Path, fd: int) -> None:
        self.run_dir = run_dir
        self.fd = fd

    @classmethod
    def acquire(cls, run_dir: str | Path) -> "RunLock":
        """Take the lock or raise a UsageError naming the process that holds it."""
        run_dir = Path(run_dir)
        path = run_dir / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot write in run directory {run_dir}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UsageError(
                f"{run_dir} is being written by another fsapp process (pid {holder}); "
                "wait for it to finish or stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return cls(run_dir, fd)

    def release(self) -> None:
        """Give the lock up (idempotent)."""
        if self.fd >= 0:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = -1

    @staticmethod
    def is_held(run_dir: str | Path) -> bool:
        """Whether some live process holds the run's lock (used to tell running from interrupted)."""
        path = Path(run_dir) / LOCK_NAME
        if not path.exists():
            return False
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    @staticmethod
    def holder(run_dir: str | Path) -> int | None:
        """The pid of the live process holding the lock, or None when nobody holds it."""
        path = Path(run_dir) / LOCK_NAME
        if not RunLock.is_held(run_dir):
            return None
        try:
            return int(path.read_text(encoding="ascii").strip() or "0") or None
        except (OSError, ValueError):
            return None


# -- the control channel ---------------------------------------------------------------------------

ACTIONS = ("pause", "resume", "stop", "checkpoint", "evaluate")
"""What any front end may ask of a running training: pause, resume, stop with a checkpoint,
checkpoint now, evaluate now."""


@dataclass
class Control:
    """Requests to a running loop, as thread-safe flags checked between steps.

    In-process callers (``fsapp.train(..., control=...)``) set them directly; a
    :class:`ControlChannel` sets them from request files written by other processes.
    """

    stop: threading.Event
    pause: threading.Event
    checkpoint_now: threading.Event
    evaluate_now: threading.Event

    @classmethod
    def new(cls) -> "Control":
        return cls(threading.Event(), threading.Event(), threading.Event(), threading.Event())

    def apply(self, action: str) -> None:
        """Set the flag an action names (see :data:`ACTIONS`)."""
        if action == "pause":
            self.pause.set()
        elif action == "resume":
            self.pause.clear()
        elif action == "stop":
            self.stop.set()
        elif action == "checkpoint":
            self.checkpoint_now.set()
        elif action == "evaluate":
            self.evaluate_now.set()
        else:
            raise UsageError(f"unknown control action '{action}'; valid: {', '.join(ACTIONS)}")


def send_request(run_dir: str | Path, action: str) -> Path:
    """Ask the process training ``run_dir`` to ``action``; returns the request file.

    The request names the writer's pid (from the lock), so a writer started later never acts on
    it. Refused with one line when nobody trains the run.
    """
    run_dir = Path(run_dir)
    if action not in ACTIONS:
        raise UsageError(f"unknown control action '{action}'; valid: {', '.join(ACTIONS)}")
    if not (run_dir / CONFIG).is_file() and not (run_dir / METRICS).is_file():
        raise UsageError(f"{run_dir} is not a run directory (no config.toml or metrics.jsonl)")
    pid = RunLock.holder(run_dir)
    if pid is None:
        raise UsageError(f"{run_dir} is not training now (no fsapp process holds it); nothing to {action}")
    folder = run_dir / CONTROL_DIR
    stamp = f"{time.time_ns()}-{os.getpid()}-{action}"
    body = json.dumps({"action": action, "target_pid": pid, "from_pid": os.getpid(),
                       "time": time.time()}) + "\n"
    try:
        folder.mkdir(exist_ok=True)
        tmp = folder / f".{stamp}.tmp"
        tmp.write_text(body, encoding="utf-8")
        final = folder / f"{stamp}.json"
        os.replace(tmp, final)
    except OSError as exc:
        raise UsageError(f"cannot write a request in {folder}: {exc.strerror or exc}") from None
    return final


def wait_taken(request: Path, timeout: float) -> bool:
    """Wait until the writer has taken ``request`` (its file is gone); False on timeout."""
    deadline = time.monotonic() + timeout
    while request.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class ControlChannel:
    """The writer's side: reads the request files addressed to this process, oldest first.

    :meth:`discard_stale` at start removes every request left from before (a dead requester, an
    earlier writer); afterwards requests addressed to another pid are dropped unread.
    """

    def __init__(self, run_dir: str | Path, interval: float = 0.1, pid: int | None = None) -> None:
        self.folder = Path(run_dir) / CONTROL_DIR
        self.interval = interval
        self.pid = os.getpid() if pid is None else pid
        self._last = 0.0

    def discard_stale(self) -> int:
        """Delete every pending request (called once the lock is held); returns how many."""
        n = 0
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return 0
        for entry in entries:
            if entry.name.endswith(".json") or (entry.name.startswith(".") and entry.name.endswith(".tmp")):
                try:
                    os.unlink(entry.path)
                    n += 1
                except OSError:
                    pass
        return n

    def poll(self, force: bool = False) -> list[str]:
        """Actions requested since the last call (at most one directory scan per ``interval``)."""
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return []
        self._last = now
        try:
            names = sorted(e.name for e in os.scandir(self.folder) if e.name.endswith(".json")
                           and not e.name.startswith("."))
        except OSError:
            return []
        actions = []
        for name in names:
            path = self.folder / name
            try:
                with open(path, "rb") as fh:
                    data = json.loads(fh.read(4096))
                os.unlink(path)
            except (OSError, ValueError):
                try:
                    os.unlink(path)
                except OSError:
                    pass
                continue
            if not isinstance(data, dict) or data.get("target_pid") != self.pid:
                continue
            action = data.get("action")
            if action in ACTIONS:
                actions.append(action)
        return actions

    def apply_to(self, control: Control, force: bool = False) -> list[str]:
        """Poll and set ``control``'s flags; returns the actions applied."""
        actions = self.poll(force)
        for action in actions:
            control.apply(action)
        return actions


# -- the follower ----------------------------------------------------------------------------------

class Follower:
    """Reads the events appended to a ``metrics.jsonl`` since the last call.

    A partial last line waits for its newline; a malformed line is skipped; a file that
    shrank (rewritten) starts over and sets ``restarted``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.restarted = False

    def read(self) -> list[ev.Event]:
        """New complete events (possibly none)."""
        self.restarted = False
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size < self.offset:
            self.offset, self.partial, self.restarted = 0, b"", True
        if size == self.offset:
            return []
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read(size - self.offset)
        except OSError:
            return []
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        out: list[ev.Event] = []
        for line in lines:
            if line.strip():
                try:
                    out.append(ev.from_dict(json.loads(line)))
                except (ValueError, KeyError, TypeError):
                    continue
        return out


@dataclass
class RunState:
    """Everything the dashboard shows, folded from a run's events in order."""

    started: ev.RunStarted | None = None
    steps: list[ev.StepEnd] = field(default_factory=list)
    epochs: list[ev.EpochEnd] = field(default_factory=list)
    evals: list[ev.EvalResult] = field(default_factory=list)
    checkpoint: ev.CheckpointSaved | None = None
    warnings: list[ev.Warning] = field(default_factory=list)
    finished: ev.Finished | None = None
    config: dict[str, Any] = field(default_factory=dict)
    count: int = 0
    paused: bool = False

    def add(self, event: ev.Event) -> None:
        """Fold one event in; a resumed RunStarted drops what came after its checkpoint."""
        self.count += 1
        if isinstance(event, ev.RunStarted):
            self.started, self.finished, self.paused = event, None, False
            if event.config:
                self.config = event.config
            if event.resumed:
                self._rewind(event)
        elif isinstance(event, ev.StepEnd):
            self.steps.append(event)
        elif isinstance(event, ev.EpochEnd):
            self.epochs.append(event)
        elif isinstance(event, ev.EvalResult):
            self.evals.append(event)
        elif isinstance(event, ev.CheckpointSaved):
            self.checkpoint = event
        elif isinstance(event, ev.Warning):
            self.warnings.append(event)
        elif isinstance(event, ev.ControlApplied):
            if event.action in ("pause", "resume"):
                self.paused = event.action == "pause"
        elif isinstance(event, ev.Finished):
            self.finished = event

    def _rewind(self, start: ev.RunStarted) -> None:
        g = start.start_epoch * start.steps_per_epoch + start.start_step
        self.steps = [s for s in self.steps if s.global_step <= g]
        self.epochs = [e for e in self.epochs if e.epoch < start.start_epoch]
        self.evals = [v for v in self.evals
                      if v.epoch < start.start_epoch or (v.epoch == start.start_epoch and start.start_step > 0)]

    @property
    def epochs_total(self) -> int:
        if self.started is not None:
            return self.started.epochs
        return int(self.config.get("schedule", {}).get("epochs", 0) or 0)

    @property
    def epochs_done(self) -> int:
        return max((e.epoch + 1 for e in self.epochs), default=0)

    @property
    def last_step(self) -> ev.StepEnd | None:
        return self.steps[-1] if self.steps else None

    @property
    def best_robust(self) -> tuple[float, int] | None:
        """Best worst-case accuracy and the (0-based) epoch it was seen at, on the live-evaluation
        split (:attr:`best_split` says which)."""
        best: tuple[float, int] | None = None
        for result in self.evals:
            value = result.accuracy.get("worst_case")
            if value is not None and (best is None or value > best[0]):
                best = (value, result.epoch)
        return best

    @property
    def best_split(self) -> str | None:
        """Where live evaluation ran: ``validation`` (held out of the training split, where
        best.safetensors is chosen) or ``test`` (a run without a validation split); None before
        any evaluation."""
        return self.evals[-1].split if self.evals else None

    @property
    def last_eval(self) -> ev.EvalResult | None:
        return self.evals[-1] if self.evals else None


class RunTracker:
    """A run directory's state kept current by following its ``metrics.jsonl``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.follower = Follower(path / METRICS)
        self.state = RunState(config=read_config(path))

    def poll(self) -> list[ev.Event]:
        """Fold in new events; returns them (all of them again if the file was rewritten)."""
        new = self.follower.read()
        if self.follower.restarted:
            self.state = RunState(config=read_config(self.path))
        for event in new:
            self.state.add(event)
        return new


def read_config(path: Path) -> dict[str, Any]:
    """The run's ``config.toml`` as tables ({} when missing or unreadable)."""
    try:
        return tomllib.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return {}


def lock_state(path: Path) -> bool | None:
    """Whether a live process holds the run directory's lock (the engine's ``.lock``); None when
    the run has no lock file (written by an engine that did not lock)."""
    if not (path / LOCK_NAME).exists():
        return None
    try:
        return RunLock.is_held(path)
    except OSError:
        return None


def run_status(path: Path, state: RunState, live: bool = False, now: float | None = None) -> str:
    """``finished`` (a Finished event, not stopped), ``running`` (trained by this process, or its
    lock held by a live process, or, for runs without a lock file, no Finished event and a log that
    grew in the last ``STALE_SECONDS``), else ``interrupted``."""
    if live:
        return "running"
    held = lock_state(path)
    if held:
        return "running"
    if state.finished is not None:
        return "interrupted" if state.finished.stopped else "finished"
    if held is False:
        return "interrupted"
    try:
        mtime = (path / METRICS).stat().st_mtime
    except OSError:
        return "interrupted"
    now = time.time() if now is None else now
    return "running" if now - mtime < STALE_SECONDS else "interrupted"


def started_at(path: Path) -> tuple[float, str]:
    """When the run was created (sort key, display text): the manifest's time, else the files'."""
    try:
        created = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["created"]
        when = datetime.strptime(created, "%Y-%m-%dT%H:%M:%S%z")
        return when.timestamp(), when.strftime("%Y-%m-%d %H:%M")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for name in (CONFIG, METRICS):
        try:
            mtime = (path / name).stat().st_mtime
            return mtime, time.strftime("%Y-%m-%d %H:%M", time.localtime(mtime))
        except OSError:
            continue
    return 0.0, "?"


@dataclass(frozen=True)
class RunSummary:
    """One row of the runs table."""

    name: str
    path: Path
    method: str
    dataset: str
    model: str
    status: str
    epochs_done: int
    epochs_total: int
    best_robust: float | None
    when: str
    sort_key: float
    resumable: bool
    best_split: str | None = None  # "validation" or "test": where best_robust was measured

    def matches(self, text: str) -> bool:
        """Case-insensitive substring filter over the visible columns."""
        text = text.strip().lower()
        hay = " ".join((self.name, self.method, self.dataset, self.model, self.status, self.when)).lower()
        return all(word in hay for word in text.split())


def summarise(path: Path, state: RunState, live: bool = False, now: float | None = None,
              when: tuple[float, str] | None = None) -> RunSummary:
    """The runs-table row of a tracked run (``when``: its :func:`started_at`, if known)."""
    cfg = state.config
    method = cfg.get("method", {})
    label = str(method.get("perturbation", "?"))
    status = run_status(path, state, live, now)
    best = state.best_robust
    sort_key, when_text = when or started_at(path)
    return RunSummary(
        name=path.name, path=path, method=label, dataset=str(cfg.get("data", {}).get("name", "?")),
        model=str(cfg.get("model", {}).get("name", "?")), status=status, epochs_done=state.epochs_done,
        epochs_total=state.epochs_total, best_robust=best[0] if best else None, when=when_text,
        sort_key=sort_key, resumable=status == "interrupted" and (path / CHECKPOINT).is_file(),
        best_split=state.best_split,
    )


class RunIndex:
    """All run directories under a root, each followed incrementally."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.trackers: dict[Path, RunTracker] = {}
        self.created: dict[Path, tuple[float, str]] = {}

    def tracker(self, path: Path) -> RunTracker:
        """The (cached) tracker of one run directory, polled."""
        tracker = self.trackers.get(path)
        if tracker is None:
            tracker = self.trackers[path] = RunTracker(path)
        elif not tracker.state.config:
            tracker.state.config = read_config(path)
        tracker.poll()
        return tracker

    def scan(self, live: set[Path] | None = None, now: float | None = None) -> list[RunSummary]:
        """Summaries of every run directory (has a config.toml or metrics.jsonl), newest first."""
        live = live or set()
        rows = []
        try:
            children = [p for p in self.root.iterdir() if p.is_dir()]
        except OSError:
            children = []
        for path in children:
            if not ((path / CONFIG).is_file() or (path / METRICS).is_file()):
                continue
            if path not in self.created and (path / MANIFEST).is_file():
                self.created[path] = started_at(path)
            when = self.created.get(path) or started_at(path)
            rows.append(summarise(path, self.tracker(path).state, path in live, now, when))
        rows.sort(key=lambda r: (r.sort_key, r.name), reverse=True)
        return rows


def load_state(path: Path) -> RunState:
    """A run's full state, read once."""
    tracker = RunTracker(path)
    tracker.poll()
    return tracker.state


def flatten(tables: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``."""
    out: dict[str, Any] = {}
    for key, value in tables.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_diff(configs: list[dict[str, Any]]) -> list[tuple[str, list[Any]]]:
    """Keys whose values differ between configs (missing keys count), in first-seen order.

    ``run.name`` and ``run.runs_dir`` are left out: they differ by construction.
    """
    flat = [flatten(c) for c in configs]
    keys: list[str] = []
    for f in flat:
        keys.extend(k for k in f if k not in keys)
    skip = {"run.name", "run.runs_dir"}
    rows = []
    for key in keys:
        values = [f.get(key) for f in flat]
        if key not in skip and any(v != values[0] for v in values[1:]):
            rows.append((key, values))
    return rows
