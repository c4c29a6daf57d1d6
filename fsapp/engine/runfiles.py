"""What training may do to a run directory before it writes: which files are fsapp's own
leftovers, which directories are not runs, and the one line a failed write becomes."""

from __future__ import annotations

import os
import re
from pathlib import Path

from fsapp.engine.rundir import CHECKPOINT, CONFIG, CONTROL_DIR, LOCK_NAME, MANIFEST, METRICS, MODEL
from fsapp.errors import UsageError

DDP_INFO = "ddp.json"
ATOMIC_FILES = (CONFIG, MANIFEST, CHECKPOINT, MODEL, DDP_INFO)
"""The files training writes atomically (through :func:`fsapp.checkpoint.atomic_write_bytes`)."""

TEMP_NAME = re.compile(r"\.(?:" + "|".join(re.escape(n) for n in ATOMIC_FILES) + r")\.[a-z0-9_]{8}\.tmp")
"""The temp names ``atomic_write_bytes`` gives those files (``tempfile.mkstemp`` with prefix
``.<name>.`` and suffix ``.tmp``: eight characters of ``a-z0-9_`` between)."""


def is_own_temp(name: str) -> bool:
    """Whether ``name`` is a temp file a killed fsapp writer left in a run directory."""
    return TEMP_NAME.fullmatch(name) is not None


def remove_own_temp_files(run_path: Path) -> int:
    """Delete the temp files of a killed writer (and nothing else); returns how many."""
    removed = 0
    for entry in os.scandir(run_path):
        if entry.is_file(follow_symlinks=False) and is_own_temp(entry.name):
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed


def refuse_foreign(run_path: Path) -> None:
    """A UsageError when ``run_path`` is a non-empty directory that is not an fsapp run (no
    config.toml or metrics.jsonl; fsapp's own lock, control folder and temp files do not count)."""
    if not run_path.is_dir() or (run_path / CONFIG).exists() or (run_path / METRICS).exists():
        return
    others = sorted(e.name for e in os.scandir(run_path)
                    if e.name not in (LOCK_NAME, CONTROL_DIR) and not is_own_temp(e.name))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise UsageError(f"{run_path} is not empty ({shown}) and is not an fsapp run (no {CONFIG} or {METRICS}); "
                         "give a new or empty directory")


def write_failed(path: Path | str | None, exc: OSError, kept: str) -> str:
    """One line for a failed write: the file, the reason, and what was kept."""
    where = path or exc.filename or "the run directory"
    return f"could not write {where} ({exc.strerror or exc}); {kept}"
