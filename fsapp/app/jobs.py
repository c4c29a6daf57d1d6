"""Jobs as processes: launch ``fsapp train`` and ``fsapp eval`` as a user would type them, and follow them.

Every job a front end starts is its own ``python -m fsapp ...`` process, so its numbers cannot depend
on what else runs (torch's global generator, threads, memory belong to one job). A training job is
followed through its run directory (``metrics.jsonl``, the lock, the control channel, see
``docs/control.md``); an evaluation job through the JSON lines of its ``--events`` file and the
report named in its ``EvalFinished`` event.

Each :class:`Jobs` keeps its job files (the config a training starts from, each job's stderr, the
evaluations' event files) in one temporary folder. Jobs run in their own session, so a terminal's
Ctrl-C or a killed front end does not kill them: a training started here keeps training and can be
stopped with ``fsapp ctl RUN stop`` or from another ``fsapp tui``.

Nothing here imports torch or a UI package.
"""

from __future__ import annotations

import itertools
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from fsapp.app.request import EvalRequest
from fsapp.engine import events as ev
from fsapp.engine.rundir import (
    CHECKPOINT,
    CONFIG,
    EVAL_DIR,
    METRICS,
    Follower,
    RunLock,
    new_run_dir,
    send_request,
)
from fsapp.errors import UsageError

if TYPE_CHECKING:
    from fsapp.config import Config

TRAIN, EVAL = "train", "eval"
TAIL_BYTES = 8192


@dataclass
class Job:
    """One ``fsapp`` process: what it is, its files, and how it ended.

    ``status`` is running, finished, failed (a nonzero exit; ``error`` holds its last stderr line)
    or killed (ended by a signal).
    """

    id: str
    kind: str
    args: list[str]
    proc: subprocess.Popen[bytes]
    stderr_path: Path
    run_dir: Path | None = None
    events_path: Path | None = None
    report: Path | None = None
    started: float = field(default_factory=time.time)
    stop_requested: bool = False
    log_offset: int = 0
    follower: Follower | None = field(default=None, repr=False)

    @property
    def command(self) -> str:
        """The command line as a user would type it."""
        return shlex.join(["fsapp", *self.args])

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the process ended (negative: the signal that ended it), else None."""
        return self.proc.poll()

    @property
    def running(self) -> bool:
        return self.returncode is None

    @property
    def status(self) -> str:
        rc = self.returncode
        if rc is None:
            return "running"
        if rc == 0:
            return "finished"
        return "killed" if rc < 0 else "failed"

    @property
    def error(self) -> str:
        """One line saying why the job failed ("" while it runs or after a clean exit)."""
        rc = self.returncode
        if not rc:
            return ""
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"signal {-rc}"
            return f"killed by {name}"
        return last_line(self.stderr_path) or f"exited with status {rc}"

    def has_begun(self) -> bool:
        """Whether a training job has written to its run's ``metrics.jsonl`` yet."""
        if self.run_dir is None:
            return False
        try:
            return (self.run_dir / METRICS).stat().st_size > self.log_offset
        except OSError:
            return False

    def read_events(self) -> list[ev.Event]:
        """Events appended to the job's ``--events`` file since the last call (evaluations)."""
        if self.follower is None:
            return []
        return self.follower.read()

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process (nothing when it already ended)."""
        if self.running:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the process to end; its exit status, or None on timeout."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


def last_line(path: Path) -> str:
    """The last non-empty line of a text file (``error: `` dropped), or ""."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - TAIL_BYTES))
            tail = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1]
    return line[len("error: "):] if line.startswith("error: ") else line


class Jobs:
    """The jobs one front end started: launch, look up, poll, stop.

    ``env`` adds environment variables to every job (tests pin ``OMP_NUM_THREADS``).
    """

    def __init__(self, folder: Path | None = None, env: dict[str, str] | None = None,
                 python: str = sys.executable) -> None:
        self._own_folder = folder is None
        self._folder = None if folder is None else Path(folder)
        self.env = dict(env or {})
        self.python = python
        self.jobs: list[Job] = []
        self._ids = itertools.count(1)
        self._ended: set[str] = set()

    @property
    def folder(self) -> Path:
        """Where the job files go (a temporary folder made on the first launch, unless given)."""
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="fsapp-jobs-"))
        return self._folder

    # -- launching ---------------------------------------------------------------------------
    def _launch(self, kind: str, args: list[str], **info: object) -> Job:
        job_id = f"{kind}-{next(self._ids)}"
        stderr_path = self.folder / f"{job_id}.stderr"
        env = os.environ | {"NO_COLOR": "1", "PYTHONUNBUFFERED": "1"} | self.env
        try:
            with open(stderr_path, "wb") as err:
                proc = subprocess.Popen([self.python, "-m", "fsapp", *args], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
        except OSError as exc:
            raise UsageError(f"cannot start `fsapp {kind}`: {exc.strerror or exc}") from None
        job = Job(job_id, kind, args, proc, stderr_path, **info)  # type: ignore[arg-type]
        self.jobs.append(job)
        return job

    def start_train(self, cfg: Config) -> Job:
        """Train ``cfg`` in a new run directory under its ``run.runs_dir``: write the resolved config
        to a TOML file and launch ``fsapp train CONFIG --run-dir DIR -q``."""
        from fsapp.config import resolved_tables, to_toml

        taken = {j.run_dir for j in self.jobs if j.run_dir is not None}
        path = new_run_dir(cfg.run.runs_dir, cfg.run.name, cfg.method.perturbation, cfg.data.name, taken)
        if (path / CONFIG).exists():
            raise UsageError(f"{path} already holds a run; resume it (r) or choose another run name")
        if self.active_for(path) is not None:
            raise UsageError(f"{path} is already being started")
        config = self.folder / f"train-{len(self.jobs) + 1}-{path.name}.toml"
        try:
            config.write_text(to_toml(resolved_tables(cfg)), encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write {config}: {exc.strerror}") from None
        return self._launch(TRAIN, ["train", str(config), "--run-dir", str(path), "-q"], run_dir=path)

    def resume_train(self, run_dir: Path) -> Job:
        """Continue an interrupted run from its checkpoint: ``fsapp train --resume DIR -q``."""
        run_dir = Path(run_dir)
        if self.active_for(run_dir) is not None or RunLock.is_held(run_dir):
            raise UsageError(f"{run_dir.name} is training now; nothing to resume")
        if not (run_dir / CHECKPOINT).is_file():
            raise UsageError(f"{run_dir.name} has no checkpoint to resume from")
        try:
            offset = (run_dir / METRICS).stat().st_size
        except OSError:
            offset = 0
        return self._launch(TRAIN, ["train", "--resume", str(run_dir), "-q"], run_dir=run_dir, log_offset=offset)

    def start_eval(self, request: EvalRequest) -> Job:
        """Launch ``fsapp eval ... --events FILE --out REPORT --json``; the report goes to ``eval/``
        next to the model file, as the CLI's does, under a name no other job uses."""
        job_n = len(self.jobs) + 1
        events = self.folder / f"eval-{job_n}.events.jsonl"
        report = self._report_path(Path(request.model))
        args = request.args() + ["--out", str(report), "--events", str(events), "--json"]
        job = self._launch(EVAL, args, events_path=events, report=report)
        job.follower = Follower(events)
        return job

    def _report_path(self, model: Path) -> Path:
        folder = model.parent / EVAL_DIR
        stem = time.strftime("%Y%m%d-%H%M%S")
        taken = {j.report for j in self.jobs}
        path, k = folder / f"{stem}.json", 1
        while path.exists() or path in taken:
            k += 1
            path = folder / f"{stem}-{k}.json"
        return path

    # -- looking up ----------------------------------------------------------------------------
    def active(self, kind: str | None = None) -> list[Job]:
        """The jobs still running (of ``kind``)."""
        return [j for j in self.jobs if j.running and (kind is None or j.kind == kind)]

    def active_for(self, run_dir: Path) -> Job | None:
        """The running training job of ``run_dir``, if this front end started one."""
        return next((j for j in reversed(self.jobs) if j.run_dir == run_dir and j.running), None)

    def latest_for(self, run_dir: Path) -> Job | None:
        """The most recent training job of ``run_dir`` started here, running or not."""
        return next((j for j in reversed(self.jobs) if j.run_dir == run_dir), None)

    def get(self, job_id: str) -> Job | None:
        return next((j for j in self.jobs if j.id == job_id), None)

    def training_paths(self) -> set[Path]:
        """Run directories of the training jobs still running."""
        return {j.run_dir for j in self.active(TRAIN) if j.run_dir is not None}

    def poll(self) -> list[Job]:
        """The jobs that ended since the last call."""
        ended = [j for j in self.jobs if j.id not in self._ended and not j.running]
        self._ended.update(j.id for j in ended)
        return ended

    # -- stopping ------------------------------------------------------------------------------
    def request_stop(self, job: Job) -> bool:
        """Ask a job to end cleanly: a training run through its control channel (it saves a
        checkpoint), an evaluation with SIGINT (it keeps its finished batches for ``--resume``).
        False when a training job does not hold its run directory yet (ask again shortly)."""
        if not job.running:
            return True
        if job.kind == EVAL:
            job.signal(signal.SIGINT)
            job.stop_requested = True
            return True
        assert job.run_dir is not None
        if RunLock.holder(job.run_dir) != job.pid:
            return False
        try:
            send_request(job.run_dir, "stop")
        except UsageError:
            return False
        job.stop_requested = True
        return True

    def stop_all(self, timeout: float = 600.0) -> None:
        """Stop every running job cleanly and wait for them (blocking; front ends call
        :meth:`request_stop` and poll instead)."""
        deadline = time.monotonic() + timeout
        while self.active() and time.monotonic() < deadline:
            for job in self.active():
                if not job.stop_requested:
                    self.request_stop(job)
            time.sleep(0.1)

    def close(self) -> None:
        """Delete the job files once no job runs (a running job keeps writing its stderr there)."""
        if self._own_folder and self._folder is not None and not self.active():
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
