"""``fsapp eval`` on a terminal: the request goes to :func:`fsapp.app.evaljob.run_eval`; progress
bars and diagnostics go to stderr, results (table, curves, flags, report path) to stdout.

``--json`` prints only the report's JSON on stdout; ``-q`` only one summary line. Text from users,
files and plugins (paths, attack specs, messages) is printed literally, never as Rich markup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from fsapp.app.evaljob import EvalRequest, eps_text, run_eval
from fsapp.engine import events as ev


class EvalProgressView:
    """Rich progress on stderr: one bar per attack (robust accuracy so far, elapsed and remaining
    time); remembers the report path the job announces."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self.console = console
        self.enabled = enabled
        self.progress = Progress(
            TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
            TextColumn("robust {task.fields[robust]}", markup=False), TimeElapsedColumn(), TextColumn("left"),
            TimeRemainingColumn(), console=console, disable=not enabled, transient=False)
        self.tasks: dict[str, Any] = {}
        self.report_path: str | None = None

    def __enter__(self) -> "EvalProgressView":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def on_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.EvalProgress):
            self._progress(event)
        elif isinstance(event, ev.EvalFinished):
            self.report_path = event.report
        elif isinstance(event, ev.Warning) and self.enabled:
            self.console.print(Text.assemble(("note", "yellow"), ": ", event.message), soft_wrap=True)

    def _progress(self, p: ev.EvalProgress) -> None:
        if p.key not in self.tasks:
            self.tasks[p.key] = self.progress.add_task(p.key, total=max(p.total, 1), robust="-")
        stage = f" [{p.stage}]" if p.stage else ""
        robust = f"{p.robust / p.done:.1%}" if p.done else "-"
        self.progress.update(self.tasks[p.key], completed=p.done, description=p.key + stage, robust=robust)


def run(request: EvalRequest, *, out: Console, err: Console, as_json: bool = False,
        quiet: bool = False) -> dict[str, Any] | None:
    """Run the eval job with terminal progress, then print the results (see the module docstring)."""
    view = EvalProgressView(err, enabled=not (as_json or quiet))
    with view:
        data = run_eval(request, view.on_event)
    if data is None:  # a torchrun rank other than 0
        return None
    report = Path(view.report_path or "")
    if as_json:
        import json
        import sys

        sys.stdout.write(json.dumps(data) + "\n")
    elif quiet:
        out.print(Text(summary_line(data, report)), soft_wrap=True)
    else:
        render(out, data, Path(request.model), report)
    return data


def summary_line(data: dict[str, Any], report: Path) -> str:
    """One line fit for grepping: ``clean 98.0% | pgd:steps=20 55.0% | worst 46.5% | report PATH``."""
    acc = data["accuracy"]
    parts = [f"clean {acc['clean']:.1%}"] + [f"{r['key']} {r['accuracy']:.1%}" for r in data["attacks"]]
    if data["attacks"]:
        parts.append(f"worst {acc['worst_case']:.1%}")
    for sw in data.get("sweeps", []):
        parts.append(f"sweep {sw['key']} " + ",".join(f"{a:.1%}" for a in sw["worst_case"]))
    parts.append(f"report {report}")
    return " | ".join(parts)


def render(console: Console, data: dict[str, Any], model_path: Path, report: Path) -> None:
    """The report as a Rich table, text plots, flag lines, notes, the report and curve paths."""
    from fsapp.engine.sweep import text_plot

    threat = data["threat_model"] or {}
    title = (f"{model_path.name}: {data['n']} test samples, {threat.get('norm') or '?'} eps "
             f"{eps_text(threat.get('eps'))}, seed {data['seed']}")
    table = Table(title=Text(title))
    for col, just in (("attack", "left"), ("threat", "left"), ("accuracy", "right"), ("robust", "right"),
                      ("seconds", "right"), ("images/s", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    acc, counts, n = data["accuracy"], data["robust_count"], data["n"]
    table.add_row("clean", "", f"{acc['clean']:.1%}", f"{counts['clean']}/{n}", "", "")
    rates = data.get("timings", {}).get("images_per_sec", {})
    for run in data["attacks"]:
        t = run["threat_model"]
        tm = (f"{t['norm']} {eps_text(t['eps'])}" if t["eps"] is not None else "unbounded") + ("" if run["in_worst_case"] else " (not in worst case)")
        table.add_row(Text(run["key"]), Text(tm), f"{run['accuracy']:.1%}", f"{counts[run['key']]}/{n}",
                      f"{run['seconds']:.1f}", f"{rates[run['key']]:.1f}" if run["key"] in rates else "")
        stage_seconds = data.get("timings", {}).get("stages", {}).get(run["key"], {})
        for stage, value in run["stages"].items():
            sec = f"{stage_seconds[stage]:.1f}" if stage in stage_seconds else ""
            table.add_row(Text(f"  after {stage}"), "", f"{value:.1%}", "", sec, "", style="dim")
    if data["attacks"]:
        table.add_row("worst case", "", f"{acc['worst_case']:.1%}", f"{counts['worst_case']}/{n}",
                      f"{data['seconds']:.1f}", "", style="bold")
    gap = data.get("gap_ce_minus_margin")
    if gap is not None:
        table.add_row("gap CE - margin", "", f"{gap:+.1%}", "", "", "", style="yellow" if gap > 0.05 else "dim")
    console.print(table)
    for sw in data.get("sweeps", []):
        console.print(Text(f"accuracy vs {sw['key']} ({n} samples)", style="bold"))
        console.print(Text(text_plot(sw)))
        if sw.get("skipped"):
            console.print(Text(f"not swept (no '{sw['key']}' parameter): {', '.join(sw['skipped'])}", style="dim"),
                          soft_wrap=True)
    for flag in data["flags"]:
        console.print(Text.assemble((f"flag {flag['id']}", "yellow"), ": ", flag["message"]), soft_wrap=True)
    for note in data.get("notes", []):
        console.print(Text(f"note: {note}", style="dim"), soft_wrap=True)
    console.print(Text(f"report: {report}"), soft_wrap=True)
    for sw in data.get("sweeps", []):
        if sw.get("png"):
            console.print(Text(f"curve: {sw['png']}"), soft_wrap=True)
    scape = data.get("landscape")
    if scape:
        for entry in scape["models"]:
            for surface in entry["surfaces"]:
                z = [v for row in surface["z"] for v in row]
                console.print(Text(f"landscape {entry['name']} sample {surface['index']}: loss {surface['clean_loss']:.3f} "
                                   f"at (0, 0), {min(z):.3f}..{max(z):.3f} on the {scape['grid']}x{scape['grid']} grid"),
                              soft_wrap=True)
        for png in scape["png"]:
            console.print(Text(f"landscape: {png}"), soft_wrap=True)
