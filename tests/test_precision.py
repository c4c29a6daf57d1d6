"""Mixed precision, memory layout and compilation: bf16/fp16 autocast with the cost matrix and the
transport plan kept in float32, bf16 training that still learns on digits, channels-last and
``torch.compile`` runs."""

from __future__ import annotations

import pytest
import torch

import fsapp
from fsapp.builtins.perturbations import scatter_loss
from fsapp.checkpoint import read_safetensors
from fsapp.engine import events as ev
from fsapp.engine.step import training_step


class _Spy:
    """A solver that records the dtype of the cost it gets and of the plan it returns."""

    def __init__(self, name: str = "sinkhorn") -> None:
        self.solver = fsapp.create("solver", name)
        self.seen: list[tuple[torch.dtype, torch.dtype]] = []

    def __call__(self, cost: torch.Tensor) -> torch.Tensor:
        plan = self.solver(cost)
        self.seen.append((cost.dtype, plan.dtype))
        return plan


@pytest.mark.parametrize("solver", ["sinkhorn", "sinkhorn:mode=converged", "ipot", "uniform"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cost_and_plan_stay_float32_under_autocast(solver, dtype):
    z = torch.randn(6, 10)
    z_adv = (z + 0.1 * torch.randn(6, 10)).requires_grad_(True)
    spy = _Spy(solver)
    with torch.autocast("cpu", dtype=dtype):
        loss = scatter_loss(z.to(dtype), z_adv.to(dtype), spy)
    assert spy.seen == [(torch.float32, torch.float32)] and loss.dtype == torch.float32
    reference = scatter_loss(z.to(dtype).float(), z_adv.to(dtype).float(), fsapp.create("solver", solver))
    assert torch.allclose(loss, reference, rtol=1e-5, atol=1e-7)
    (g,) = torch.autograd.grad(loss, z_adv)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_mixed_precision_step_runs_the_model_in_half_and_the_transport_in_float32(precision):
    torch.manual_seed(0)
    model = fsapp.create("model", "small-cnn", num_classes=10, channels=3, size=16, width=8, hidden=16,
                         mean=(0.5,) * 3, std=(0.25,) * 3)
    dtypes: list[torch.dtype] = []
    model.head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    spy = _Spy()
    perturb = fsapp.create("perturbation", "feature-scatter")
    perturb.solver = spy
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=precision == "fp16")
    x, y = torch.rand(12, 3, 16, 16), torch.randint(0, 10, (12,))
    before = [p.detach().clone() for p in model.parameters()]
    loss, logits, applied = training_step(model, perturb, opt, scaler, x, y, 0.5, precision)
    half = torch.bfloat16 if precision == "bf16" else torch.float16
    assert dtypes == [half, half, half]  # clean, perturbed, training forward
    assert spy.seen == [(torch.float32, torch.float32)]
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and applied
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def _digits(tmp_path, name: str, **run) -> dict:
    return {
        "run": {"runs_dir": str(tmp_path / "runs"), "seed": 1, "log_every": 50, "device": "cpu", **run},
        "data": {"name": "digits", "batch_size": 30, "train_limit": 600},
        "model": {"name": "small-cnn", "width": 16, "hidden": 32},
        "method": {"perturbation": "feature-scatter", "epsilon": 0.2, "step_size": 0.2},
        "schedule": {"epochs": 3, "milestones": [100]},
        "eval": {"n": 200, "eps": 0.2, "step_size": 0.05, "attacks": ["pgd:steps=3"], "every": 100},
    }


def test_bf16_feature_scattering_still_learns_digits(tmp_path):
    events = list(fsapp.train(_digits(tmp_path, "bf16", precision="bf16"), run_dir=tmp_path / "bf16"))
    epochs = [e for e in events if isinstance(e, ev.EpochEnd)]
    assert [e.bad_steps for e in epochs] == [0, 0, 0]
    assert epochs[-1].loss < epochs[0].loss - 0.1 and epochs[-1].accuracy > epochs[0].accuracy + 0.2
    final = [e for e in events if isinstance(e, ev.EvalResult)][-1]
    assert final.accuracy["clean"] > 0.75  # held-out digits, 10 classes (fp32 reaches about 0.9 here)
    assert final.accuracy["pgd:steps=3"] > 0.3


def test_channels_last_trains_like_contiguous(tmp_path):
    over = {"schedule": {"epochs": 1, "milestones": [100]}, "eval": {"n": 0}}
    out = {}
    for cl in (False, True):
        tables = _digits(tmp_path, str(cl), channels_last=cl)
        tables["method"] = {"perturbation": "none", "loss": "ce"}
        tables.update(over)
        list(fsapp.train(tables, run_dir=tmp_path / f"cl-{cl}"))
        out[cl] = read_safetensors(tmp_path / f"cl-{cl}" / "model.safetensors")[0]
    for key in out[False]:
        assert torch.allclose(out[False][key].float(), out[True][key].float(), atol=1e-4), key
    # and Feature Scattering runs channels-last end to end
    tables = _digits(tmp_path, "fs", channels_last=True)
    tables.update(over)
    events = list(fsapp.train(tables, run_dir=tmp_path / "cl-fs"))
    assert isinstance(events[-1], ev.Finished) and events[-2].__class__.__name__ == "CheckpointSaved"
    assert [e.bad_steps for e in events if isinstance(e, ev.EpochEnd)] == [0]


@pytest.mark.slow
def test_compile_runs_feature_scattering(tmp_path):
    """torch.compile of the model (eval-mode attack passes and the train-mode pass); a tiny MLP keeps
    the inductor's CPU compile to about half a minute."""
    losses = {}
    for compiled in (False, True):
        tables = _digits(tmp_path, str(compiled), compile=compiled, log_every=1)
        tables["model"] = {"name": "mlp"}
        tables["data"]["train_limit"] = 60
        tables["schedule"] = {"epochs": 1, "milestones": [100]}
        tables["eval"] = {"n": 0}
        events = list(fsapp.train(tables, run_dir=tmp_path / f"compile-{compiled}"))
        losses[compiled] = [e.loss for e in events if isinstance(e, ev.StepEnd)]
    assert len(losses[True]) == 2
    assert abs(losses[True][0] - losses[False][0]) < 1e-2
