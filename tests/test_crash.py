"""SIGKILL a training process at many moments (during checkpoint writes too); it always resumes
from a complete checkpoint and ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fsapp.checkpoint import read_safetensors

CONFIG = """
[run]
seed = 5
log_every = 1
checkpoint_every = 1
[data]
name = "digits"
batch_size = 30
train_limit = 240
[model]
name = "small-cnn"
width = 8
hidden = 16
[method]
epsilon = 0.2
step_size = 0.2
[schedule]
epochs = 3
milestones = [2]
[eval]
n = 0
"""
KILLS = 20


def _cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "fsapp", "train", *args, "--quiet"]


def _env(slow: float) -> dict[str, str]:
    return dict(os.environ, FSAPP_FAULT_SLOW_WRITES=str(slow), OMP_NUM_THREADS="1")


def _checkpoint_ok(run: Path) -> int:
    """The checkpoint present (if any) must be complete; returns its global step."""
    path = run / "checkpoint.safetensors"
    if not path.exists():
        return -1
    tensors, meta = read_safetensors(path)  # raises on a torn file
    assert any(k.startswith("model.") for k in tensors)
    return json.loads(meta["state"])["global_step"]


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(CONFIG)
    ref = tmp_path / "ref"
    subprocess.run(_cmd([str(cfg), "--run-dir", str(ref)]), check=True, env=_env(0), capture_output=True)

    run = tmp_path / "run"
    rng = random.Random(1234)
    kills = during_write = 0
    steps_seen = []
    while kills < KILLS:
        args = ["--resume", str(run)] if (run / "config.toml").exists() else [str(cfg), "--run-dir", str(run)]
        proc = subprocess.Popen(_cmd(args), env=_env(0.08), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        before = _lines(run / "metrics.jsonl")
        deadline = time.monotonic() + 60
        target_write = kills % 2 == 0
        killed = False
        while time.monotonic() < deadline and proc.poll() is None:
            if _lines(run / "metrics.jsonl") > before + 1:  # it made progress in this life
                if target_write:
                    if any(p.name.endswith(".tmp") for p in run.iterdir()):
                        during_write += 1
                        proc.send_signal(signal.SIGKILL)
                        killed = True
                        break
                else:
                    time.sleep(rng.uniform(0, 0.4))
                    proc.send_signal(signal.SIGKILL)
                    killed = True
                    break
            time.sleep(0.002)
        proc.wait()
        if not killed:
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
            break  # it finished before we could kill it again
        kills += 1
        steps_seen.append(_checkpoint_ok(run))
    assert kills >= 20 and during_write >= 10
    assert steps_seen == sorted(steps_seen)  # progress is never lost
    # finish the run
    while not (run / "model.safetensors").exists():
        subprocess.run(_cmd(["--resume", str(run)]), check=True, env=_env(0), capture_output=True)
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]  # stale temp files swept
    a, _ = read_safetensors(ref / "model.safetensors")
    b, _ = read_safetensors(run / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
