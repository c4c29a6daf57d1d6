"""Model files are validated before use, pickles are refused, writes are atomic, runs are locked."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fsapp
from fsapp.checkpoint import atomic_write_bytes, model_metadata, read_safetensors
from fsapp.engine import events as ev
from fsapp.engine.rundir import RunLock
from fsapp.engine.train import train
from fsapp.errors import PluginError, TrainingAborted, UsageError


def _small_model():
    params = dict(num_classes=10, channels=1, size=8, mean=(0.3,), std=(0.3,))
    torch.manual_seed(0)
    return fsapp.create("model", "mlp:hidden=16,layers=1", **params), params


def _meta(params, **extra):
    meta = model_metadata("mlp", {**params, "hidden": 16, "layers": 1}, dataset="digits")
    meta.update(extra)
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


@pytest.fixture
def good_file(tmp_path):
    model, params = _small_model()
    path = tmp_path / "good.safetensors"
    fsapp.save_model(path, model, model_metadata("mlp", {**params, "hidden": 16, "layers": 1}, dataset="digits"))
    return path, model, params


def _tensors(model):
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def crafted_files(tmp_path, model, params):
    """(name, path, expected message fragment) for each kind of broken file."""
    out = []

    def add(name, fragment, tensors=None, meta=None, raw=None):
        path = tmp_path / f"{name}.safetensors"
        if raw is not None:
            path.write_bytes(raw)
        else:
            save_file(tensors if tensors is not None else _tensors(model), path,
                      metadata=meta if meta is not None else _meta(params))
        out.append((name, path, fragment))

    good = _tensors(model)
    add("absurd-header", "header claims", raw=struct.pack("<Q", 2**60) + b"{}")
    add("header-past-end", "header claims", raw=struct.pack("<Q", 500) + b"{}")
    add("too-short", "too short", raw=b"abc")
    add("bad-json", "safetensors header is not valid JSON", raw=struct.pack("<Q", 5) + b"{nope")
    add("not-fsapp", "not an fsapp model file", meta={"format": "other"})
    add("future-version", "version '9' is not supported", meta=_meta(params, format_version="9"))
    add("no-model-name", "lacks model", meta={k: v for k, v in _meta(params).items() if k != "model"})
    add("bad-params-json", "not valid JSON", meta=_meta(params) | {"model_params": "{oops"})
    add("bad-input-shape", "input_shape", meta=_meta(params) | {"input_shape": "[1, 8]"})
    add("missing-key", "missing keys", tensors={k: v for k, v in good.items() if not k.endswith("bias")})
    add("unexpected-key", "unexpected keys extra.weight", tensors=good | {"extra.weight": torch.zeros(2)})
    wrong_shape = dict(good)
    key = next(iter(good))
    wrong_shape[key] = torch.zeros(3, 3)
    add("wrong-shape", "has shape (3, 3)", tensors=wrong_shape)
    add("wrong-dtype", "dtype torch.float64", tensors=good | {key: good[key].double()})
    nan = dict(good)
    nan[key] = good[key].clone()
    nan[key].view(-1)[0] = float("nan")
    add("nan-values", "NaN or infinite", tensors=nan)
    add("unknown-plugin-model", "install the plugin 'fsapp-fancy'",
        meta=_meta(params) | {"model": "fancy-net", "model_plugin": "fsapp-fancy"})
    good_bytes = (tmp_path / "missing-key.safetensors").read_bytes()
    add("truncated", "truncated", raw=good_bytes[: len(good_bytes) - 40])
    return out


def test_crafted_model_files_are_refused_with_one_line(tmp_path, good_file):
    _, model, params = good_file
    cases = crafted_files(tmp_path, model, params)
    assert len(cases) >= 15
    for name, path, fragment in cases:
        with pytest.raises(UsageError) as info:
            fsapp.load_model(path)
        message = str(info.value)
        assert fragment in message, (name, message)
        assert "\n" not in message and str(path) in message, name


def test_crafted_file_on_the_cli_exit_2_no_traceback(tmp_path, good_file):
    _, model, params = good_file
    name, path, fragment = crafted_files(tmp_path, model, params)[0]
    proc = subprocess.run([sys.executable, "-m", "fsapp", "eval", str(path), "--n", "5"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and fragment in proc.stderr


def test_metadata_is_never_executed(tmp_path, good_file):
    _, model, params = good_file
    path = tmp_path / "evil.safetensors"
    marker = tmp_path / "pwned"
    evil = _meta(params) | {"model": f"__import__('os').system('touch {marker}')"}
    save_file(_tensors(model), path, metadata=evil)
    with pytest.raises(UsageError, match="must be a component name"):
        fsapp.load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_pickle_files_are_refused_with_how_to_convert(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"net": {"w": torch.zeros(2)}}, path)
    with pytest.raises(UsageError, match="never unpickles.*import-checkpoint"):
        fsapp.load_model(path)


def _authors_layout(model) -> dict:
    """fsapp wrn names -> the authors' release names (module.basic_net.block1.layer.0.convShortcut ...)."""
    import re

    out = {}
    for key, value in model.state_dict().items():
        k = re.sub(r"^block(\d)\.(\d+)\.", r"block\1.layer.\2.", key).replace(".shortcut.", ".convShortcut.")
        k = "bn1." + k[3:] if k.startswith("bn.") else k
        out["module.basic_net." + k] = value.clone()
    return out


def test_import_featurescatter_checkpoint(tmp_path):
    torch.manual_seed(3)
    reference = fsapp.create("model", "wrn:depth=10,widen=2", num_classes=10, channels=3, size=32,
                             mean=(0.0,), std=(1.0,)).eval()
    for m in reference.modules():  # non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    source = tmp_path / "model_cifar_wrn.pt"
    torch.save({"net": _authors_layout(reference), "acc": 90.0, "epoch": 200}, source)
    out = tmp_path / "fs.safetensors"
    proc = subprocess.run([sys.executable, "-m", "fsapp", "import-checkpoint", str(source), "--format",
                           "featurescatter", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2 and "--trust" in proc.stderr and not out.exists()
    proc = subprocess.run([sys.executable, "-m", "fsapp", "import-checkpoint", str(source), "--format",
                           "featurescatter", "--out", str(out), "--trust"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    imported = fsapp.load_model(out)
    _, meta = read_safetensors(out)
    assert json.loads(meta["model_params"])["depth"] == 10 and json.loads(meta["model_params"])["widen"] == 2
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(imported(x), reference(x * 2 - 1), atol=1e-5)  # their inputs live in [-1, 1]


def test_import_refuses_wrong_layout(tmp_path):
    source = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, source)
    with pytest.raises(UsageError, match="expected a dict with a 'net'"):
        from fsapp.importers import import_checkpoint

        import_checkpoint(source, "featurescatter", tmp_path / "o.safetensors", trust=True)


# -- atomic writes and disk-full -------------------------------------------------------------

def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_disk_full_during_checkpoint_aborts_cleanly(tmp_path, tiny_digits_config, monkeypatch):
    tables = tiny_digits_config(tmp_path, eval__n=0)
    run = tmp_path / "run"
    events = train(tables, run_dir=run)
    real_fsync = os.fsync
    checkpoints = 0
    with pytest.raises(TrainingAborted, match="No space left on device.*previous checkpoint is intact"):
        for event in events:
            if isinstance(event, ev.CheckpointSaved):
                checkpoints += 1
                before = (run / "checkpoint.safetensors").read_bytes()

                def full(fd):
                    raise OSError(errno.ENOSPC, "No space left on device")

                monkeypatch.setattr(os, "fsync", full)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert checkpoints == 1
    assert (run / "checkpoint.safetensors").read_bytes() == before
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    resumed = list(train(resume=run))
    assert isinstance(resumed[-1], ev.Finished)


def test_unwritable_runs_dir_is_a_usage_error(tmp_path, tiny_digits_config):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="cannot create run directory"):
        list(train(tiny_digits_config(tmp_path), run_dir=blocker / "run"))


# -- one writer per run ----------------------------------------------------------------------

def test_second_writer_is_refused(tmp_path, tiny_digits_config):
    run = tmp_path / "run"
    run.mkdir()
    lock = RunLock.acquire(run)
    try:
        with pytest.raises(UsageError, match=f"being written by another fsapp process \\(pid {os.getpid()}\\)"):
            list(train(tiny_digits_config(tmp_path), run_dir=run))
        assert RunLock.is_held(run)
    finally:
        lock.release()
    assert not RunLock.is_held(run)


def test_crashed_writer_leaves_no_stuck_lock(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    code = f"from fsapp.engine.rundir import RunLock; RunLock.acquire({str(run)!r}); import os; os.kill(os.getpid(), 9)"
    subprocess.run([sys.executable, "-c", code])
    assert (run / ".lock").exists() and not RunLock.is_held(run)
    RunLock.acquire(run).release()


def test_cli_second_writer_exit_2(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = RunLock.acquire(run)
    try:
        proc = subprocess.run([sys.executable, "-m", "fsapp", "train", "--run-dir", str(run), "--set",
                               "schedule.epochs=1"], capture_output=True, text=True)
    finally:
        lock.release()
    assert proc.returncode == 2 and "being written by another fsapp process" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- numerical guards and malformed plugins ---------------------------------------------------

NAN_SOLVER = """
from fsapp import hookimpl
import torch
CALLS = [0]

def factory(p):
    def solve(cost):
        CALLS[0] += 1
        plan = torch.full_like(cost, 1.0 / cost.numel())
        return plan * float("nan") if CALLS[0] > 6 else plan
    return solve

@hookimpl
def register_solvers(register):
    register("nan-later", factory)
"""


@pytest.mark.parametrize("host_checks, n_warnings", [("every-step", 4), ("log-points", 2)])
def test_non_finite_steps_are_skipped_then_abort_keeps_last_good_checkpoint(tmp_path, tiny_digits_config,
                                                                             install_plugin, fresh_registry,
                                                                             host_checks, n_warnings):
    """Steps 7.. produce a NaN plan. Read after every step, or (as on a GPU, sync-free) at log
    points every 2 steps: either way the bad batches are skipped, counted and the run aborts."""
    install_plugin("nan-plugin", "nan_solver_mod", NAN_SOLVER)
    fresh_registry()
    tables = tiny_digits_config(tmp_path, method__solver="nan-later", run__max_bad_steps=3, eval__n=0,
                                run__host_checks=host_checks)
    run = tmp_path / "run"
    seen: list = []
    with pytest.raises(TrainingAborted, match="non-finite steps.*lower optim.lr or method.epsilon"):
        for event in train(tables, run_dir=run):
            seen.append(event)
    warnings = [e for e in seen if isinstance(e, ev.Warning)]
    assert len(warnings) == n_warnings and "skipped" in warnings[0].message
    ckpt = [e for e in seen if isinstance(e, ev.CheckpointSaved)]
    assert [c.epoch for c in ckpt] == [1]
    state = json.loads(read_safetensors(run / "checkpoint.safetensors")[1]["state"])
    assert state["epoch"] == 1 and state["global_step"] == 6


BAD_PERTURBATIONS = """
from dataclasses import dataclass
from fsapp import hookimpl
import torch

@dataclass
class P:
    epsilon: float = 0.1

@hookimpl
def register_perturbations(register):
    register("leaky", lambda p: (lambda model, x, y: (x + 0.5).clamp(0, 1)), params=P)
    register("wrong-shape", lambda p: (lambda model, x, y: x[:1]), params=P)
"""


def test_malformed_plugin_perturbations_are_caught_and_named(tmp_path, tiny_digits_config, install_plugin,
                                                             fresh_registry):
    install_plugin("bad-perturb", "bad_perturb_mod", BAD_PERTURBATIONS)
    fresh_registry()
    tables = tiny_digits_config(tmp_path, method__perturbation="leaky", schedule__epochs=1, eval__n=0)
    events = list(train(tables, run_dir=tmp_path / "leaky"))
    warnings = [e.message for e in events if isinstance(e, ev.Warning)]
    assert warnings and "plugin 'bad-perturb'" in warnings[0] and "outside the eps-ball" in warnings[0]
    assert isinstance(events[-1], ev.Finished)
    tables = tiny_digits_config(tmp_path, method__perturbation="wrong-shape", schedule__epochs=1, eval__n=0)
    with pytest.raises(PluginError, match="'wrong-shape' from plugin 'bad-perturb' returned \\(1, 1, 8, 8\\)"):
        list(train(tables, run_dir=tmp_path / "shape"))


def test_strict_plugins_cli(install_plugin, tmp_path):
    site = install_plugin("broken-cli", "broken_cli_mod", "raise ImportError('missing dep')")
    env = dict(os.environ, PYTHONPATH=str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "fsapp", "plugins", "list", "--json"], capture_output=True,
                          text=True, env=env)
    assert proc.returncode == 0
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        "warning: plugin 'broken-cli' skipped: import failed: ImportError: missing dep"]
    proc = subprocess.run([sys.executable, "-m", "fsapp", "--strict-plugins", "plugins", "list"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "broken-cli" in proc.stderr and "Traceback" not in proc.stderr
    assert Path(site).is_dir()


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, good_file, umask, mode):
    from fsapp.checkpoint import atomic_write_text

    _, model, params = good_file
    old = os.umask(umask)
    try:
        text = atomic_write_text(tmp_path / "config.toml", "x = 1\n")
        weights = fsapp.save_model(tmp_path / "m.safetensors", model,
                                   model_metadata("mlp", {**params, "hidden": 16, "layers": 1}))
        atomic_write_text(text, "x = 2\n")  # replacing keeps following the umask
    finally:
        os.umask(old)
    for path in (text, weights):
        assert path.stat().st_mode & 0o777 == mode, (path, oct(path.stat().st_mode))
    assert not list(tmp_path.glob(".*.tmp"))


def test_fifo_model_file_is_refused_before_it_is_opened(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match=r"is not a regular file \(a FIFO\)"):
        read_safetensors(fifo)


def test_import_refuses_a_fifo_without_opening_it(tmp_path):
    from fsapp.importers import import_checkpoint

    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="is not a regular file"):
        import_checkpoint(fifo, "featurescatter", tmp_path / "out.safetensors", trust=True)
    assert not (tmp_path / "out.safetensors").exists()
