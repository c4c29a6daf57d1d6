"""``fsapp ctl RUN ACTION``: steer a running training from any terminal or script.

The request goes through the run directory's control channel (``docs/control.md``): a small JSON
file addressed to the pid holding the run's lock, taken by the training loop at its next step.
"""

from __future__ import annotations

import time
from pathlib import Path

from fsapp.engine.rundir import ACTIONS, RunLock, send_request
from fsapp.errors import FsappError, UsageError

WHAT = {"pause": "paused", "resume": "resumed", "stop": "stopping (a checkpoint is saved)",
        "checkpoint": "saving a checkpoint", "evaluate": "evaluating now"}


def control(run_dir: Path, action: str, wait: float | None) -> str:
    """Send ``action`` to the process training ``run_dir``; with ``wait``, wait until it is taken.

    Returns the line to print. UsageError (exit 2) when the action is unknown or nobody trains
    the run; FsappError (exit 1) when the request was not taken in time.
    """
    if action not in ACTIONS:
        raise UsageError(f"unknown action '{action}'; valid: {', '.join(ACTIONS)}")
    if wait is not None and wait < 0:
        raise UsageError(f"--wait must be >= 0 seconds, got {wait}")
    request = send_request(run_dir, action)
    pid = _addressee(request)
    if wait is None:
        return f"{action} sent to {run_dir} (pid {pid}); it is taken at the next step"
    deadline = time.monotonic() + wait
    while request.exists():
        ended = RunLock.holder(run_dir) != pid
        if ended or time.monotonic() > deadline:
            if not _withdraw(request):
                break  # taken at the last moment
            if ended:
                raise FsappError(f"{run_dir} stopped training before taking the {action} request")
            raise FsappError(f"{run_dir} (pid {pid}) did not take the {action} request within {wait:g} s; "
                             "request withdrawn")
        time.sleep(0.05)
    return f"{action} taken by {run_dir} (pid {pid}): {WHAT[action]}"


def _addressee(request: Path) -> int | None:
    """The pid a request file is addressed to."""
    import json

    try:
        return int(json.loads(request.read_text(encoding="utf-8"))["target_pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return RunLock.holder(request.parent.parent)


def _withdraw(request: Path) -> bool:
    """Delete a request nobody took; False when it was taken meanwhile."""
    try:
        request.unlink()
    except FileNotFoundError:
        return False
    return True
