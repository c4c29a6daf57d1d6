"""A training job's randomness is its own: other code in the same process (a notebook's draws, an
evaluation, a second training generator) neither changes a run nor is changed by it."""

from __future__ import annotations

from pathlib import Path

import torch

import fsapp
from fsapp.checkpoint import read_safetensors
from fsapp.engine import events as ev
from fsapp.engine.randomness import owning_randomness


def _tables(tmp: Path, seed: int) -> dict:
    return {
        "run": {"runs_dir": str(tmp / "runs"), "seed": seed, "log_every": 1},
        "data": {"name": "digits", "batch_size": 30, "train_limit": 90},
        "model": {"name": "small-cnn", "width": 8, "hidden": 32},
        "method": {"perturbation": "feature-scatter", "epsilon": 0.1, "step_size": 0.1},
        "schedule": {"epochs": 2, "milestones": [1]},
        "eval": {"n": 20, "eps": 0.1, "step_size": 0.05, "attacks": ["pgd:steps=2"]},
    }


def _numbers(events: list[ev.Event]) -> list[tuple]:
    """What a run computed, without timings and paths."""
    out: list[tuple] = []
    for e in events:
        if isinstance(e, ev.StepEnd):
            out.append(("step", e.global_step, e.loss, e.accuracy))
        elif isinstance(e, ev.EpochEnd):
            out.append(("epoch", e.epoch, e.loss, e.accuracy))
        elif isinstance(e, ev.EvalResult):
            out.append(("eval", e.epoch, tuple(sorted(e.accuracy.items()))))
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(run / "model.safetensors")[0]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_runs_advanced_alternately_equal_each_run_alone(tmp_path):
    alone = {seed: _numbers(list(fsapp.train(_tables(tmp_path, seed), run_dir=tmp_path / f"alone{seed}")))
             for seed in (1, 2)}
    gens = {seed: fsapp.train(_tables(tmp_path, seed), run_dir=tmp_path / f"mixed{seed}") for seed in (1, 2)}
    got: dict[int, list[ev.Event]] = {1: [], 2: []}
    live = set(gens)
    while live:
        for seed in sorted(live):
            event = next(gens[seed], None)
            if event is None:
                live.discard(seed)
            else:
                got[seed].append(event)
    for seed in (1, 2):
        assert _numbers(got[seed]) == alone[seed]
        assert _same_weights(tmp_path / f"alone{seed}", tmp_path / f"mixed{seed}")
    assert alone[1] != alone[2]  # the comparison can fail: the seeds give different runs


def test_draws_and_evaluations_between_steps_change_nothing(tmp_path):
    alone = _numbers(list(fsapp.train(_tables(tmp_path, 1), run_dir=tmp_path / "alone")))
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    probe = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    events = []
    for event in fsapp.train(_tables(tmp_path, 1), run_dir=tmp_path / "busy"):
        events.append(event)
        torch.rand(17)  # a notebook's own draws
        torch.manual_seed(1234)  # even reseeding the process
        fsapp.evaluate(probe, x, y, ["pgd:eps=0.1,steps=2"])
    assert _numbers(events) == alone
    assert _same_weights(tmp_path / "alone", tmp_path / "busy")


def test_the_callers_stream_is_not_moved_by_a_run(tmp_path):
    torch.manual_seed(7)
    expected = [torch.rand(3) for _ in range(4)]
    torch.manual_seed(7)
    got = []
    run = fsapp.train(_tables(tmp_path, 1), run_dir=tmp_path / "run")
    for _ in range(4):
        got.append(torch.rand(3))
        next(run)  # the job draws random starts and initial weights in between
    run.close()
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_owning_randomness_restores_the_callers_state_when_the_job_fails():
    def job():
        torch.manual_seed(99)
        yield torch.rand(1)
        torch.rand(5)
        raise RuntimeError("boom")

    torch.manual_seed(0)
    state = torch.get_rng_state()
    events = owning_randomness(job())
    first = next(events)
    assert torch.equal(torch.get_rng_state(), state)
    try:
        next(events)
    except RuntimeError:
        pass
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(99)
    assert torch.equal(first, torch.rand(1))
