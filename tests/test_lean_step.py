"""The lean Feature Scattering step: the same update as a straightforward step written from the
public pieces, with one clean forward (no grad), one forward/backward w.r.t. the input only, one
training forward/backward, no model copy and no host sync outside the solver; a non-finite loss
skips the batch with or without a host sync."""

from __future__ import annotations

import pytest
import torch

import fsapp
from fsapp.engine.step import training_step
from fsapp.losses import cost_matrix, soft_cross_entropy

EPS = 8 / 255


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = fsapp.create("model", "small-cnn", num_classes=10, channels=3, size=16, width=8, hidden=16,
                         mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    return model.to(dtype)


def _batch(dtype: torch.dtype = torch.float32, n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 16, 16, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def _sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)


def _reference_step(model, opt, x, y, solver, eps=EPS, step=EPS):  # noqa: ANN001, ANN202
    """Feature Scattering as the paper describes it, written out from the public pieces."""
    model.eval()
    with torch.no_grad():
        z = model(x)
    x0 = (x + torch.empty_like(x).uniform_(-eps, eps)).requires_grad_(True)
    C = cost_matrix(z, model(x0))
    (g,) = torch.autograd.grad((solver(C) * C).sum(), x0)
    x_adv = torch.clamp(x + torch.clamp(x0.detach() + step * g.sign() - x, -eps, eps), 0, 1)
    model.train()
    loss = soft_cross_entropy(model(x_adv), y, 0.5)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lean_step_computes_the_straightforward_update(dtype):
    x, y = _batch(dtype)
    lean, ref = _model(dtype), _model(dtype)
    opt_lean, opt_ref = _sgd(lean), _sgd(ref)
    perturb = fsapp.create("perturbation", "feature-scatter:layout=keep")
    solver = fsapp.create("solver", "sinkhorn")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for seed in range(3):
        torch.manual_seed(seed)
        loss, _, applied = training_step(lean, perturb, opt_lean, scaler, x, y, 0.5)
        torch.manual_seed(seed)
        expected = _reference_step(ref, opt_ref, x, y, solver)
        assert applied is True and torch.equal(loss, expected)
    a, b = _state(lean), _state(ref)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for p, q in zip(opt_lean.param_groups[0]["params"], opt_ref.param_groups[0]["params"], strict=True):
        assert torch.equal(opt_lean.state[p]["momentum_buffer"], opt_ref.state[q]["momentum_buffer"])


def test_deferred_check_gives_the_same_update():
    x, y = _batch()
    a, b = _model(), _model()
    opt_a, opt_b = _sgd(a), _sgd(b)
    perturb = fsapp.create("perturbation", "feature-scatter")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for seed in range(2):
        torch.manual_seed(seed)
        la, _, ok_a = training_step(a, perturb, opt_a, scaler, x, y, 0.5)
        torch.manual_seed(seed)
        lb, _, ok_b = training_step(b, perturb, opt_b, scaler, x, y, 0.5, sync=False)
        assert ok_a is True and isinstance(ok_b, torch.Tensor) and bool(ok_b)
        assert torch.equal(la, lb)
    sa, sb = _state(a), _state(b)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_pass_count_and_no_model_copy():
    model = _model()
    x, y = _batch()
    calls: list[tuple[bool, bool, bool]] = []
    model.register_forward_hook(lambda m, i, o: calls.append((m.training, torch.is_grad_enabled(),
                                                               i[0].requires_grad)))
    grads_seen: list[str] = []
    for name, p in model.named_parameters():
        p.register_hook(lambda g, name=name: grads_seen.append(name))
    opt = _sgd(model)
    perturb = fsapp.create("perturbation", "feature-scatter")
    x_adv = perturb(model, x, y)
    # one clean forward without gradient, one eval forward whose graph reaches the input only
    assert calls == [(False, False, False), (False, True, True)]
    assert grads_seen == [] and all(p.grad is None for p in model.parameters())
    calls.clear()
    training_step(model, perturb, opt, torch.amp.GradScaler("cpu", enabled=False), x, y, 0.5)
    assert calls == [(False, False, False), (False, True, True), (True, True, False)]
    assert len(grads_seen) == len(list(model.parameters()))  # one backward through the weights
    assert x_adv.is_contiguous() and x_adv.shape == x.shape


def test_channels_last_attack_layout_only_changes_rounding():
    model = _model().eval()
    x, y = _batch(n=30)
    out = {}
    for layout in ("keep", "channels-last"):
        torch.manual_seed(4)
        out[layout] = fsapp.create("perturbation", f"feature-scatter:layout={layout}")(model, x, y)
    assert out["channels-last"].is_contiguous()  # back in the input's layout
    differ = (out["keep"] != out["channels-last"]).float().mean().item()
    assert differ < 0.01  # the random start is the same draw; a rare near-zero gradient may flip sign
    cl = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(4)
    again = fsapp.create("perturbation", "feature-scatter")(model, cl, y)
    assert again.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(again, out["channels-last"])


class _HostReads:
    """Counts Python-level reads of tensor values on the host (``bool``, ``item``, ``tolist``...)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for name in ("__bool__", "item", "tolist", "__float__", "__int__"):
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _original=original, **k):  # noqa: ANN001, ANN202
                self.count += 1
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_no_host_sync_in_the_step_apart_from_the_faithful_solver(monkeypatch):
    model = _model()
    x, y = _batch()
    opt = _sgd(model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ipot = fsapp.create("perturbation", "feature-scatter:solver=ipot")
    training_step(model, ipot, opt, scaler, x, y, 0.5, sync=False)  # momentum buffers exist
    reads = _HostReads(monkeypatch)
    loss, logits, applied = training_step(model, ipot, opt, scaler, x, y, 0.5, sync=False)
    assert reads.count == 0
    sinkhorn = fsapp.create("perturbation", "feature-scatter")
    training_step(model, sinkhorn, opt, scaler, x, y, 0.5, sync=False)
    # the paper's Sinkhorn stops on the host: one read per iteration, nothing else
    assert reads.count == sinkhorn.solver.last_iterations
    monkeypatch.undo()
    assert bool(applied) and torch.isfinite(loss)


def _poisoning(model, x, y):  # noqa: ANN001, ANN202
    return x * float("nan")


@pytest.mark.parametrize("sync", [True, False])
def test_non_finite_loss_skips_the_batch_entirely(sync):
    model = _model()
    x, y = _batch()
    opt = _sgd(model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    perturb = fsapp.create("perturbation", "feature-scatter")
    training_step(model, perturb, opt, scaler, x, y, 0.5, sync=sync)
    before = _state(model)
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    loss, _, applied = training_step(model, _poisoning, opt, scaler, x, y, 0.5, sync=sync)
    assert not torch.isfinite(loss) and not bool(applied)
    after = _state(model)
    for key in before:  # weights and BatchNorm statistics untouched
        assert torch.equal(before[key], after[key]), key
    for p, m in zip(model.parameters(), momentum, strict=True):
        assert torch.equal(opt.state[p]["momentum_buffer"], m)
    assert all(p.grad is None for p in model.parameters())
    # and training goes on as if the batch had never been drawn
    _, _, applied = training_step(model, perturb, opt, scaler, x, y, 0.5, sync=sync)
    assert bool(applied)


def test_deferred_skip_of_a_first_step_leaves_no_momentum():
    model = _model()
    x, y = _batch()
    opt = _sgd(model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    _, _, applied = training_step(model, _poisoning, opt, scaler, x, y, 0.5, sync=False)
    assert not bool(applied)
    for p in model.parameters():  # zeros: the same as no state for SGD without dampening
        assert torch.count_nonzero(opt.state[p]["momentum_buffer"]) == 0
