"""CLI conventions: --version, -h, results on stdout and diagnostics on stderr, literal text
(brackets are never markup), whole lines when piped, an SPDX license."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import typer
from rich.console import Console
from typer.main import get_command
from typer.testing import CliRunner

from fsapp._version import __version__
from fsapp.cli.main import app, friendly
from fsapp.cli.render import TrainRenderer
from fsapp.engine import events as ev
from fsapp.errors import FsappError, UsageError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("COLUMNS", None)
    return subprocess.run([sys.executable, "-m", "fsapp", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_version_on_stdout():
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout == f"fsapp {__version__}\n" and proc.stderr == ""


def _command_paths(command, prefix=()):
    yield prefix
    for name, sub in getattr(command, "commands", {}).items():
        yield from _command_paths(sub, prefix + (name,))


def test_short_help_on_root_and_every_command():
    paths = list(_command_paths(get_command(app)))
    assert ("train",) in paths and ("config", "show") in paths and ("plugins", "list") in paths
    for path in paths:
        short = runner.invoke(app, [*path, "-h"])
        long = runner.invoke(app, [*path, "--help"])
        assert short.exit_code == 0 and "Usage" in short.stdout, (path, short.output)
        assert short.stdout == long.stdout, path


def test_results_on_stdout_diagnostics_on_stderr(tmp_path):
    shown = runner.invoke(app, ["config", "show", "--set", "optim.lr=0.05"])
    assert shown.exit_code == 0 and "lr = 0.05" in shown.stdout and shown.stderr == ""
    bad = runner.invoke(app, ["config", "show", "--set", "optim.lr=0"])
    assert bad.exit_code == 2 and bad.stdout == ""
    assert _lines(bad.stderr) == ["error: preset demo: optim.lr = 0.0 is out of range; valid: > 0 and <= 10"]
    presets = runner.invoke(app, ["config", "presets"])
    assert presets.exit_code == 0 and presets.stdout.startswith("demo: ") and presets.stderr == ""
    listing = runner.invoke(app, ["plugins", "list"])
    assert listing.exit_code == 0 and "pgd" in listing.stdout and listing.stderr == ""
    listing = runner.invoke(app, ["plugins", "list", "--json"])
    assert json.loads(listing.stdout)["attack"] and listing.stderr == ""
    missing = runner.invoke(app, ["import-checkpoint", str(tmp_path / "none.pt"), "--format", "featurescatter",
                                  "--trust"])
    assert missing.exit_code == 2 and missing.stdout == ""
    assert _lines(missing.stderr) == [f"error: checkpoint not found: {tmp_path / 'none.pt'}"]
    untrusted = tmp_path / "model[v2].pt"
    untrusted.write_bytes(b"PK\x03\x04not really")
    refused = runner.invoke(app, ["import-checkpoint", str(untrusted), "--format", "featurescatter"])
    assert refused.exit_code == 2 and refused.stdout == "" and len(_lines(refused.stderr)) == 1
    assert "model[v2].pt" in refused.stderr and "--trust" in refused.stderr


def test_bracketed_text_in_errors_survives(tmp_path, monkeypatch):
    demo = typer.Typer()

    @demo.command()
    @friendly
    def fail(kind: str) -> None:
        if kind == "usage":
            raise UsageError("bad [optim]: lr must be > 0")
        if kind == "lines":
            raise FsappError("first\nsecond\tthird")
        raise FsappError("the PNG needs matplotlib: pip install 'fsapp[plots]' [/x] [bold]")

    result = runner.invoke(demo, ["usage"])
    assert result.exit_code == 2 and result.stderr == "error: bad [optim]: lr must be > 0\n"
    result = runner.invoke(demo, ["lines"])
    assert result.exit_code == 1 and result.stderr == "error: first\\nsecond\\tthird\n"  # one line, always
    result = runner.invoke(demo, ["other"])
    assert result.exit_code == 1
    assert result.stderr == "error: the PNG needs matplotlib: pip install 'fsapp[plots]' [/x] [bold]\n"

    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["config", "show", "exp[lr].toml"])
    assert result.exit_code == 2 and result.stderr == "error: config file not found: exp[lr].toml\n"
    Path("exp[lr].toml").write_text("[bogus]\nx = 1\n")
    result = runner.invoke(app, ["config", "show", "exp[lr].toml"])
    assert result.stderr.startswith("error: exp[lr].toml: unknown section [bogus]; valid: run, data,")
    result = runner.invoke(app, ["config", "show", "--set", 'run.name="[/x]"'])
    assert result.exit_code == 2 and result.stderr.startswith("error: preset demo: run.name = '[/x]' is not")
    result = runner.invoke(app, ["config", "show", "--set", "run.name=a\nb[/x]"])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1 and "'a\\nb[/x]'" in result.stderr


def test_training_output_prints_paths_and_messages_literally():
    out, err = io.StringIO(), io.StringIO()
    console = Console(file=out, width=60, soft_wrap=True)
    run_dir = "runs/[/x]-" + "d" * 120
    with TrainRenderer(console, Console(file=err, width=60, soft_wrap=True)) as renderer:
        renderer.handle(ev.RunStarted(run_dir, "cpu", 1, 1, 0, 0, False))
        renderer.handle(ev.Warning("plugin said [red]hi[/]"))
        renderer.handle(ev.EvalResult(0, 10, {"pgd[x]": 0.5, "worst_case": 0.5}, None,
                                      [{"id": "odd[/]", "message": "see [docs]"}], 1.0))
        renderer.handle(ev.Finished(run_dir + "/model.safetensors", run_dir, 2.0))
    text = out.getvalue()
    assert f"fsapp training in {run_dir} on cpu" in text
    assert "warning: plugin said [red]hi[/]" in err.getvalue() and "flag odd[/]: see [docs]" in text
    assert "pgd[x]" in text and f"finished in 2s; model: {run_dir}/model.safetensors" in text


def test_no_wrapping_when_piped(tmp_path):
    deep = tmp_path / ("long-directory-name-" * 10) / "experiment[lr=0.1].toml"
    assert len(str(deep)) > 200
    proc = _cli("config", "show", str(deep))
    assert proc.returncode == 2 and proc.stderr == f"error: config file not found: {deep}\n"
    proc = _cli("config", "presets")
    lines = proc.stdout.splitlines()
    from fsapp.config import PRESETS

    assert len(lines) == len(PRESETS) and all(": " in line and " " not in line.split(":")[0] for line in lines)
    assert max(map(len, lines)) > 80  # long lines exist and came out whole
    proc = _cli("plugins", "list")
    row = next(line for line in proc.stdout.splitlines() if " mlp " in line)
    assert "hidden=256, layers=2" in row  # a table row is not wrapped at 80 columns


def test_license_is_an_spdx_string():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"


def test_train_results_on_stdout_progress_never_printed_in_a_pipe(tmp_path):
    proc = _cli("train", "--set", "schedule.epochs=1", "--set", "data.train_limit=120", "--set", "eval.n=20",
                "--set", "eval.attacks=['pgd:steps=2']", "--set", "model.name=mlp",
                "--set", f"run.runs_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("fsapp training in ") and lines[-1].startswith("finished in ")
    assert "epoch 1: loss" in proc.stdout and "img/s" not in proc.stdout  # no progress bar in the results
    assert "img/s" not in proc.stderr and "ETA" not in proc.stderr  # nor on stderr when it is not a terminal
