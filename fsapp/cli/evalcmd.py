"""``fsapp eval``: load a model file, pick its test samples, run suites / attacks / sweeps / transfer
attacks, show Rich progress and tables, and save the JSON report (plus PNG curves, RobustBench file).

Under ``torchrun`` every process evaluates its share of the batches; rank 0 prints and writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
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

from fsapp.checkpoint import atomic_write_text, file_sha256, load_model_file
from fsapp.engine import events as ev
from fsapp.engine.rundir import RunLog
from fsapp.errors import FsappError, UsageError
from fsapp.registry import parse_float

DEFAULT_ATTACKS = ("pgd:steps=20", "cw:steps=20")


class EventStream(RunLog):
    """``--events FILE``: the job's events as JSON lines (EvalStarted, EvalProgress..., EvalFinished
    or JobFailed), for a front end that follows the job from another process."""
DEFAULT_TRANSFER = ("pgd:steps=20",)


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


def eps_text(eps: float | None) -> str:
    """``8/255`` when eps is a whole number of 1/255 steps (and no short decimal), else the number."""
    if eps is None:
        return "unbounded"
    k = eps * 255
    if abs(k - round(k)) < 1e-6 and abs(round(eps, 4) - eps) > 1e-12:
        return f"{round(k)}/255"
    return f"{eps:.6g}"


def architecture(meta: dict[str, Any]) -> str:
    """A readable architecture name from model metadata (e.g. ``WideResNet-28-10``)."""
    name = meta.get("model", "?")
    params = meta.get("model_params") or {}
    if name == "wrn":
        return f"WideResNet-{params.get('depth', '?')}-{params.get('widen', '?')}"
    if name == "preact-resnet18":
        return "PreActResNet-18"
    shown = {k: v for k, v in params.items() if k not in ("num_classes", "channels", "size", "mean", "std")}
    return name + ("(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")" if shown else "")


def expand_suites(suites: list[str]) -> list[str]:
    """The attack specs of the named suites, in order, without repeats."""
    from fsapp.engine.evaluate import SUITES

    specs: list[str] = []
    for suite in suites:
        if suite not in SUITES:
            raise UsageError(f"unknown suite '{suite}'; available: {', '.join(SUITES)}")
        specs += [s for s in SUITES[suite] if s not in specs]
    return specs


def robustbench_entry(data: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """A RobustBench leaderboard entry (model_info JSON) from an evaluation with AutoAttack."""
    acc = data["accuracy"]
    key = next((k for k in acc if k.split(":")[0] == "autoattack"), None)
    if key is None:
        raise UsageError("--robustbench-json needs the standard AutoAttack result (--suite autoattack)")
    threat = data["threat_model"] or {}
    return {
        "link": "",
        "name": meta.get("run") or Path(data["model"]).stem,
        "authors": "",
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": data.get("dataset") or "",
        "venue": "",
        "architecture": architecture(meta),
        "eps": eps_text(threat.get("eps")),
        "threat_model": threat.get("norm") or "Linf",
        "clean_acc": f"{100 * acc['clean']:.2f}",
        "reported": "",
        "autoattack_acc": f"{100 * acc[key]:.2f}",
        "footnote": f"evaluated with fsapp {data.get('fsapp_version', '')} on {data['n']} test samples "
                    f"(seed {data['seed']}); standard AutoAttack",
        "unreliable": any(f["id"] in ("random-forward", "black-box-beats-white-box") for f in data["flags"]),
        "n_eval": data["n"],
        "model_sha256": data.get("model_sha256"),
    }


class EvalProgressView:
    """Rich progress: one bar per attack, with robust accuracy so far, elapsed and remaining time."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("robust {task.fields[robust]}"), TimeElapsedColumn(), TextColumn("left"),
            TimeRemainingColumn(), console=console, disable=not enabled, transient=False)
        self.tasks: dict[str, Any] = {}
        self.prefix = ""
        self.stream: EventStream | None = None

    def __enter__(self) -> "EvalProgressView":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def on_batch(self, p: Any) -> None:
        label = self.prefix + p.key
        if self.stream is not None:
            self.stream.write(ev.EvalProgress(label, p.stage or "", p.done, p.total, p.robust))
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(label, total=max(p.total, 1), robust="-")
        stage = f" [{p.stage}]" if p.stage else ""
        robust = f"{p.robust / p.done:.1%}" if p.done else "-"
        self.progress.update(self.tasks[label], completed=p.done, description=label + stage, robust=robust)


def _state_path(target_dir: Path, settings: dict[str, Any], state: Path | None, rank: int, world: int) -> Path:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = state if state is not None else target_dir / f".state-{digest}.json"
    return path if world == 1 else path.with_name(f"{path.name}.rank{rank}of{world}")


def _remove_states(state_file: Path) -> None:
    """Delete an evaluation's state files (its sweeps' too) once the report is written."""
    import glob

    if state_file.parent.is_dir():
        for path in state_file.parent.glob(glob.escape(state_file.name) + "*"):
            path.unlink(missing_ok=True)


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
    suites: list[str] | tuple[str, ...] = (),
    sweeps: list[str] | tuple[str, ...] = (),
    source: Path | None = None,
    robustbench_json: Path | None = None,
    resume: bool = False,
    state: Path | None = None,
    events: Path | None = None,
) -> dict[str, Any] | None:
    """Evaluate a model file; returns the JSON report (also written to ``eval/`` or ``out``).

    Under torchrun only rank 0 returns the report (the others return None).
    """
    from fsapp._version import __version__
    from fsapp.engine import evalshard
    from fsapp.engine.evaluate import evaluate
    from fsapp.engine.sweep import parse_sweep, run_sweep
    from fsapp.engine.train import pick_device

    if n < 1:
        raise UsageError(f"--n must be >= 1, got {n}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    sweep_list = [parse_sweep(s) for s in sweeps]
    dev = evalshard.local_device(pick_device(device))
    shard = evalshard.init_from_env(dev)
    lead = shard.rank == 0
    show = lead and not quiet
    model, meta = load_model_file(model_path, dev)
    try:
        eps_value = parse_float(eps) if eps is not None else float(meta.get("eval_eps", 8 / 255))
    except ValueError as exc:
        raise UsageError(f"bad --eps: {exc}") from None
    step_size = float(meta.get("eval_step_size", eps_value / 4)) if eps is None else eps_value / 4
    src_model, src_meta = None, None
    if source is not None:
        src_model, src_meta = load_model_file(source, dev)
        if list(src_meta["input_shape"]) != list(meta["input_shape"]) or src_meta["num_classes"] != meta["num_classes"]:
            raise UsageError(f"--source {source} takes {src_meta['input_shape']} inputs and {src_meta['num_classes']} "
                             f"classes; {model_path} takes {meta['input_shape']} and {meta['num_classes']}")

    white = expand_suites(list(suites))
    transfer: list[str] = []
    if source is not None:
        transfer = list(attacks) or list(DEFAULT_TRANSFER)
    else:
        white += [a for a in attacks if a not in white]
    if not white and not transfer and not sweep_list:
        white = list(DEFAULT_ATTACKS)
    notes: list[str] = []
    if robustbench_json is not None and not any(s.split(":")[0] == "autoattack" for s in white):
        white.append("autoattack")
        notes.append("added the standard AutoAttack for --robustbench-json")

    x, y = load_test_split(meta, n, seed, data_root)
    model_sha = file_sha256(model_path)
    source_sha = file_sha256(source) if source is not None else None
    target = out if out is not None else model_path.parent / "eval" / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    settings = {"model_sha256": model_sha, "source_sha256": source_sha, "attacks": white, "transfer": transfer,
                "n": n, "seed": seed, "batch_size": batch_size, "eps": eps_value, "step_size": step_size,
                "sweeps": list(sweeps), "dataset": meta.get("dataset")}
    state_file = _state_path(target.parent, settings, state, shard.rank, shard.world)
    if resume and not state_file.exists():
        raise UsageError(f"no interrupted evaluation to resume: {state_file} does not exist")
    if show and not resume and state_file.exists():
        console.print(f"[yellow]note[/]: an interrupted evaluation of these settings exists ({state_file}); "
                      "starting over (use --resume to continue it)", highlight=False)
    defaults = {"eps": eps_value, "step_size": step_size}
    common = dict(batch_size=batch_size, device=dev, seed=seed, shard=shard.active,
                  fingerprint={"model_sha256": model_sha, "source_sha256": source_sha})
    view = EvalProgressView(console, show)
    stream = EventStream(events) if events is not None and lead else None
    if stream is not None:
        stream.write(ev.EvalStarted(str(model_path), n, white + transfer, list(sweeps), str(target)))
        view.stream = stream
    t_job = time.perf_counter()
    sweeps_out: list[dict[str, Any]] = []
    try:
        with view:
            report = evaluate(model, x, y, white, defaults=defaults, source=src_model, transfer=transfer,
                              on_batch=view.on_batch, state=state_file, resume=resume, **common)
            for j, (key, values) in enumerate(sweep_list):
                specs = list(attacks) or list(DEFAULT_ATTACKS)

                def label(i: int, value: float, key: str = key) -> None:
                    view.prefix = f"{key}={eps_text(value) if key == 'eps' else value} "

                sweeps_out.append(run_sweep(model, x, y, specs, key, values, defaults=defaults, on_point=label,
                                            on_batch=view.on_batch,
                                            state=state_file.with_name(f"{state_file.name}.sweep{j}"),
                                            resume=resume, **common))
    except KeyboardInterrupt:
        raise FsappError(f"interrupted; finished batches are saved in {state_file}: run the same command with "
                         "--resume to continue") from None
    if shard.active:
        evalshard.barrier()

    flags = list(report.flags)
    for sw in sweeps_out:
        flags += [f for f in sw["flags"] if f not in flags]
    data: dict[str, Any] = {
        "fsapp_version": __version__,
        "model": str(model_path),
        "model_sha256": model_sha,
        "architecture": architecture(meta),
        "dataset": meta.get("dataset"),
        "num_classes": meta.get("num_classes"),
        "seed": seed,
        "device": str(dev),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"suites": list(suites), "attacks": white, "transfer": transfer,
                     "source": str(source) if source is not None else None, "source_sha256": source_sha,
                     "eps": eps_value, "step_size": step_size, "batch_size": batch_size, "sweeps": list(sweeps),
                     "sample_order": f"first n of torch.randperm(test size) with seed {seed}, sorted"},
        **report.to_dict(),
        "flags": flags,
        "sweeps": sweeps_out,
        "notes": notes,
    }
    if not lead:
        _remove_states(state_file)
        evalshard.finish()
        return None
    try:
        pngs = []
        for sw in sweeps_out:
            png = target.with_name(f"{target.stem}-sweep-{sw['key']}.png")
            try:
                from fsapp.engine.sweep import save_png

                pngs.append(save_png(sw, png, f"{model_path.name}: accuracy vs {sw['key']} (n={sw['n']})"))
                sw["png"] = str(png)
            except UsageError as exc:
                notes.append(str(exc))
        atomic_write_text(target, json.dumps(data, indent=2) + "\n")
        if robustbench_json is not None:
            atomic_write_text(robustbench_json, json.dumps(robustbench_entry(data, meta), indent=2) + "\n")
    except OSError as exc:
        raise UsageError(f"cannot write the report to {target}: {exc.strerror or exc}") from None
    _remove_states(state_file)
    if shard.active:
        evalshard.finish()
    if stream is not None:
        stream.write(ev.EvalFinished(str(target), dict(data["accuracy"]), flags, time.perf_counter() - t_job))
        stream.close()
    if show:
        render(console, data, model_path, target, pngs, sweeps_out)
    return data


def render(console: Console, data: dict[str, Any], model_path: Path, target: Path, pngs: list[Path],
           sweeps: list[dict[str, Any]]) -> None:
    """The report as Rich tables, text plots and flag lines."""
    from fsapp.engine.sweep import text_plot

    threat = data["threat_model"] or {}
    title = (f"{model_path.name}: {data['n']} test samples, {threat.get('norm') or '?'} eps "
             f"{eps_text(threat.get('eps'))}, seed {data['seed']}")
    table = Table(title=title)
    for col, just in (("attack", "left"), ("threat", "left"), ("accuracy", "right"), ("robust", "right"),
                      ("seconds", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    acc, counts = data["accuracy"], data["robust_count"]
    table.add_row("clean", "", f"{acc['clean']:.1%}", f"{counts['clean']}/{data['n']}", "")
    for run in data["attacks"]:
        t = run["threat_model"]
        tm = f"{t['norm']} {eps_text(t['eps'])}" + ("" if run["in_worst_case"] else " (not in worst case)")
        table.add_row(run["key"], tm, f"{run['accuracy']:.1%}", f"{counts[run['key']]}/{data['n']}",
                      f"{run['seconds']:.1f}")
        for stage, value in run["stages"].items():
            table.add_row(f"  after {stage}", "", f"{value:.1%}", "", "", style="dim")
    if data["attacks"]:
        table.add_row("worst case", "", f"{acc['worst_case']:.1%}", f"{counts['worst_case']}/{data['n']}",
                      f"{data['seconds']:.1f}", style="bold")
    gap = data.get("gap_ce_minus_margin")
    if gap is not None:
        table.add_row("gap CE - margin", "", f"{gap:+.1%}", "", "", style="yellow" if gap > 0.05 else "dim")
    console.print(table)
    for sw in sweeps:
        console.print(Text(f"accuracy vs {sw['key']} ({data['n']} samples)", style="bold"))
        console.print(Text(text_plot(sw)))
        if sw.get("skipped"):
            console.print(f"[dim]not swept (no '{sw['key']}' parameter): {', '.join(sw['skipped'])}[/]")
    for flag in data["flags"]:
        console.print(f"[yellow]flag {flag['id']}[/]: {flag['message']}", highlight=False)
    for note in data.get("notes", []):
        console.print(f"[dim]note: {note}[/]", highlight=False)
    console.print(f"report: {target}", highlight=False)
    for png in pngs:
        console.print(f"curve: {png}", highlight=False)
