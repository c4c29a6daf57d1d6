"""``fsapp train --seeds N``, ``--tracker`` / ``run.trackers`` and ``-q``'s one summary line, through
the real CLI in a subprocess."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

TINY = ["--set", "schedule.epochs=1", "--set", "data.train_limit=120", "--set", "eval.n=20",
        "--set", "eval.attacks=['pgd:steps=2']", "--set", "model.name=mlp"]


def _fsapp(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "fsapp", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


def test_seeds_trackers_and_one_summary_line_per_run(tmp_path):
    result = _fsapp(["train", *TINY, "--set", "run.name=grp", "--set", "run.trackers=['csv']",
                     "--seeds", "2", "--tracker", "tensorboard", "-q"], tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["run grp-s0", "run grp-s1"]
    for line in lines:
        fields = line.split(" | ")
        assert fields[1] == "finished" and fields[2] == "epoch 1"
        assert any(f.startswith("pgd:steps=2 ") for f in fields) and any(f.startswith("worst ") for f in fields)
        assert fields[-1].startswith("model ") and Path(tmp_path, fields[-1][6:]).is_file()
    for seed in (0, 1):
        run = tmp_path / "runs" / f"grp-s{seed}"
        assert f"seed = {seed}" in (run / "config.toml").read_text()
        rows = list(csv.DictReader((run / "csv" / "eval_result.csv").open()))
        assert len(rows) == 1 and float(rows[0]["accuracy.clean"]) >= 0.0
        assert list((run / "tb").glob("events.out.tfevents.*"))
    table = _fsapp(["report", "runs", "--format", "csv"], tmp_path)
    assert table.returncode == 0, table.stderr
    (row,) = list(csv.DictReader(table.stdout.splitlines()))
    assert (row["run"], row["runs"], row["seeds"]) == ("grp", "2", "0;1")


def test_seeds_refuse_a_run_dir_and_an_unknown_tracker_is_one_line(tmp_path):
    result = _fsapp(["train", *TINY, "--seeds", "2", "--run-dir", str(tmp_path / "x")], tmp_path)
    assert result.returncode == 2 and "drop --resume and --run-dir" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    result = _fsapp(["train", *TINY, "--tracker", "no-such-tracker"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "no-such-tracker" in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
