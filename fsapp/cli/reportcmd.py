"""``fsapp report``: eval reports and run directories as one table on stdout (or in a file).

The table comes from :mod:`fsapp.app.tables` (the TUI's compare export uses the same code); this
module only chooses where the text goes: the table on stdout or in ``--out``, notes on stderr.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from fsapp.app.tables import FORMATS, build_table, render
from fsapp.errors import UsageError


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder (never half a table);
    the file gets the permissions the umask gives."""
    folder = path.parent
    if not folder.is_dir():
        raise UsageError(f"cannot write {path}: folder {folder} does not exist")
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "x", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None


def run_report(paths: Sequence[Path], fmt: str, out: Path | None = None,
               stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
    """Build the table of ``paths`` in ``fmt``; print it (or write ``out`` and print its path), and
    the notes as ``note: ...`` lines on stderr."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if fmt not in FORMATS:
        raise UsageError(f"unknown --format '{fmt}'; valid: {', '.join(FORMATS)}")
    table = build_table(paths)
    text = render(table, fmt)
    for note in table.notes:
        stderr.write(f"note: {note}\n")
    if out is None:
        stdout.write(text)
    else:
        write_text(out, text)
        stdout.write(f"table: {out}\n")
    stdout.flush()
