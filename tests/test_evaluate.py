"""The evaluator: every example checked, fresh eval-mode accuracy, per-sample worst case, threat models,
transfer, determinism, resumable state, sweeps, and live evaluation during training."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fsapp
from fsapp.data import to_unit
from fsapp.engine import events as ev
from fsapp.engine.evaluate import SUITES, evaluate
from fsapp.engine.sweep import parse_sweep, run_sweep, save_png, text_plot
from fsapp.errors import PluginError, UsageError
from fsapp.plugins import get_registry
from fsapp.registry import apply_defaults

ORACLE = """
from dataclasses import dataclass
from typing import ClassVar
import torch
from fsapp import hookimpl

@dataclass
class P:
    eps: float = 0.1
    residue: int = 0
    mode: str = "ok"

@dataclass
class L2P:
    norm: ClassVar[str] = "L2"
    eps: float = 0.5

@dataclass
class Free:
    scale: float = 1.0

def oracle(p):
    # fools the samples whose id (pixel 0, in 1/1000) is residue mod 3, by moving pixel 1 up by eps
    def attack(model, x, y):
        out = x.clone()
        ids = torch.round(x[:, 0, 0, 0] * 1000).long()
        hit = ids % 3 == p.residue
        out[hit, 0, 0, 1] += p.eps
        if p.mode == "nan":
            out[:, 0, 1, 1] = float("nan")
        if p.mode == "shape":
            return out[:1]
        return out
    return attack

@hookimpl
def register_attacks(register):
    register("oracle", oracle, params=P)
    register("oracle-l2", lambda p: (lambda model, x, y: x + p.eps / 2), params=L2P)
    register("oracle-free", lambda p: (lambda model, x, y: torch.ones_like(x)), params=Free)
"""


class PixelOne(nn.Module):
    """Class 1 when pixel (0, 0, 1) > 0.5, else class 0; a BatchNorm whose train mode would change it."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(1)
        self.forwards_in_train_mode = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.forwards_in_train_mode += 1
        v = self.bn(x[:, 0, 0, 1:2] - 0.5)
        return torch.cat([-v, v], 1)


def oracle_data(n: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.full((n, 1, 2, 2), 0.45)
    x[:, 0, 0, 0] = torch.arange(n) / 1000
    return x, torch.zeros(n, dtype=torch.long)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def oracle(install_plugin, fresh_registry, monkeypatch):
    install_plugin("fsapp-oracle", "fsapp_oracle", ORACLE)
    fresh_registry()
    yield
    monkeypatch.undo()  # take the plugin off sys.path before the registry reloads
    fresh_registry()


@pytest.fixture(scope="module")
def digits_model():
    reg = get_registry()
    d = reg.create("dataset", "digits")
    torch.manual_seed(0)
    model = reg.create("model", "mlp:hidden=32,layers=1", num_classes=10, channels=1, size=8,
                       mean=tuple(d.mean), std=tuple(d.std))
    x, y = to_unit(d.x_train), d.y_train
    opt = torch.optim.Adam(model.parameters(), 0.02)
    for _ in range(100):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), to_unit(d.x_test[:120]), d.y_test[:120]


def comparable(report) -> dict:
    data = report.to_dict()
    for key in ("seconds", "timings"):
        data.pop(key)
    for attack in data["attacks"]:
        attack.pop("seconds")
    return data


# --------------------------------------------------------------------------- counting


def test_worst_case_is_per_sample_over_attacks(oracle):
    model = PixelOne()
    model.bn.eval()
    x, y = oracle_data()
    report = evaluate(model, x, y, ["oracle:residue=0", "oracle:residue=1"], batch_size=7)
    ids = torch.arange(30)
    assert torch.equal(report.attacks[0].robust, ids % 3 != 0)
    assert torch.equal(report.attacks[1].robust, ids % 3 != 1)
    assert torch.equal(report.worst_case, ids % 3 == 2)
    assert report.accuracy == {"clean": 1.0, "oracle:residue=0": 20 / 30, "oracle:residue=1": 20 / 30,
                               "worst_case": 10 / 30}
    data = json.loads(json.dumps(report.to_dict()))
    assert data["per_sample"]["worst_case"] == "".join("1" if i % 3 == 2 else "0" for i in range(30))
    assert data["robust_count"]["worst_case"] == 10 and data["threat_model"] == {"norm": "Linf", "eps": 0.1}


def test_accuracy_is_recomputed_in_eval_mode_and_modes_are_restored(oracle):
    model = PixelOne()
    with torch.no_grad():
        model.bn.running_mean.fill_(0.0)
        model.bn.running_var.fill_(1.0)
    model.train()  # a train-mode forward would normalise with the batch statistics
    x, y = oracle_data()
    report = evaluate(model, x, y, ["oracle:residue=0"])
    assert model.training and model.bn.training and model.forwards_in_train_mode == 0
    assert report.accuracy["oracle:residue=0"] == 20 / 30


def test_examples_are_checked_and_projected(oracle):
    model = PixelOne().eval()
    x, y = oracle_data()
    big = evaluate(model, x, y, ["oracle:residue=0,eps=0.3"], defaults={"eps": 0.02})
    # the examples moved 0.3 in a 0.3-ball: valid; not counted in the 0.02 worst case
    assert big.attacks[0].invalid == 0 and not big.attacks[0].in_worst_case
    assert big.accuracy["worst_case"] == 1.0
    nan = evaluate(model, x, y, ["oracle:residue=0,mode=nan"])
    assert nan.attacks[0].invalid == 30 and "invalid-examples" in {f["id"] for f in nan.flags}
    assert nan.accuracy["oracle:residue=0,mode=nan"] == 20 / 30  # NaN pixels reset, the rest kept
    with pytest.raises(PluginError, match="expected a tensor of shape"):
        evaluate(model, x, y, ["oracle:mode=shape"])


def test_threat_models_decide_the_worst_case(oracle):
    model = PixelOne().eval()
    x, y = oracle_data()
    report = evaluate(model, x, y, ["oracle:residue=0", "oracle:residue=1,eps=0.05", "oracle-l2", "oracle-free"])
    runs = {r.spec: r for r in report.attacks}
    assert report.threat.to_dict() == {"norm": "Linf", "eps": 0.1}
    assert runs["oracle:residue=1,eps=0.05"].in_worst_case  # a smaller Linf ball is inside
    assert str(runs["oracle-l2"].threat) == "L2 eps 0.5" and not runs["oracle-l2"].in_worst_case
    assert runs["oracle-free"].threat.eps is None and not runs["oracle-free"].in_worst_case
    assert runs["oracle-l2"].invalid == 0  # x + eps/2 everywhere: L2 norm 0.5 on 4 pixels, inside
    assert report.accuracy["oracle-free"] == 0.0 and "unbounded-attack-fails" not in {f["id"] for f in report.flags}
    # defaults fill eps only for Linf attacks, and never a parameter whose default is derived (None)
    assert apply_defaults("oracle-l2", {"eps": 0.1}) == "oracle-l2"
    assert apply_defaults("fgsm", {"eps": 0.1, "step_size": 0.025}) == "fgsm:eps=0.1"
    assert apply_defaults("pgd:eps=0.2", {"eps": 0.1, "step_size": 0.025}) == "pgd:eps=0.2,step_size=0.025"


def test_only_correct_points_are_attacked_and_progress_is_reported(digits_model):
    model, x, y = digits_model
    seen: list = []
    calls: list = []
    report = evaluate(model, x, y, ["pgd:steps=3"], batch_size=50, on_batch=seen.append,
                      on_progress=lambda *a: calls.append(a), defaults={"eps": 0.05, "step_size": 0.02})
    assert calls[0] == ("pgd:steps=3", 0, 120) and calls[-1] == ("pgd:steps=3", 120, 120)
    final = seen[-1]
    assert (final.done, final.total, final.robust) == (120, 120, int(report.attacks[0].robust.sum()))
    assert not (report.attacks[0].robust & ~report.clean).any()


def test_deterministic_and_leaves_the_callers_rng_alone(digits_model):
    model, x, y = digits_model
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = evaluate(model, x, y, ["pgd:steps=3", "fgsm:random_start=true"], batch_size=50, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    b = evaluate(model, x, y, ["pgd:steps=3", "fgsm:random_start=true"], batch_size=50, seed=5)
    assert comparable(a) == comparable(b)
    # batch results do not depend on what ran before: a subset of attacks gives the same masks
    c = evaluate(model, x, y, ["fgsm:random_start=true"], batch_size=50, seed=5)
    assert torch.equal(c.attacks[0].robust, a.attacks[1].robust)


def test_transfer_from_the_model_itself_equals_white_box(digits_model):
    model, x, y = digits_model
    report = evaluate(model, x, y, ["pgd:steps=5"], source=model, transfer=["pgd:steps=5"],
                      defaults={"eps": 0.05, "step_size": 0.02})
    white, transfer = report.attacks
    assert transfer.transfer and transfer.key == "transfer/pgd:steps=5"
    assert torch.equal(white.robust, transfer.robust)
    assert report.to_dict()["attacks"][1]["access"] == "transfer"
    with pytest.raises(UsageError, match="source model"):
        evaluate(model, x, y, [], transfer=["pgd"])


def test_usage_errors(digits_model):
    model, x, y = digits_model
    with pytest.raises(UsageError, match="listed twice"):
        evaluate(model, x, y, ["pgd", "pgd"])
    with pytest.raises(UsageError, match="unknown attack"):
        evaluate(model, x, y, ["nope"])
    with pytest.raises(UsageError, match="unknown parameter"):
        evaluate(model, x, y, ["pgd:nope=1"])
    assert set(SUITES) == {"default", "paper", "autoattack", "screen", "adaptive"}


# --------------------------------------------------------------------------- resuming


def test_interrupted_evaluation_resumes_to_the_same_report(digits_model, tmp_path):
    model, x, y = digits_model
    attacks = ["pgd:steps=3", "autoattack-fast:steps=3,targets=1,queries=20", "cw:steps=3"]
    kwargs = dict(batch_size=25, seed=1, defaults={"eps": 0.05, "step_size": 0.02})
    full = evaluate(model, x, y, attacks, **kwargs)
    state = tmp_path / "state.json"

    class Stop(Exception):
        pass

    finished = []

    def stop_after_seven(p):
        if p.stage == "" and p.done:
            finished.append((p.key, p.done))
            if len(finished) == 7:
                raise Stop

    with pytest.raises(Stop):
        evaluate(model, x, y, attacks, state=state, on_batch=stop_after_seven, **kwargs)
    saved = json.loads(state.read_text())["records"]
    assert sum(len(v) for k, v in saved.items() if k != "clean") == 7
    attacked = []
    resumed = evaluate(model, x, y, attacks, state=state, resume=True,
                       on_batch=lambda p: attacked.append(p) if not p.resumed and p.done and not p.stage else None,
                       **kwargs)
    assert resumed.resumed_batches == 7 + 5  # seven attack batches and the five clean ones
    assert len(attacked) == 3 * 5 - 7  # only the unfinished batches were attacked
    assert comparable(resumed) == comparable(full)
    # a different evaluation refuses the state; a missing state is a clear error
    with pytest.raises(UsageError, match="different evaluation"):
        evaluate(model, x, y, attacks[:1], state=state, resume=True, **kwargs)
    with pytest.raises(UsageError, match="no interrupted evaluation"):
        evaluate(model, x, y, attacks, state=tmp_path / "none.json", resume=True, **kwargs)


# --------------------------------------------------------------------------- sweeps


def test_parse_sweep():
    key, values = parse_sweep("eps=0:16/255:9")
    assert key == "eps" and len(values) == 9 and values[4] == pytest.approx(8 / 255) and values[-1] == 16 / 255
    assert parse_sweep("steps=1,5,10,20,50,100") == ("steps", [1, 5, 10, 20, 50, 100])
    for bad in ("eps", "eps=", "eps=0:1", "eps=0:1:1", "steps=1.5,2", "eps=-1,2", "eps=a:b:3"):
        with pytest.raises(UsageError):
            parse_sweep(bad)


def test_sweep_curves_text_plot_and_png(digits_model, tmp_path):
    model, x, y = digits_model
    staged = "autoattack-fast:steps=3,targets=1,queries=20"
    sweep = run_sweep(model, x, y, ["pgd:steps=5", "cw:steps=5", staged], "eps", [0.0, 0.05, 0.1],
                      batch_size=60)
    assert sweep["skipped"] == [] and list(sweep["curves"]) == ["pgd:steps=5", "cw:steps=5", staged]
    pgd = sweep["curves"]["pgd:steps=5"]
    assert pgd[0] == sweep["clean"] and pgd[0] >= pgd[1] >= pgd[2]
    assert len(sweep["worst_case"]) == 3
    steps = run_sweep(model, x, y, ["pgd", "autoattack"], "steps", [1, 10], batch_size=60,
                      defaults={"eps": 0.05, "step_size": 0.01})
    assert steps["skipped"] == ["autoattack"] and steps["curves"]["pgd"][0] >= steps["curves"]["pgd"][1]
    plot = text_plot(sweep)
    assert "100% |" in plot and "0% |" in plot and "pgd:steps=5:" in plot
    png = save_png(sweep, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    json.dumps(sweep)


# --------------------------------------------------------------------------- training


def test_live_evaluation_during_training(tmp_path, tiny_digits_config):
    cfg = tiny_digits_config(tmp_path, schedule__epochs=1, eval__n=20, eval__autoattack_n=6)
    events = list(fsapp.train(cfg, run_dir=tmp_path / "run"))
    result = next(e for e in events if isinstance(e, ev.EvalResult))
    assert set(result.accuracy) == {"clean", "pgd:steps=3", "cw:steps=3", "worst_case", "autoattack"}
    assert result.gap == pytest.approx(result.accuracy["pgd:steps=3"] - result.accuracy["cw:steps=3"])
    line = next(json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                if '"EvalResult"' in s)
    assert line["gap"] == result.gap and "autoattack" in line["accuracy"]


# --------------------------------------------------------------------------- bench


def test_eval_bench_figures():
    pytest.importorskip("torchattacks")
    from fsapp.bench.evaluation import eval_bench

    figures = eval_bench(device="cpu", repeats=1, autoattack=False)
    pgd = figures["pgd"]
    assert {"fsapp_pgd_attack", "fsapp_pgd_evaluate", "torchattacks_pgd"} <= set(pgd)
    assert pgd["at_least_as_strong"]  # iterate tracking: never above torchattacks with the same start
    assert 0 < pgd["fsapp_pgd_attack"]["robust_accuracy"] < figures["clean_accuracy"]
    assert pgd["fsapp_pgd_evaluate"]["images_per_sec"] > 0 and isinstance(pgd["at_least_as_fast"], bool)
    cw = figures["cw"]
    assert {"fsapp_cw_attack", "fsapp_cw_evaluate", "torchattacks_cw"} <= set(cw) and cw["at_least_as_strong"]
    assert cw["speedup_evaluate"] > 0 and len(figures["load_average"]) == 3
    json.dumps(figures)


# --------------------------------------------------------------------------- timings


def test_stage_timings_sum_to_the_attack_time(digits_model):
    model, x, y = digits_model
    spec = "autoattack-fast:eps=0.1,steps=40,targets=3,queries=300,fab=true,seed=0"
    report = evaluate(model, x, y, [spec], batch_size=60)
    run = report.attacks[0]
    assert list(run.stage_seconds) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert all(t >= 0 for t in run.stage_seconds.values())
    assert sum(run.stage_seconds.values()) == pytest.approx(run.seconds, rel=0.05)
    assert run.seconds <= report.seconds
    timings = report.to_dict()["timings"]
    assert timings["stages"][spec] == run.stage_seconds
    assert timings["images_per_sec"][spec] == pytest.approx(len(y) / run.seconds)
    json.dumps(timings)


# --------------------------------------------------------------------------- crafting copies


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return get_registry().create("model", "small-cnn:width=8,hidden=16", num_classes=10, channels=1, size=8,
                                 mean=(0.5,), std=(0.5,)).eval()


def test_attacks_craft_on_a_faster_copy_of_the_same_function():
    from fsapp.engine.crafting import TRACE_AFTER, CraftingModel, crafting_model

    model = _small_cnn()
    x = torch.rand(40, 1, 8, 8)
    twin = crafting_model(model, x[:16])
    assert isinstance(twin, CraftingModel) and twin._fast is None
    convs = [m for m in twin.grad_net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in twin.grad_net.modules())  # folded
    with torch.no_grad():
        for _ in range(TRACE_AFTER):
            assert torch.allclose(twin(x), model(x), atol=1e-5)
        assert twin._fast is not None  # the inference trace, built once scoring passes add up
        assert torch.allclose(twin(x), model(x), atol=1e-5)
    xg = x.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(F.cross_entropy(twin(xg), torch.zeros(40, dtype=torch.long)), xg)
    xg = x.clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(F.cross_entropy(model(xg), torch.zeros(40, dtype=torch.long)), xg)
    assert torch.allclose(g1, g2, atol=1e-6)
    assert model.features[0].weight.is_contiguous()  # the evaluated model is left as it was
    assert crafting_model(model, x[:16], "keep") is model
    noisy = nn.Sequential(model, _Noise())
    assert crafting_model(noisy, x[:16]) is noisy  # a randomised forward is attacked as it is
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    assert crafting_model(mlp, x[:16]) is mlp


class _Noise(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + torch.randn_like(z)


def test_layout_does_not_change_what_is_counted():
    model = _small_cnn()
    torch.manual_seed(1)
    x = torch.rand(60, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    spec = "autoattack-fast:eps=0.03,steps=10,targets=2,queries=50,seed=0"
    fast = evaluate(model, x, y, [spec], batch_size=60)
    kept = evaluate(model, x, y, [spec], batch_size=60, layout="keep")
    assert fast.accuracy["clean"] == kept.accuracy["clean"] == 1.0
    assert abs(int(fast.attacks[0].robust.sum()) - int(kept.attacks[0].robust.sum())) <= 1
    with pytest.raises(UsageError, match="layout must be auto or keep"):
        evaluate(model, x, y, [spec], layout="fast")
