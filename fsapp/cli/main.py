"""``fsapp``: train, evaluate, inspect configs and plugins, benchmark."""

from __future__ import annotations

import functools
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from fsapp.errors import FsappError, UsageError

app = typer.Typer(
    help="Feature Scattering adversarial training and honest robustness evaluation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Show and check run configurations.", no_args_is_help=True)
plugins_app = typer.Typer(help="List components and the plugins that provide them.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(plugins_app, name="plugins")

console = Console()
err_console = Console(stderr=True)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn fsapp errors into one clear line on stderr: exit 2 for usage errors, 1 otherwise."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UsageError as exc:
            err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except FsappError as exc:
            err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


NO_PLUGINS = {"ctl"}
"""Commands that use no component, so they start without loading plugins (and torch)."""


@app.callback()
def _root(
    ctx: typer.Context,
    strict_plugins: bool = typer.Option(False, "--strict-plugins", help="Plugin load failures are errors."),
) -> None:
    """Feature Scattering adversarial training and honest robustness evaluation."""
    if ctx.invoked_subcommand in NO_PLUGINS:
        return
    if strict_plugins:
        from fsapp.plugins import reset_registry

        try:
            reset_registry(strict=True)
        except FsappError as exc:
            err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
    else:
        _registry_quietly()


def _registry_quietly() -> None:
    import logging

    logging.getLogger("fsapp").addHandler(logging.NullHandler())
    from fsapp.plugins import get_registry

    registry = get_registry()
    for failure in registry.failures:
        err_console.print(f"[yellow]warning:[/] {failure}", highlight=False, soft_wrap=True)


# -- train ---------------------------------------------------------------------------------

@app.command()
@friendly
def train(
    config: Optional[str] = typer.Argument(None, help="A preset name or a TOML file (default: demo)."),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Start from this preset."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key: section.key=value (repeatable)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory (default runs/<time>-...)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory."),
    download: bool = typer.Option(False, "--download", help="Let dataset loaders download (network needed)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the final line."),
) -> None:
    """Train a model (Feature Scattering on the embedded digits by default)."""
    from fsapp import config as cfgmod
    from fsapp.cli.render import TrainRenderer
    from fsapp.engine.rundir import Control
    from fsapp.engine.train import train as run_train

    if config and preset:
        raise UsageError("give either a config (preset or TOML file) or --preset, not both")
    overrides = list(set_)
    if download:
        tables, _ = cfgmod.load_tables(config or preset)
        tables = cfgmod.apply_overrides(tables, overrides)
        name = tables.get("data", {}).get("name", cfgmod.DataSection.name)
        if "download" not in cfgmod.dataset_param_names(name):
            raise UsageError(f"dataset '{name}' cannot be downloaded (it is embedded or generated)")
        overrides.append("data.download=true")
    control = Control.new()
    if resume is not None:
        if config or preset or set_:
            raise UsageError("--resume continues a run with its own config.toml; drop the config and --set")
        events = run_train(resume=resume, control=control)
    else:
        cfg = cfgmod.load(config or preset, overrides)
        events = run_train(cfg, run_dir=run_dir, control=control)

    def on_sigint(signum: int, frame: Any) -> None:
        if control.stop.is_set():
            raise KeyboardInterrupt
        control.stop.set()
        err_console.print("[yellow]stopping after this step (checkpoint kept); Ctrl-C again to abort[/]")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        if quiet:
            from fsapp.engine import events as ev

            for event in events:
                if isinstance(event, ev.Finished):
                    console.print(f"model: {event.model_path}")
        else:
            with TrainRenderer(console) as renderer:
                for event in events:
                    renderer.handle(event)
    finally:
        signal.signal(signal.SIGINT, previous)


# -- eval ----------------------------------------------------------------------------------

@app.command("eval")
@friendly
def eval_(
    model_path: Path = typer.Argument(..., metavar="MODEL", help="An fsapp .safetensors model file."),
    suite: list[str] = typer.Option([], "--suite", help="paper (FGSM, PGD-20/100, CW-20/100), autoattack "
                                    "(standard AutoAttack) or default (PGD-20, CW-20); repeatable."),
    attack: list[str] = typer.Option([], "--attack", "-a", help="Attack spec, e.g. pgd:steps=20 (repeatable); "
                                     "with --source these are crafted on the source model."),
    n: int = typer.Option(1000, "--n", "-n", help="Number of test samples (first n of a seeded order); under "
                          "torchrun write -n (torchrun reads --n as one of its own options)."),
    batch_size: int = typer.Option(250, "--batch-size"),
    seed: int = typer.Option(0, "--seed", help="Seeds the sample order and every attack's random draws."),
    device: str = typer.Option("auto", "--device"),
    eps: Optional[str] = typer.Option(None, "--eps", help="Linf eps of the threat model (e.g. 8/255), and step "
                                      "eps/4 for attacks that name none; default: the model file's eval eps and step."),
    sweep: list[str] = typer.Option([], "--sweep", help="Accuracy curve: eps=0:16/255:9 or steps=1,5,10,20,50,100 "
                                    "(over the --attack specs, default PGD-20 and CW-20); PNG + terminal plot."),
    source: Optional[Path] = typer.Option(None, "--source", help="Black-box transfer: craft the --attack examples "
                                          "on this model file and measure them on MODEL."),
    data_root: str = typer.Option("data", "--data-root", help="Where dataset files live."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the JSON report here (default: MODEL's eval/)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
    robustbench_json: Optional[Path] = typer.Option(None, "--robustbench-json", help="Also write a RobustBench "
                                                    "leaderboard entry (runs AutoAttack if not asked)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted evaluation with the same settings."),
    state: Optional[Path] = typer.Option(None, "--state", help="State file for --resume (default: a hidden file "
                                         "beside the report)."),
    events: Optional[Path] = typer.Option(None, "--events", help="Append the job's events (JSON lines: started, "
                                          "progress, finished or failed) to this file, for a front end to follow."),
) -> None:
    """Evaluate a saved model on its dataset's test split: clean, each attack, worst case, flags."""
    from fsapp.cli.evalcmd import run_eval

    try:
        report = run_eval(model_path, attack, n=n, batch_size=batch_size, seed=seed, device=device, eps=eps,
                          data_root=data_root, out=out, quiet=as_json, console=err_console, suites=suite,
                          sweeps=sweep, source=source, robustbench_json=robustbench_json, resume=resume,
                          state=state, events=events)
    except Exception as exc:
        if events is not None:
            _job_failed(events, exc)
        raise
    if as_json and report is not None:
        sys.stdout.write(json.dumps(report) + "\n")


def _job_failed(path: Path, exc: BaseException) -> None:
    """Record a failed job's one line in its ``--events`` file (best effort)."""
    from fsapp.engine import events as ev
    from fsapp.engine.rundir import RunLog

    message = str(exc) if isinstance(exc, FsappError) else f"{type(exc).__name__}: {exc}"
    try:
        log = RunLog(path)
        log.write(ev.JobFailed(message))
        log.close()
    except OSError:
        pass


# -- config --------------------------------------------------------------------------------

@config_app.command("show")
@friendly
def config_show(
    config: Optional[str] = typer.Argument(None, help="A preset name or TOML file (default: demo)."),
    preset: Optional[str] = typer.Option(None, "--preset", "-p"),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key: section.key=value."),
) -> None:
    """Print the fully resolved configuration as TOML."""
    from fsapp import config as cfgmod

    if config and preset:
        raise UsageError("give either a config (preset or TOML file) or --preset, not both")
    cfg = cfgmod.load(config or preset, list(set_))
    sys.stdout.write(cfgmod.to_toml(cfgmod.resolved_tables(cfg)))


@config_app.command("presets")
def config_presets() -> None:
    """List the presets."""
    from fsapp.config import PRESET_DESCRIPTIONS

    for name, text in PRESET_DESCRIPTIONS.items():
        console.print(f"[bold]{name}[/]: {text}", highlight=False)


# -- plugins -------------------------------------------------------------------------------

@plugins_app.command("list")
@friendly
def plugins_list(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Every component by kind, its parameters and the plugin that provides it."""
    from fsapp.plugins import get_registry
    from fsapp.registry import KINDS

    registry = get_registry()
    data = {
        kind: [
            {"name": c.name, "plugin": c.plugin, "description": c.description,
             "params": {row["name"]: _jsonable(row["default"]) for row in c.param_table()}}
            for c in (registry.get(kind, name) for name in registry.names(kind))
        ]
        for kind in KINDS
    }
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    for kind in KINDS:
        table = Table(title=f"{kind}s", title_justify="left", expand=False)
        table.add_column("name", style="bold")
        table.add_column("plugin")
        table.add_column("parameters (defaults)")
        for c in (registry.get(kind, name) for name in registry.names(kind)):
            params = ", ".join(f"{r['name']}={_short(r['default'])}" for r in c.param_table())
            table.add_row(c.name, c.plugin, params or "-")
        console.print(table)
    for failure in registry.failures:
        console.print(f"[yellow]failed:[/] {failure}", highlight=False)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_short(v) for v in value) + ")"
    return str(value)


# -- bench ---------------------------------------------------------------------------------

@app.command()
@friendly
def bench(
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
    repeats: int = typer.Option(5, "--repeats", help="Interleaved repetitions (median is reported)."),
    model: list[str] = typer.Option([], "--model", help="Model specs (default: small-cnn, wrn:depth=16,widen=4)."),
    batch_size: int = typer.Option(60, "--batch-size"),
    device: str = typer.Option("auto", "--device"),
    variant: list[str] = typer.Option(
        [], "--variant", help="Execution options to compare, e.g. fp32, bf16+cl, bf16+cl+compile; 'none' skips "
        "the table (default: fp32, fp32+cl, bf16, bf16+cl)."),
    variant_model: list[str] = typer.Option(
        [], "--variant-model", help="Models of the options table (default: all on CUDA, small-cnn on the CPU)."),
    compile_: bool = typer.Option(False, "--compile", help="Add a torch.compile row for each variant."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure peak memory per step."),
    threads: int = typer.Option(0, "--threads", help="Torch intra-op threads (default: torch's choice)."),
    evaluation: bool = typer.Option(True, "--eval/--no-eval", help="Also time PGD-20 (vs torchattacks) and AutoAttack."),
) -> None:
    """Time training steps of standard, madry and feature-scatter on the same model and batch,
    then standard and feature-scatter under fp32/bf16, channels-last and (on request) compile."""
    from dataclasses import replace

    from fsapp.bench import DEFAULT_VARIANTS, Variant, run_bench

    if repeats < 1 or batch_size < 2 or threads < 0:
        raise UsageError("--repeats must be >= 1, --batch-size >= 2 and --threads >= 0")
    try:
        variants = [] if list(variant) == ["none"] else (
            [Variant.parse(v) for v in variant] if variant else list(DEFAULT_VARIANTS))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if compile_:
        variants += [replace(v, compile=True) for v in variants if not v.compile]
    figures = run_bench(models=list(model) or None, repeats=repeats, batch_size=batch_size, device=device,
                        progress=None if as_json else err_console, variants=variants,
                        variant_models=list(variant_model) or None, memory=memory, threads=threads or None,
                        evaluation=evaluation)
    if as_json:
        sys.stdout.write(json.dumps(figures, indent=2) + "\n")
    else:
        from fsapp.cli.benchview import show_bench

        show_bench(console, figures)


# -- import-checkpoint ---------------------------------------------------------------------

@app.command("import-checkpoint")
@friendly
def import_checkpoint(
    source: Path = typer.Argument(..., metavar="FILE", help="A third-party PyTorch checkpoint."),
    fmt: str = typer.Option(..., "--format", help="Its layout: featurescatter (the authors' release)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Model file to write (default FILE.safetensors)."),
    dataset: str = typer.Option("cifar10", "--dataset", help="Dataset the model was trained on."),
    trust: bool = typer.Option(False, "--trust", help="Confirm you trust FILE (it is a pickle)."),
) -> None:
    """Convert a trusted PyTorch checkpoint into an fsapp safetensors model file."""
    from fsapp.importers import import_checkpoint as convert

    path = convert(source, fmt, out or source.with_suffix(".safetensors"), trust=trust, dataset=dataset)
    console.print(f"wrote {path}; evaluate it with: fsapp eval {path} --suite autoattack", highlight=False)


# -- ctl -----------------------------------------------------------------------------------

@app.command()
@friendly
def ctl(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="The run directory of a training in progress."),
    action: str = typer.Argument(..., metavar="ACTION", help="pause, resume, stop, checkpoint or evaluate."),
    wait: Optional[float] = typer.Option(None, "--wait", help="Wait up to this many seconds until the run "
                                         "takes the request (it does at its next step)."),
) -> None:
    """Pause, resume, stop (with a checkpoint), checkpoint or evaluate a run that is training,
    whichever terminal or program started it."""
    from fsapp.cli.ctl import control

    console.print(control(run_dir, action, wait), highlight=False, markup=False, soft_wrap=True)


# -- tui -----------------------------------------------------------------------------------

@app.command()
@friendly
def tui(
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where runs live."),
) -> None:
    """Open the Textual interface: runs, new run, live dashboard, evaluate, compare, plugins."""
    from fsapp.tui.app import run_tui

    run_tui(runs_dir)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
