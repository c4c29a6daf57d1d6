"""A corpus of hostile training checkpoints: ``--resume`` refuses each with one line and exit 2,
before training a step, leaving the run directory byte-identical and its lock free.

One tiny run is trained once (module fixture) and stopped mid-way; each case copies it, replaces
its checkpoint with a crafted one and resumes it (in-process; a subset through the real CLI).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from test_hostile_files import RSS_LIMIT_KB, TIME_LIMIT_S, assert_one_clean_line, deep, run_cli

from fsapp.checkpoint import restore_checkpoint
from fsapp.engine import events as ev
from fsapp.engine.rundir import CHECKPOINT, LOCK_NAME, MODEL, Control, RunLock
from fsapp.engine.train import train
from fsapp.errors import UsageError


class Ck:
    """The good checkpoint's tensors and metadata, and its file bytes."""

    def __init__(self, path: Path) -> None:
        self.data = path.read_bytes()
        with safe_open(str(path), "pt") as fh:
            self.meta: dict[str, str] = dict(fh.metadata())
            self.tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)


def edit(fn: Callable[[dict[str, torch.Tensor], dict[str, str]], Any]) -> Callable[[Ck], bytes]:
    """A builder applying ``fn`` to copies of the good tensors and metadata."""
    def build(ck: Ck) -> bytes:
        tensors = {k: v.clone() for k, v in ck.tensors.items()}
        meta = dict(ck.meta)
        fn(tensors, meta)
        return st_save(tensors, metadata=meta)
    return build


def state(**changes: Any) -> Callable[[Ck], bytes]:
    def fn(_t: dict, meta: dict) -> None:
        meta["state"] = json.dumps({**json.loads(meta["state"]), **changes})
    return edit(fn)


def optim(change: Callable[[dict], None]) -> Callable[[Ck], bytes]:
    def fn(_t: dict, meta: dict) -> None:
        opt = json.loads(meta["optimizer"])
        change(opt)
        meta["optimizer"] = json.dumps(opt)
    return edit(fn)


def tensor(key: str, change: Callable[[torch.Tensor], torch.Tensor | None]) -> Callable[[Ck], bytes]:
    def fn(tensors: dict, _m: dict) -> None:
        new = change(tensors[key])
        if new is None:
            del tensors[key]
        else:
            tensors[key] = new
    return edit(fn)


def _poke(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[0] = value
        return t
    return change


def _group(**values: Any) -> Callable[[dict], None]:
    return lambda opt: opt["param_groups"][0].update(values)


def _dup_key(ck: Ck) -> bytes:
    (n,) = struct.unpack("<Q", ck.data[:8])
    header = ck.data[8:8 + n].decode().rstrip()
    meta = json.loads(header)["__metadata__"]
    text = header[:-1] + ', "__metadata__": ' + json.dumps(meta) + "}"
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw + ck.data[8 + n:]


MOMENTUM = "optim.0.momentum_buffer"
WEIGHT = "model.net.1.weight"

CASES: list[tuple[str, str, Callable[[Ck], bytes]]] = [
    ("momentum-wrong-shape", "momentum_buffer", tensor(MOMENTUM, lambda t: torch.zeros(3, 3))),
    ("momentum-nan", "nan", tensor(MOMENTUM, _poke(math.nan))),
    ("momentum-inf", "nan or infinite", tensor(MOMENTUM, _poke(math.inf))),
    ("momentum-float64", "dtype", tensor(MOMENTUM, lambda t: t.double())),
    ("momentum-missing-for-one", "unlike the other", tensor(MOMENTUM, lambda t: None)),
    ("momentum-for-unknown-param", "", edit(lambda t, m: t.update({"optim.99.momentum_buffer": torch.zeros(2)}))),
    ("optim-unknown-tensor", "unknown tensor", edit(lambda t, m: t.update({"optim.0.junk": torch.zeros(2)}))),
    ("weights-nan", "nan", tensor(WEIGHT, _poke(math.nan))),
    ("weights-wrong-shape", "shape", tensor(WEIGHT, lambda t: t.reshape(-1)[:32].reshape(4, 8).clone())),
    ("weights-wrong-dtype", "dtype", tensor(WEIGHT, lambda t: t.half())),
    ("weights-missing", "missing keys", tensor(WEIGHT, lambda t: None)),
    ("momentum-missing-for-all", "lacks momentum buffers", edit(lambda t, m: [t.pop(k) for k in list(t) if k.startswith("optim.")])),
    ("optim-state-partial", "all or none", optim(lambda o: o["state"].pop("0"))),
    ("extra-tensor", "unexpected keys", edit(lambda t, m: t.update({"junk": torch.zeros(1)}))),
    ("rng-missing", "rng.torch", tensor("rng.torch", lambda t: None)),
    ("rng-wrong-dtype", "rng", tensor("rng.torch", lambda t: t.float())),
    ("rng-wrong-size", "rng.torch", tensor("rng.torch", lambda t: t[:100].clone())),
    ("extra-rng-wrong-dtype", "rng", edit(lambda t, m: t.update({"extra.rng.rank0.torch": torch.zeros(5, 5)}))),
    ("optimizer-field-missing", "lacks 'optimizer'", edit(lambda t, m: m.pop("optimizer"))),
    ("optimizer-not-json", "optimizer", edit(lambda t, m: m.update(optimizer="{oops"))),
    ("optimizer-nested-100k", "nested", edit(lambda t, m: m.update(optimizer=deep(100_000)))),
    ("param-groups-two", "parameter groups", optim(lambda o: o["param_groups"].append(o["param_groups"][0]))),
    ("param-group-params-wrong", "lists params", optim(_group(params=[0, 1, 2, 3, 4]))),
    ("param-group-lr-negative", "'lr'", optim(_group(lr=-0.1))),
    ("param-group-lr-string", "'lr'", optim(_group(lr="fast"))),
    ("param-group-momentum-nan", "'momentum'", optim(_group(momentum=math.nan))),
    ("param-group-unknown-key", "unknown keys", optim(_group(warp=9))),
    ("optim-state-scalar", "not valid", optim(lambda o: o["state"]["0"].update(step=-1))),
    ("state-field-missing", "lacks 'state'", edit(lambda t, m: m.pop("state"))),
    ("state-not-object", "'state' must be an object", edit(lambda t, m: m.update(state="[1, 2]"))),
    ("state-nested-100k", "nested", edit(lambda t, m: m.update(state='{"epoch": ' + deep(100_000) + "}"))),
    ("epoch-negative", "'epoch'", state(epoch=-1)),
    ("step-negative", "'step'", state(step=-3)),
    ("epoch-float", "'epoch'", state(epoch=1.5)),
    ("epoch-string", "'epoch'", state(epoch="1")),
    ("global-step-huge", "global_step", state(global_step=10**18)),
    ("step-beyond-epoch", "within an epoch", state(epoch=1, step=5, global_step=8)),
    ("bad-steps-negative", "'bad_steps'", state(bad_steps=-1)),
    ("world-size-zero", "'world_size'", state(world_size=0)),
    ("state-value-object", "plain value", state(note={"a": 1})),
    ("format-other", "not an fsapp training checkpoint", edit(lambda t, m: m.update(format="other"))),
    ("format-version-99", "version", edit(lambda t, m: m.update(format_version="99"))),
    ("duplicate-metadata-key", "duplicate", _dup_key),
    ("truncated", "", lambda ck: ck.data[:-100]),
    ("empty", "too short", lambda ck: b""),
    ("pickle", "pickle", lambda ck: b"\x80\x04\x95" + b"\0" * 32),
]
SPECIAL = ["model-as-checkpoint", "fifo", "directory", "symlink-to-fifo", "device"]
CLI_CASES = ["momentum-wrong-shape", "momentum-nan", "rng-wrong-size", "step-beyond-epoch", "model-as-checkpoint",
             "fifo", "truncated"]
ALL = [c[0] for c in CASES] + SPECIAL
FRAGMENTS = {c[0]: c[1] for c in CASES} | {"model-as-checkpoint": "a model file", "fifo": "not a regular file",
                                           "directory": "directory", "symlink-to-fifo": "not a regular file",
                                           "device": "not a regular file"}


def make_case(run: Path, name: str, ck: Ck) -> None:
    """Replace ``run``'s checkpoint with the hostile case ``name``."""
    path = run / CHECKPOINT
    path.unlink()
    if name == "model-as-checkpoint":
        shutil.copyfile(run / MODEL, path)
    elif name == "fifo":
        os.mkfifo(path)
    elif name == "directory":
        path.mkdir()
    elif name == "symlink-to-fifo":
        os.mkfifo(run.parent / "pipe")
        path.symlink_to(run.parent / "pipe")
    elif name == "device":
        path.symlink_to("/dev/zero")
    else:
        path.write_bytes(dict((c[0], c[2]) for c in CASES)[name](ck))


def snapshot(run: Path) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for path in sorted(run.rglob("*")):
        if path.name == LOCK_NAME:
            continue
        if path.is_symlink():
            out[str(path.relative_to(run))] = "link"
        elif path.is_file():
            out[str(path.relative_to(run))] = path.read_bytes()
        else:
            out[str(path.relative_to(run))] = "other"
    return out


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A tiny run (mlp on 90 digits, 3 steps an epoch) stopped after 4 steps: epoch 1, step 1."""
    root = tmp_path_factory.mktemp("ckrun")
    tables = {
        "run": {"runs_dir": str(root / "runs"), "seed": 1, "log_every": 1},
        "data": {"name": "digits", "batch_size": 30, "train_limit": 90},
        "model": {"name": "mlp", "hidden": 16, "layers": 1},
        "method": {"perturbation": "supervised", "epsilon": 0.1, "step_size": 0.05, "steps": 1, "loss": "ce"},
        "schedule": {"epochs": 3, "milestones": [2]},
        "eval": {"n": 0},
    }
    control = Control.new()
    steps = 0
    for event in train(tables, run_dir=root / "run", control=control):
        if isinstance(event, ev.StepEnd):
            steps += 1
            if steps >= 4:
                control.stop.set()
    return root / "run"


@pytest.fixture(scope="module")
def good(stopped_run) -> Ck:
    return Ck(stopped_run / CHECKPOINT)


def copy_run(src: Path, tmp: Path) -> Path:
    run = tmp / "run"
    shutil.copytree(src, run, symlinks=True)
    return run


def test_the_corpus_is_big_enough():
    assert len(ALL) >= 25 and len(set(ALL)) == len(ALL)


def test_the_stopped_run_resumes_and_finishes(stopped_run, good, tmp_path):
    state = json.loads(good.meta["state"])
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 1, 4)
    assert any(k.endswith("momentum_buffer") for k in good.tensors)
    run = copy_run(stopped_run, tmp_path)
    events = list(train(resume=run))
    assert events[0].resumed and not events[-1].stopped


@pytest.mark.parametrize("name", ALL)
def test_hostile_checkpoint_is_refused_in_process(stopped_run, good, tmp_path, name):
    run = copy_run(stopped_run, tmp_path)
    make_case(run, name, good)
    before = snapshot(run)
    t0 = time.perf_counter()
    with pytest.raises(UsageError) as info:
        list(train(resume=run))
    message = str(info.value)
    assert "\n" not in message and message.strip(), message
    assert FRAGMENTS[name].lower() in message.lower(), message
    assert time.perf_counter() - t0 < 5
    assert snapshot(run) == before
    assert not RunLock.is_held(run)


@pytest.mark.parametrize("name", CLI_CASES)
def test_hostile_checkpoint_through_the_cli(stopped_run, good, tmp_path, name):
    run = copy_run(stopped_run, tmp_path)
    make_case(run, name, good)
    before = snapshot(run)
    out = run_cli(["train", "--resume", str(run)], tmp_path, timeout=30)
    assert out.code == 2, (out.code, out.stderr[-2000:])
    assert_one_clean_line(out.stderr)
    assert FRAGMENTS[name].lower() in out.stderr.lower(), out.stderr
    assert out.seconds < TIME_LIMIT_S and out.rss_kb < RSS_LIMIT_KB
    assert snapshot(run) == before
    assert not RunLock.is_held(run)


def test_restore_refuses_a_step_beyond_the_epoch(good, tmp_path):
    from fsapp.plugins import get_registry

    path = tmp_path / "ck.safetensors"
    path.write_bytes(state(epoch=0, step=7, global_step=7)(good))
    model = get_registry().create("model", "mlp", num_classes=10, channels=1, size=8, mean=(0.5,), std=(0.5,),
                                  hidden=16, layers=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    with pytest.raises(UsageError, match="'step' = 7 is beyond the epoch's 3 steps"):
        restore_checkpoint(path, model, optimizer, steps_per_epoch=3)
    path.write_bytes(good.data)
    assert restore_checkpoint(path, model, optimizer, steps_per_epoch=3)["global_step"] == 4
