"""Hostile config values and names: each is one line, exit 2, no traceback, nothing written.

The corpus runs through the real CLI in-process (``fsapp config show --set``, which validates
without training), through :func:`fsapp.config.load`, and a handful through ``python -m fsapp
train`` in a fresh working directory (exit code, one stderr line, time, memory, files).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fsapp import config as C
from fsapp.cli.main import app
from fsapp.devices import check_device_name
from fsapp.engine.rundir import new_run_dir
from fsapp.errors import UsageError

BIG = "1e300"
RANGES = [  # (key, value as --set text): numbers out of range, non-finite, non-integers
    ("run.seed", "-1"), ("run.seed", BIG), ("run.seed", "1e23"), ("run.seed", str(2**63)),
    ("run.seed", "1.5"), ("run.seed", "nan"), ("run.seed", "inf"), ("run.seed", '"abc"'), ("run.seed", "true"),
    ("eval.seed", "-1"), ("eval.seed", "1e23"), ("eval.seed", str(2**64)),
    ("optim.lr", "0"), ("optim.lr", "-0.1"), ("optim.lr", BIG), ("optim.lr", "nan"), ("optim.lr", "inf"),
    ("optim.lr", "-inf"), ("optim.lr", "11"), ("optim.lr", "abc"), ("optim.lr", "1/0"),
    ("optim.weight_decay", "-1"), ("optim.weight_decay", BIG), ("optim.weight_decay", "2"),
    ("optim.weight_decay", "nan"),
    ("optim.momentum", "-0.1"), ("optim.momentum", "1"), ("optim.momentum", "1.5"), ("optim.momentum", "nan"),
    ("method.epsilon", "-0.1"), ("method.epsilon", "1.5"), ("method.epsilon", BIG), ("method.epsilon", "nan"),
    ("method.step_size", "-1"), ("method.step_size", "2"), ("method.step_size", "inf"),
    ("method.steps", "0"), ("method.steps", "-1"), ("method.steps", "1.5"), ("method.steps", "1000000000"),
    ("method.label_smoothing", "1"), ("method.label_smoothing", "-0.1"), ("method.label_smoothing", BIG),
    ("eval.eps", BIG), ("eval.eps", "-1"), ("eval.eps", "2"), ("eval.eps", "nan"),
    ("eval.step_size", "5"), ("eval.step_size", "-0.01"),
    ("eval.n", "-1"), ("eval.n", "1000000000000"), ("eval.n", "2.5"),
    ("eval.every", "0"), ("eval.every", BIG),
    ("eval.autoattack_n", "-1"), ("eval.autoattack_n", BIG),
    ("eval.batch_size", "0"), ("eval.batch_size", "1000000000"),
    ("data.batch_size", "1"), ("data.batch_size", "0"), ("data.batch_size", "-5"),
    ("data.batch_size", "1000000000"), ("data.batch_size", "2.5"), ("data.batch_size", BIG),
    ("data.train_limit", "-1"), ("data.train_limit", BIG),
    ("schedule.epochs", "0"), ("schedule.epochs", "1000000000"), ("schedule.epochs", "1.5"),
    ("schedule.epochs", BIG),
    ("schedule.milestones", "[0]"), ("schedule.milestones", "[-1]"), ("schedule.milestones", "[5, 3]"),
    ("schedule.milestones", "[1e300]"), ("schedule.milestones", "[1.5]"), ("schedule.milestones", "[3, 3]"),
    ("schedule.gamma", "0"), ("schedule.gamma", "2"), ("schedule.gamma", "nan"), ("schedule.gamma", "-1"),
    ("run.log_every", "0"), ("run.log_every", BIG),
    ("run.checkpoint_every", "-1"), ("run.checkpoint_every", BIG),
    ("run.max_bad_steps", "-1"), ("run.max_bad_steps", BIG),
    ("run.device", "mps"), ("run.device", "tpu"), ("run.device", "cuda:x"), ("run.device", '""'),
    ("run.device", "cuda:-1"), ("run.device", "CPU"), ("run.device", "cuda:1e3"),
    ("run.precision", "fp64"),
]
NAMES = [  # names and directories that would escape the runs directory or break paths
    ("run.name", '"../escape-rel"'), ("run.name", '".."'), ("run.name", '"."'), ("run.name", '"/abs"'),
    ("run.name", '"a/b"'), ("run.name", '"a\\u0000b"'), ("run.name", '"' + "x" * 300 + '"'),
    ("run.name", "x" * 101), ("run.name", '".hidden"'), ("run.name", '"a\\\\b"'), ("run.name", '"a b"'),
    ("run.name", '"a\\nb"'), ("run.name", '" "'), ("run.name", '"[/x]"'), ("run.name", "[1, 2]"),
    ("run.runs_dir", '""'), ("run.runs_dir", '"  "'), ("run.runs_dir", '"a\\u0000b"'),
    ("run.runs_dir", '"' + "d" * 5000 + '"'),
]
CORPUS = RANGES + NAMES
ROOT = Path(__file__).resolve().parents[1]


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_corpus_size():
    assert len(RANGES) >= 60 and len(NAMES) >= 15


@pytest.mark.parametrize("key, value", CORPUS, ids=[f"{k}={v[:24]}" for k, v in CORPUS])
def test_refused_in_process_with_one_line_naming_the_key(key, value):
    started = time.monotonic()
    with pytest.raises(UsageError) as info:
        C.load("demo", [f"{key}={value}"])
    message = str(info.value)
    assert "\n" not in message and len(message) < 1200
    assert key in message or key.split(".")[1] in message
    assert time.monotonic() - started < 10


def test_range_messages_name_key_value_and_range():
    cases = {
        "optim.lr=1e300": "optim.lr = 1e+300 is out of range; valid: > 0 and <= 10",
        "run.seed=1e300": "run.seed = 1.000e+300 is out of range; valid: 0..9223372036854775807",
        "eval.seed=-1": "eval.seed = -1 is out of range; valid: 0..9223372036854775807",
        "optim.momentum=1": "optim.momentum = 1.0 is out of range; valid: >= 0 and < 1",
        "data.batch_size=1": "data.batch_size = 1 is out of range; valid: 2..65536",
        "schedule.milestones=[0, 5]": "schedule.milestones = [0, 5] is out of range; valid: 1..100000",
        "run.device=mps": "run.device: unknown device 'mps'; valid: auto, cpu, cuda, cuda:N",
    }
    for override, expected in cases.items():
        with pytest.raises(UsageError) as info:
            C.load("demo", [override])
        assert str(info.value).startswith("preset demo: " + expected), str(info.value)


def test_whole_corpus_through_the_cli_writes_nothing(tmp_path, monkeypatch):
    """Every hostile value through ``fsapp config show --set`` (the real app, in-process)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    before = _tree(tmp_path)
    runner = CliRunner()
    for key, value in CORPUS:
        result = runner.invoke(app, ["config", "show", "--set", f"{key}={value}"])
        assert result.exit_code == 2, (key, value, result.output)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (key, value, lines)
        assert result.stdout == "" and "Traceback" not in result.stderr
    assert _tree(tmp_path) == before


def test_edge_values_are_accepted(tmp_path):
    """The ranges are not stricter than they say."""
    good = [
        "run.seed=9223372036854775807", "eval.seed=0", "optim.lr=10", "optim.lr=1e-8", "optim.momentum=0",
        "optim.weight_decay=1", "method.epsilon=1", "method.step_size=0", "method.steps=10000",
        "method.label_smoothing=0.99", "eval.eps=0", "eval.step_size=1", "data.batch_size=2",
        "eval.batch_size=1", "data.train_limit=0", "schedule.epochs=1", "schedule.milestones=[1]",
        "schedule.milestones=[]", "schedule.gamma=1", "eval.n=0", "run.checkpoint_every=0",
        "run.device=cuda:3", "run.device=cpu", "run.device=cuda", "run.name=" + "a" * 100,
        "run.name=run-1.b_c", "run.name=_x", f'run.runs_dir="{tmp_path}"', 'run.runs_dir="."',
        "run.seed=3.0",
    ]
    for override in good:
        key, _, text = override.partition("=")
        table, name = key.split(".")
        expected = C.parse_value(text)
        value = getattr(getattr(C.load("demo", [override]), table), name)
        assert value == (tuple(expected) if isinstance(expected, list) else expected), override


def test_an_empty_run_name_means_a_timestamped_name_inside_runs_dir(tmp_path):
    cfg = C.load("demo", ['run.name=""', f'run.runs_dir="{tmp_path / "runs"}"'])
    path = new_run_dir(cfg.run.runs_dir, cfg.run.name, cfg.method.perturbation, cfg.data.name)
    assert path.parent == tmp_path / "runs" and path.name.endswith("-feature-scatter-digits")


def test_runs_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="run.runs_dir = '.*file' exists and is not a directory"):
        C.load("demo", [f'run.runs_dir="{tmp_path / "file"}"'])


def test_check_run_dir_and_device_names(tmp_path):
    (tmp_path / "f").write_text("x")
    for bad, why in (("", "is empty"), (" ", "is empty"), (".", "names no new directory"),
                     ("..", "names no new directory"), ("a\0b", "NUL"), (str(tmp_path / "f"), "not a directory"),
                     ("x" * 5000, "cannot be used")):
        with pytest.raises(UsageError, match=why):
            C.check_run_dir(bad)
    assert C.check_run_dir(str(tmp_path / "new")) == tmp_path / "new"
    assert C.check_run_dir(tmp_path) == tmp_path
    for bad in ("mps", "tpu", "cuda:x", "", "cuda:", "cuda:-1", "gpu", " cpu"):
        with pytest.raises(UsageError, match="valid: auto, cpu, cuda, cuda:N"):
            check_device_name(bad)
    assert [check_device_name(n) for n in ("auto", "cpu", "cuda", "cuda:0", "cuda:12")]


TRAIN_CASES = [
    ["--set", "run.seed=1e300"], ["--set", "optim.lr=1e300"], ["--set", "optim.weight_decay=1e300"],
    ["--set", "eval.eps=1e300"], ["--set", "run.device=mps"], ["--set", "run.name=../escape-rel"],
    ["--set", "run.name=.."], ["--set", 'run.name="a\\u0000b"'], ["--set", 'run.runs_dir=""'],
    ["--run-dir", ""],
]


@pytest.mark.parametrize("args", TRAIN_CASES, ids=[" ".join(a) for a in TRAIN_CASES])
def test_train_refuses_before_writing_anything(tmp_path, args):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    abs_name = tmp_path / "escape-abs"
    parent_before = _tree(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "fsapp", "train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 10
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, lines
    assert proc.stdout == ""
    assert _tree(tmp_path) == parent_before and not abs_name.exists() and not list(cwd.iterdir())
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 2 * 1024 * 1024  # KiB: < 2 GB


def test_absolute_run_name_escapes_nowhere(tmp_path):
    target = tmp_path / "abs-run"
    with pytest.raises(UsageError, match="run.name"):
        C.load("demo", [f'run.name="{target}"'])
    assert not target.exists()
