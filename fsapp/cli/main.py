"""``fsapp``: train, evaluate, inspect configs and plugins, benchmark."""

from __future__ import annotations

import functools
import itertools
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
from rich.table import Table
from rich.text import Text

from fsapp.cli.render import labelled, literal, make_console
from fsapp.errors import FsappError, UsageError

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    help="Feature Scattering adversarial training and honest robustness evaluation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings=HELP_OPTIONS,
)
config_app = typer.Typer(help="Show and check run configurations.", no_args_is_help=True,
                         context_settings=HELP_OPTIONS)
plugins_app = typer.Typer(help="List components and the plugins that provide them.", no_args_is_help=True,
                          context_settings=HELP_OPTIONS)
app.add_typer(config_app, name="config")
app.add_typer(plugins_app, name="plugins")

console = make_console()  # results
err_console = make_console(stderr=True)  # progress and diagnostics


def print_error(message: object) -> None:
    """One ``error: ...`` line on stderr, the message printed literally (never as markup)."""
    err_console.print(labelled("error:", "red", message))


def print_warning(message: object) -> None:
    """One ``warning: ...`` line on stderr, printed literally."""
    err_console.print(labelled("warning:", "yellow", message))


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn fsapp errors into one clear line on stderr: exit 2 for usage errors, 1 otherwise."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UsageError as exc:
            print_error(exc)
            raise typer.Exit(2) from None
        except FsappError as exc:
            print_error(exc)
            raise typer.Exit(1) from None

    return wrapper


def _show_version(value: bool) -> None:
    if value:
        from fsapp._version import __version__

        sys.stdout.write(f"fsapp {__version__}\n")
        raise typer.Exit(0)


NO_PLUGINS = {"ctl"}
"""Commands that use no component, so they start without loading plugins (and torch)."""


@app.callback()
def _root(
    ctx: typer.Context,
    strict_plugins: bool = typer.Option(False, "--strict-plugins", help="Plugin load failures are errors."),
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="Print fsapp's version and exit."),
) -> None:
    """Feature Scattering adversarial training and honest robustness evaluation."""
    if ctx.invoked_subcommand in NO_PLUGINS:
        return
    if strict_plugins:
        from fsapp.plugins import reset_registry

        try:
            reset_registry(strict=True)
        except FsappError as exc:
            print_error(exc)
            raise typer.Exit(1) from None
    else:
        _registry_quietly()


def _registry_quietly() -> None:
    """Load the plugins; each failure or duplicate name is one warning line on stderr."""
    import logging

    logging.getLogger("fsapp").addHandler(logging.NullHandler())
    from fsapp.plugins import get_registry

    registry = get_registry()
    for failure in registry.failures:
        print_warning(failure)
    for message in registry.warnings:
        print_warning(message)


def _run_dir_option(value: Optional[str]) -> Optional[Path]:
    """``--run-dir`` as typed (``""`` is refused, not read as the current directory)."""
    if value is None:
        return None
    from fsapp.config import check_run_dir

    try:
        return check_run_dir(value)
    except UsageError as exc:
        print_error(exc)
        raise typer.Exit(2) from None


# -- train ---------------------------------------------------------------------------------

@app.command()
@friendly
def train(
    config: Optional[str] = typer.Argument(None, help="A preset name or a TOML file (default: demo)."),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="Start from this preset."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a key: section.key=value (repeatable). "
                                   "With --resume only schedule.epochs=N, to train the run longer."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run directory (default runs/<time>-...); "
                                           "a new or empty directory.", parser=str, callback=_run_dir_option),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory with its own "
                                          "config.toml (refused if that was edited; a finished run is left as is)."),
    download: bool = typer.Option(False, "--download", help="Let dataset loaders download (network needed)."),
    tracker: list[str] = typer.Option([], "--tracker", help="Also feed every event to this tracker "
                                      "(tensorboard, csv or a plugin's; repeatable); adds to run.trackers."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Train N runs of one group, seeds run.seed .. "
                                        "run.seed+N-1, named <name>-s<seed> (fsapp report shows mean +- std)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only one summary line per run (grep-friendly)."),
) -> None:
    """Train a model (Feature Scattering on the embedded digits by default)."""
    from fsapp.app.trainjob import TrainRequest, seed_group

    request = TrainRequest(config, preset, tuple(set_), run_dir, resume, download, tuple(tracker))
    for one in seed_group(request, seeds) if seeds is not None else [request]:
        _train_one(one, quiet)


def _train_one(request: Any, quiet: bool) -> None:
    """Run one train job, rendering its events (or its one summary line with ``-q``)."""
    from fsapp.app.trainjob import RunFinished, train_events
    from fsapp.cli.render import TrainRenderer, summary_line
    from fsapp.engine.rundir import Control

    control = Control.new()
    events = train_events(request, control)

    def on_sigint(signum: int, frame: Any) -> None:
        if control.stop.is_set():
            raise KeyboardInterrupt
        control.stop.set()
        err_console.print("[yellow]stopping after this step (checkpoint kept); Ctrl-C again to abort[/]")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        events = iter(events)
        try:
            first = next(events, None)  # the checks before training: refusals print before any progress
        except RunFinished as done:
            console.print(str(done), markup=False, highlight=False, soft_wrap=True)
            return
        if first is None:
            return
        events = itertools.chain([first], events)
        if quiet:
            from fsapp.engine import events as ev

            last_eval = None
            for event in events:
                if isinstance(event, ev.EvalResult):
                    last_eval = event
                elif isinstance(event, ev.Finished):
                    console.print(summary_line(event, last_eval), markup=False, highlight=False, soft_wrap=True)
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
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where dataset files live (default: the "
                                            "root the model file records, else data)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the JSON report here (default: MODEL's eval/)."),
    as_json: bool = typer.Option(False, "--json", help="Print only the report, as one JSON object, on stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only one summary line: clean, each attack, "
                               "worst case, report path."),
    robustbench_json: Optional[Path] = typer.Option(None, "--robustbench-json", help="Also write a RobustBench "
                                                    "leaderboard entry (runs AutoAttack if not asked)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted evaluation with the same settings."),
    state: Optional[Path] = typer.Option(None, "--state", help="State file for --resume (default: a hidden file "
                                         "beside the report)."),
    events: Optional[Path] = typer.Option(None, "--events", help="Append the job's events (JSON lines: started, "
                                          "progress, finished or failed) to this file, for a front end to follow."),
    landscape: bool = typer.Option(False, "--landscape", help="Loss surfaces (the paper's Figure 4): CE on a grid "
                                   "along d_a and a Rademacher d_r around each --index sample; PNG + JSON grid."),
    index: list[int] = typer.Option([], "--index", help="Test sample(s) of the landscape, 0-based in the evaluated "
                                    "order (repeatable; default 0)."),
    landscape_direction: str = typer.Option("grad", "--landscape-direction", help="d_a: grad (sign of the CE input "
                                            "gradient) or pgd (sign of the PGD-20 perturbation)."),
    grid: int = typer.Option(41, "--grid", help="Landscape grid points per axis (a, b in [-1, 1])."),
    no_clip: bool = typer.Option(False, "--no-clip", help="Do not clip landscape inputs to [0, 1]."),
    compare: list[Path] = typer.Option([], "--compare", help="With --landscape: another model file, one more panel "
                                       "on the same z-scale (repeatable)."),
) -> None:
    """Evaluate a saved model on its dataset's test split: clean, each attack, worst case, flags.

    Results go to stdout (table, flags, report path); progress and diagnostics to stderr.
    """
    from fsapp.app.evaljob import EvalRequest
    from fsapp.cli import evalcmd

    request = EvalRequest(model_path, list(attack), list(suite), list(sweep), source, n=n, batch_size=batch_size,
                          seed=seed, device=device, eps=eps, data_root=data_root, out=out,
                          robustbench_json=robustbench_json, resume=resume, state=state, events=events,
                          landscape=landscape, landscape_index=list(index) or [0],
                          landscape_direction=landscape_direction, grid=grid, clip=not no_clip, compare=list(compare))
    if (index or compare or no_clip) and not landscape:
        raise UsageError("--index, --compare and --no-clip go with --landscape")
    evalcmd.run(request, out=console, err=err_console, as_json=as_json, quiet=quiet)


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
        console.print(Text.assemble(literal(name, "bold"), ": ", literal(text)))


# -- plugins -------------------------------------------------------------------------------

@plugins_app.command("list")
@friendly
def plugins_list(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Every component by kind, its parameters and the plugin that provides it. Components that
    share a name with another are listed as plugin/name (failures and duplicates: warnings on stderr)."""
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
        sys.stdout.write(json.dumps(data, indent=2, default=repr) + "\n")
        return
    for kind in KINDS:
        table = Table(title=f"{kind}s", title_justify="left", expand=False)
        table.add_column("name", style="bold")
        table.add_column("plugin")
        table.add_column("parameters (defaults)")
        for c in (registry.get(kind, name) for name in registry.names(kind)):
            params = ", ".join(f"{r['name']}={_short(r['default'])}" for r in c.param_table())
            table.add_row(literal(c.name), literal(c.plugin), literal(params or "-"))
        console.print(table)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return repr(value)


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
    console.print(literal(f"wrote {path}; evaluate it with: fsapp eval {path} --suite autoattack"))


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


# -- report --------------------------------------------------------------------------------

@app.command()
@friendly
def report(
    paths: list[Path] = typer.Argument(..., metavar="PATH", help="Eval reports (.json), run directories, "
                                       "or folders of them."),
    fmt: str = typer.Option("md", "--format", "-f", help="md (GitHub table), tex (booktabs), csv or json."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the table here instead of stdout."),
) -> None:
    """One table of clean, per-attack, worst-case and AutoAttack accuracy; seeds as mean +- std."""
    from fsapp.cli.reportcmd import run_report

    run_report(paths, fmt, out)


# -- reproduce -----------------------------------------------------------------------------

@app.command()
@friendly
def reproduce(
    scale: str = typer.Option("digits", "--scale", help="digits (the embedded set, CPU minutes) or cifar (the "
                              "paper's runs, GPU days)."),
    seeds: int = typer.Option(1, "--seeds", help="Seeds per cell (mean +- std in the tables)."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Processes at once."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Report directory (default reproduce-SCALE)."),
    quick: bool = typer.Option(False, "--quick", help="A reduced digits grid (few cells, tiny budgets) for tests."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, the runs and the projected time."),
    data_root: str = typer.Option("data", "--data-root", help="Where the cifar scale's dataset files live."),
) -> None:
    """Run the paper's grid of experiments and write REPORT.md (published vs fsapp vs AutoAttack)."""
    from fsapp.cli.reproducecmd import run_reproduce

    raise typer.Exit(run_reproduce(scale, out, seeds, jobs, quick, dry_run, data_root, console))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
