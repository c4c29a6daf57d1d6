"""``torchrun --nproc_per_node 2 -m fsapp eval``: two CPU processes (gloo) report what one process reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fsapp
from fsapp.checkpoint import model_metadata
from fsapp.data import to_unit
from fsapp.plugins import get_registry

ATTACKS = ["pgd:steps=3", "cw:steps=3", "autoattack-fast:steps=3,targets=1,queries=20"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.set_num_threads(1)
    reg = get_registry()
    d = reg.create("dataset", "digits")
    params = {"num_classes": 10, "channels": 1, "size": 8, "mean": tuple(d.mean), "std": tuple(d.std),
              "hidden": 32, "layers": 1}
    torch.manual_seed(0)
    model = reg.create("model", "mlp", **params)
    opt = torch.optim.Adam(model.parameters(), 0.02)
    x, y = to_unit(d.x_train), d.y_train
    for _ in range(60):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("dist") / "model.safetensors"
    meta = model_metadata("mlp", params, dataset="digits", extra={"eval_eps": 0.1, "eval_step_size": 0.025})
    return fsapp.save_model(path, model.eval(), meta)


def _json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout[-2000:]  # only rank 0 prints
    return json.loads(lines[0])


def test_two_processes_report_the_same_totals(model_file, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = ["eval", str(model_file), *[a for spec in ATTACKS for a in ("--attack", spec)], "-n", "90",
            "--batch-size", "16", "--device", "cpu", "--json"]
    one = _json(subprocess.run([sys.executable, "-m", "fsapp", *args, "--out", str(tmp_path / "one.json")],
                               env=env, capture_output=True, text=True, timeout=300))
    two = _json(subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                "-m", "fsapp", *args, "--out", str(tmp_path / "two.json")],
                               env=env, capture_output=True, text=True, timeout=300))
    assert one["world_size"] == 1 and two["world_size"] == 2
    for key in ("accuracy", "robust_count", "per_sample", "checks", "flags", "gap_ce_minus_margin"):
        assert two[key] == one[key], key
    assert [a["stages"] for a in two["attacks"]] == [a["stages"] for a in one["attacks"]]
    assert json.loads((tmp_path / "two.json").read_text())["accuracy"] == one["accuracy"]
    assert not list(tmp_path.glob(".state-*"))  # every rank removed its state file
