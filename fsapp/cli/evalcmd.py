"""``fsapp eval``: load a model file, pick its test samples, run the attacks, save the report."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fsapp.checkpoint import atomic_write_text, file_sha256, load_model_file
from fsapp.errors import UsageError
from fsapp.registry import parse_float

DEFAULT_ATTACKS = ("pgd:steps=20", "cw:steps=20")


def load_test_split(meta: dict[str, Any], n: int, seed: int, data_root: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test samples of a seeded order, from the dataset named in the model file."""
    from fsapp.plugins import get_registry

    registry = get_registry()
    name = meta.get("dataset") or ""
    if not name:
        raise UsageError("the model file names no dataset; evaluate it from Python with fsapp.evaluate")
    component = registry.get("dataset", name)
    fields = {f.name for f in dataclasses.fields(component.params)}
    params: dict[str, Any] = {"root": data_root} if "root" in fields else {}
    dataset = component.build(params)
    if tuple(dataset.shape) != tuple(meta["input_shape"]):
        raise UsageError(f"dataset '{name}' has shape {dataset.shape}, the model expects {tuple(meta['input_shape'])}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset.y_test), generator=g)[:n].sort().values
    return dataset.x_test[idx], dataset.y_test[idx]


def run_eval(
    model_path: Path,
    attacks: list[str],
    *,
    n: int,
    batch_size: int,
    seed: int,
    device: str,
    eps: str | None,
    data_root: str,
    out: Path | None,
    quiet: bool,
    console: Console,
) -> dict[str, Any]:
    """Evaluate a model file; returns the JSON report (also written to ``eval/`` or ``out``)."""
    from fsapp.engine.evaluate import evaluate
    from fsapp.engine.train import pick_device

    if n < 1:
        raise UsageError(f"--n must be >= 1, got {n}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    dev = pick_device(device)
    model, meta = load_model_file(model_path, dev)
    try:
        eps_value = parse_float(eps) if eps is not None else float(meta.get("eval_eps", 8 / 255))
    except ValueError as exc:
        raise UsageError(f"bad --eps: {exc}") from None
    step_size = float(meta.get("eval_step_size", eps_value / 4)) if eps is None else eps_value / 4
    specs = list(attacks) or list(DEFAULT_ATTACKS)
    x, y = load_test_split(meta, n, seed, data_root)
    torch.manual_seed(seed)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeRemainingColumn(), console=console, disable=quiet, transient=True)
    tasks: dict[str, int] = {}

    def on_progress(spec: str, done: int, total: int) -> None:
        if spec not in tasks:
            tasks[spec] = progress.add_task(spec, total=total)
        progress.update(tasks[spec], completed=done)

    with progress:
        report = evaluate(model, x, y, specs, batch_size=batch_size, device=dev, on_progress=on_progress,
                          defaults={"eps": eps_value, "step_size": step_size})
    data = {
        "model": str(model_path),
        "model_sha256": file_sha256(model_path),
        "dataset": meta.get("dataset"),
        "threat_model": {"norm": "Linf", "eps": eps_value},
        "seed": seed,
        "device": str(dev),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **report.to_dict(),
    }
    target = out if out is not None else model_path.parent / "eval" / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    try:
        atomic_write_text(target, json.dumps(data, indent=2) + "\n")
    except OSError as exc:
        raise UsageError(f"cannot write the report to {target}: {exc.strerror}") from None
    if not quiet:
        table = Table(title=f"{model_path.name}: {report.n} test samples, Linf eps {eps_value:.4g}")
        table.add_column("attack")
        table.add_column("accuracy", justify="right")
        table.add_column("seconds", justify="right")
        times = {r.spec: r.seconds for r in report.attacks}
        for key, value in report.accuracy.items():
            table.add_row(key, f"{value:.1%}", f"{times[key]:.1f}" if key in times else "",
                          style="bold" if key == "worst_case" else "")
        console.print(table)
        for flag in report.flags:
            console.print(f"[yellow]flag {flag['id']}[/]: {flag['message']}", highlight=False)
        console.print(f"report: {target}", highlight=False)
    return data
