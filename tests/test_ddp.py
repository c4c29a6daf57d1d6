"""Many devices on the CPU: ``python -m torch.distributed.run --nproc_per_node 2 -m fsapp train``
with gloo. The ranks end with identical weights, a non-finite loss on one rank skips the batch on
both, a killed run resumes to exactly the weights of an uninterrupted one, and the helpers of
``fsapp.engine.distributed`` are identities in one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import fsapp
from fsapp.checkpoint import read_safetensors
from fsapp.engine import distributed as ddp
from fsapp.engine.train import train
from fsapp.errors import UsageError

CONFIG = """
[run]
seed = 5
log_every = 1
checkpoint_every = 1
device = "cpu"
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
solver = "{solver}"
[schedule]
epochs = 2
milestones = [1]
[eval]
n = 40
eps = 0.2
step_size = 0.05
attacks = ["pgd:steps=2"]
"""

# A solver that returns a NaN plan on rank 1 only, for some batches (a deterministic function of
# the cost, so an interrupted and resumed run meets the same ones).
RANK_NAN_SOLVER = """
import os
from fsapp import hookimpl
from fsapp.builtins.solvers import sinkhorn_faithful

def factory(p):
    def solve(cost):
        plan = sinkhorn_faithful(cost)
        if os.environ.get("RANK") == "1" and int(cost.detach().sum().item() * 1e4) % 4 == 0:
            plan = plan * float("nan")
        return plan
    return solve

@hookimpl
def register_solvers(register):
    register("rank1-nan", factory)
"""


def _site(root: Path) -> Path:
    """A directory with the test solver as an installed plugin (for PYTHONPATH)."""
    site = root / "site"
    if not site.exists():
        site.mkdir()
        (site / "rank_nan_solver.py").write_text(textwrap.dedent(RANK_NAN_SOLVER))
        info = site / "rank_nan_solver-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rank-nan-solver\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text("[fsapp]\nrank_nan_solver = rank_nan_solver\n")
    return site


def _env(root: Path, slow: float = 0.0) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", FSAPP_FAULT_SLOW_WRITES=str(slow))
    env["PYTHONPATH"] = os.pathsep.join([str(_site(root))] + [p for p in [env.get("PYTHONPATH")] if p])
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _torchrun(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "fsapp", "train", *args, "--quiet"]


def _events(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(run / "model.safetensors")[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path]:
    """An uninterrupted 2-rank run: ``(root, run_dir)``."""
    root = tmp_path_factory.mktemp("ddp")
    cfg = root / "run.toml"
    cfg.write_text(CONFIG.format(solver="rank1-nan"))
    run = root / "ref"
    proc = subprocess.run(_torchrun([str(cfg), "--run-dir", str(run)]), env=_env(root), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, run


@pytest.mark.slow
def test_two_gloo_ranks_end_with_identical_weights(reference, monkeypatch):
    root, run = reference
    info = json.loads((run / "ddp.json").read_text())
    assert info["world_size"] == 2 and info["backend"] == "gloo" and info["in_sync"]
    assert len(set(info["state_digests"])) == 1
    # what rank 0 saved is what every rank holds
    monkeypatch.syspath_prepend(str(_site(root)))
    assert ddp.model_digest(fsapp.load_model(run / "model.safetensors")) == info["state_digests"][0]
    events = _events(run)
    kinds = [e["event"] for e in events]
    assert kinds.count("RunStarted") == 1 and kinds.count("Finished") == 1  # rank 0 alone writes
    assert kinds.count("EvalResult") == 2 and kinds.count("EpochEnd") == 2
    # 240 samples, global batch 30: 8 steps per epoch (each rank takes 15 samples a step)
    assert events[0]["steps_per_epoch"] == 8
    assert json.loads((run / "manifest.json").read_text())["world_size"] == 2
    state = json.loads(read_safetensors(run / "checkpoint.safetensors")[1]["state"])
    assert state["world_size"] == 2
    tensors, _ = read_safetensors(run / "checkpoint.safetensors")
    assert {"extra.rng.rank0.torch", "extra.rng.rank1.torch"} <= set(tensors)
    assert not torch.equal(tensors["extra.rng.rank0.torch"], tensors["extra.rng.rank1.torch"])
    # rank 1's NaN plan skipped those batches on both ranks (the weights stayed in sync)
    skipped = [e for e in events if e["event"] == "Warning" and "batch skipped" in e["message"]]
    assert skipped


@pytest.mark.slow
def test_resume_needs_the_same_world_size(reference, monkeypatch, fresh_registry):
    root, run = reference
    monkeypatch.syspath_prepend(str(_site(root)))
    fresh_registry()
    with pytest.raises(UsageError, match="trained by 2 process"):  # a finished run, trained on: 3 epochs
        list(train(resume=run, extend_epochs=3))


@pytest.mark.slow
def test_killed_ddp_run_resumes_bit_identical(reference):
    root, ref = reference
    cfg = root / "run.toml"
    run = root / "killed"
    proc = subprocess.Popen(_torchrun([str(cfg), "--run-dir", str(run)]), env=_env(root, slow=0.05),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = False
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = run / "metrics.jsonl"
        steps = metrics.read_text().count('"StepEnd"') if metrics.exists() else 0
        if steps >= 5:  # mid-way through the first epoch: kill rank 0 (its pid holds the run lock)
            pid = int((run / ".lock").read_text().strip())
            os.kill(pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.01)
    proc.wait(timeout=300)
    assert killed, "the run ended before it could be killed"
    assert proc.returncode != 0
    assert not (run / "model.safetensors").exists()
    state = json.loads(read_safetensors(run / "checkpoint.safetensors")[1]["state"])
    assert 1 <= state["global_step"] < 16
    done = subprocess.run(_torchrun(["--resume", str(run)]), env=_env(root), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [e["resumed"] for e in _events(run) if e["event"] == "RunStarted"] == [False, True]
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_helpers_are_identities_in_one_process():
    d = ddp.Dist()
    assert not d.active and d.is_main
    x = torch.arange(10)
    assert ddp.shard_rows(x, d) is x
    assert ddp.agree([True, False], d) == [True, False]
    assert ddp.broadcast_text("runs/x", d) == "runs/x"
    assert ddp.rng_state_tensors(d) == {}
    flag = torch.tensor(True)
    assert ddp.any_rank(flag) is flag
    model = torch.nn.Linear(3, 2)
    assert ddp.wrap(model, d) is model and ddp.unwrap(model) is model
    assert ddp.state_digests(model, d) == [ddp.model_digest(model)]


def test_shards_split_a_global_batch_evenly():
    x = torch.arange(20)
    parts = [ddp.shard_rows(x, ddp.Dist(rank=r, world_size=3)) for r in range(3)]
    assert [len(p) for p in parts] == [7, 7, 6]
    assert torch.equal(torch.cat(parts), x)


def test_model_digest_sees_every_tensor():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    b = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    b.load_state_dict(a.state_dict())
    assert ddp.model_digest(a) == ddp.model_digest(b)
    b[1].num_batches_tracked += 1
    assert ddp.model_digest(a) != ddp.model_digest(b)


def test_env_world(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert ddp.env_world() == (0, 1, 0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert ddp.env_world() == (1, 2, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(UsageError):
        ddp.env_world()


@pytest.mark.parametrize("name", ["mps", "tpu", "cuda:x", "", "cuda:-1", "CPU", "cuda:0:1", " cpu"])
def test_pick_device_refuses_names_outside_the_valid_choices(name):
    with pytest.raises(UsageError, match=r"valid here: auto, cpu"):
        ddp.pick_device(name)


def test_pick_device_accepts_what_this_build_runs():
    assert ddp.pick_device("cpu") == torch.device("cpu")
    assert ddp.pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:0", "cuda:12"):
            with pytest.raises(UsageError, match="no CUDA device"):
                ddp.pick_device(name)
    else:
        with pytest.raises(UsageError, match="does not exist"):
            ddp.pick_device(f"cuda:{torch.cuda.device_count()}")


def test_cuda_rng_states_are_ordered_by_device_index():
    keys = [f"rng.cuda.{i}" for i in range(12)] + ["rng.torch", "rng.cuda.x", "model.w"]
    assert sorted(k for k in keys if k.startswith("rng.cuda."))[:3] == ["rng.cuda.0", "rng.cuda.1", "rng.cuda.10"]
    assert ddp.cuda_rng_keys(set(keys)) == [f"rng.cuda.{i}" for i in range(12)]
    extra = {f"extra.rng.cuda.{i}": torch.tensor([i]) for i in (10, 2, 0, 1)}
    assert ddp.cuda_rng_keys(extra, "extra.rng.cuda.") == [f"extra.rng.cuda.{i}" for i in (0, 1, 2, 10)]
    if not torch.cuda.is_available():
        assert ddp.cuda_rng_tensors() == {} and ddp.restore_cuda_rng(extra) is False


def test_unwrap_takes_off_ddp_and_on_request_compile():
    model = torch.nn.Linear(2, 2)

    class Compiled(torch.nn.Module):  # what torch.compile returns keeps the module as _orig_mod
        def __init__(self) -> None:
            super().__init__()
            self._orig_mod = model

    wrapped = Compiled()
    assert ddp.unwrap(wrapped) is wrapped and ddp.unwrap(wrapped, compiled=False) is model


def test_evaluation_shards_in_one_process():
    shard = ddp.current()
    assert shard == ddp.Shard() and not shard.active and shard.owns(5)
    assert [ddp.Shard(1, 3).owns(b) for b in range(6)] == [False, True, False, False, True, False]
    values = torch.tensor([1.0, 2.0])
    assert ddp.all_sum(values) is values and ddp.all_max(values) is values
    ddp.barrier()  # no group: returns at once
    assert ddp.local_device(torch.device("cpu")) == torch.device("cpu")
