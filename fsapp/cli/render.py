"""Rich rendering: consoles that never wrap piped output, literal text (user, file and plugin
text is never read as markup), a live progress line and per-epoch robustness tables."""

from __future__ import annotations

import os
import re
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from fsapp.engine import events as ev

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


PIPE_WIDTH = 1000  # columns assumed when writing to a file or pipe (tables sized to their content)


def make_console(stderr: bool = False) -> Console:
    """A console for results (stdout) or diagnostics (stderr). When it is not a terminal, long
    lines are written whole (no wrapping in the middle of a path; tables as wide as their
    content unless ``COLUMNS`` says otherwise) and nothing is highlighted."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console.soft_wrap = True
        console.highlight = False  # type: ignore[attr-defined]
        if not os.environ.get("COLUMNS"):
            console.width = PIPE_WIDTH
    return console


def one_line(text: object) -> str:
    """``text`` as one printable line: newlines, tabs and other control characters escaped."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(text))


def literal(text: object, style: str = "") -> Text:
    """User, file or plugin text as a Rich ``Text``: printed as is, never parsed as markup."""
    return Text(one_line(text), style=style)


def labelled(label: str, style: str, text: object) -> Text:
    """``label: text`` with a styled label and literal text (error, warning and flag lines)."""
    return Text.assemble((label, style), " ", literal(text))


def robustness_table(event: ev.EvalResult, title: str | None = None) -> Table:
    """A table of accuracies (clean, each attack, worst case) plus the CE-vs-margin gap."""
    table = Table(title=title or f"epoch {event.epoch + 1}: robustness on {event.n} {event.split} samples")
    table.add_column("attack")
    table.add_column("accuracy", justify="right")
    for name, value in event.accuracy.items():
        style = "bold" if name == "worst_case" else ""
        table.add_row(literal(name), f"{value:.1%}", style=style)
    if event.gap is not None:
        table.add_row("gap CE - margin", f"{event.gap:+.1%}", style="yellow" if event.gap > 0.05 else "dim")
    return table


class TrainRenderer:
    """Consumes training events: results (epoch lines, robustness tables, the final line) on
    ``console`` (stdout), the live progress bar and warnings on stderr. The bar shows only on a
    terminal and vanishes when the run ends; when stdout is a terminal too, results print through
    the bar's console so the two never garble each other."""

    def __init__(self, console: Console, err_console: Console | None = None) -> None:
        err = err_console or make_console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"),
            TextColumn("acc {task.fields[acc]:.1%}"),
            TextColumn("{task.fields[ips]:.0f} img/s"),
            TextColumn("lr {task.fields[lr]:.3g}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err,
            transient=True,
            disable=not err.is_terminal,
        )
        live = err.is_terminal
        self.console = err if live and console.is_terminal else console
        self.diagnostics = err
        self.task = None

    def __enter__(self) -> "TrainRenderer":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def handle(self, event: ev.Event) -> None:
        p, out = self.progress, self.console
        if isinstance(event, ev.RunStarted):
            verb = "resuming" if event.resumed else "training in"
            out.print(Text.assemble(("fsapp", "bold"), f" {verb} ", literal(event.run_dir, "cyan"),
                                          " on ", literal(event.device)))
            self.task = p.add_task("train", total=event.epochs * event.steps_per_epoch,
                                   completed=event.start_epoch * event.steps_per_epoch + event.start_step,
                                   epoch=event.start_epoch + 1, loss=0.0, acc=0.0, ips=0.0, lr=0.0)
        elif isinstance(event, ev.StepEnd) and self.task is not None:
            p.update(self.task, completed=event.global_step, epoch=event.epoch + 1, loss=event.loss,
                     acc=event.accuracy, ips=event.images_per_sec, lr=event.lr)
        elif isinstance(event, ev.EpochEnd):
            out.print(f"epoch {event.epoch + 1}: loss {event.loss:.4f}, train acc {event.accuracy:.1%}, "
                            f"{event.seconds:.1f}s" + (f", {event.bad_steps} skipped" if event.bad_steps else ""))
        elif isinstance(event, ev.EvalResult):
            out.print(robustness_table(event))
            for flag in event.flags:
                out.print(labelled(f"flag {one_line(flag['id'])}:", "yellow", flag["message"]))
        elif isinstance(event, ev.Warning):
            self.diagnostics.print(labelled("warning:", "yellow", event.message))
        elif isinstance(event, ev.Finished):
            state = "stopped; resume with --resume " + event.run_dir if event.stopped else "finished"
            out.print(Text.assemble(literal(state, "bold green"), f" in {event.seconds:.0f}s; model: ",
                                          literal(event.model_path, "cyan")))


def summary_line(finished: ev.Finished, last_eval: ev.EvalResult | None) -> str:
    """``-q``'s one line: the run, how it ended, the last evaluation's accuracies, the model file.

    ``run R | finished | epoch 8 | clean 98.3% | pgd:steps=20 42.8% | ... | worst 33.9% | model PATH``
    """
    parts = [f"run {Path(finished.run_dir).name}", "stopped" if finished.stopped else "finished"]
    if last_eval is not None:
        parts.append(f"epoch {last_eval.epoch + 1}")
        for key, value in last_eval.accuracy.items():
            label = "worst" if key == "worst_case" else key
            parts.append(f"{label} {100 * value:.1f}%")
        if last_eval.gap is not None:
            parts.append(f"gap {100 * last_eval.gap:+.1f}")
    parts.append(f"model {finished.model_path}")
    return " | ".join(parts)
