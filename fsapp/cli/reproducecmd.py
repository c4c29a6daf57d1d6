"""``fsapp reproduce`` on a terminal: the plan (``--dry-run``) or the grid's progress, one line per
finished process, then where the report is."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console
from rich.text import Text

from fsapp.app.reproduce import make_plan, plan_for_dry_run, reproduce


def run_reproduce(scale: str, out: Path | None, seeds: int, jobs: int, quick: bool, dry_run: bool, data_root: str,
                  console: Console) -> int:
    """Plan, print or run the grid; returns the exit status (1 when a process failed)."""
    plan = make_plan(scale, out or Path(f"reproduce-{scale}"), seeds=seeds, quick=quick, data_root=data_root)
    if dry_run:
        sys.stdout.write(plan_for_dry_run(plan))
        return 0

    def log(line: str) -> None:
        console.print(Text(f"{time.strftime('%H:%M:%S')} {line}"), soft_wrap=True)

    data = reproduce(plan, jobs=jobs, log=log)
    tasks = data["tasks"]
    console.print(Text(f"{tasks['done']} process(es) run, {tasks['skipped']} already done, {tasks['failed']} failed "
                       f"in {data['seconds']:.0f}s; report: {plan.out / 'REPORT.md'}"), soft_wrap=True)
    return 1 if tasks["failed"] else 0
