"""One writer per run directory: an exclusive ``flock`` that dies with its process."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from fsapp.errors import UsageError

LOCK_NAME = ".lock"


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
