"""Rich rendering of engine events: a live progress line and per-epoch robustness tables."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fsapp.engine import events as ev


def robustness_table(event: ev.EvalResult, title: str | None = None) -> Table:
    """A table of accuracies (clean, each attack, worst case) plus the CE-vs-margin gap."""
    table = Table(title=title or f"epoch {event.epoch + 1}: robustness on {event.n} held-out samples")
    table.add_column("attack")
    table.add_column("accuracy", justify="right")
    for name, value in event.accuracy.items():
        style = "bold" if name == "worst_case" else ""
        table.add_row(name, f"{value:.1%}", style=style)
    if event.gap is not None:
        table.add_row("gap CE - margin", f"{event.gap:+.1%}", style="yellow" if event.gap > 0.05 else "dim")
    return table


class TrainRenderer:
    """Consumes training events and shows them on a Rich console."""

    def __init__(self, console: Console) -> None:
        self.console = console
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
            console=console,
            transient=False,
        )
        self.task = None

    def __enter__(self) -> "TrainRenderer":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def handle(self, event: ev.Event) -> None:
        p = self.progress
        if isinstance(event, ev.RunStarted):
            verb = "resuming" if event.resumed else "training in"
            p.console.print(f"[bold]fsapp[/] {verb} [cyan]{event.run_dir}[/] on {event.device}")
            self.task = p.add_task("train", total=event.epochs * event.steps_per_epoch,
                                   completed=event.start_epoch * event.steps_per_epoch + event.start_step,
                                   epoch=event.start_epoch + 1, loss=0.0, acc=0.0, ips=0.0, lr=0.0)
        elif isinstance(event, ev.StepEnd) and self.task is not None:
            p.update(self.task, completed=event.global_step, epoch=event.epoch + 1, loss=event.loss,
                     acc=event.accuracy, ips=event.images_per_sec, lr=event.lr)
        elif isinstance(event, ev.EpochEnd):
            p.console.print(f"epoch {event.epoch + 1}: loss {event.loss:.4f}, train acc {event.accuracy:.1%}, "
                            f"{event.seconds:.1f}s" + (f", {event.bad_steps} skipped" if event.bad_steps else ""))
        elif isinstance(event, ev.EvalResult):
            p.console.print(robustness_table(event))
            for flag in event.flags:
                p.console.print(f"[yellow]flag {flag['id']}[/]: {flag['message']}")
        elif isinstance(event, ev.Warning):
            p.console.print(f"[yellow]warning[/]: {event.message}")
        elif isinstance(event, ev.Finished):
            state = "stopped; resume with --resume " + event.run_dir if event.stopped else "finished"
            p.console.print(f"[bold green]{state}[/] in {event.seconds:.0f}s; model: [cyan]{event.model_path}[/]")
