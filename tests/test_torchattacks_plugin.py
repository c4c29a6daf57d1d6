"""plugins/fsapp-torchattacks: an installable plugin exposing torchattacks' attacks as ``ta-*`` components."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fsapp
from fsapp.errors import UsageError
from fsapp.plugins import get_registry

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "fsapp-torchattacks"

pytest.importorskip("torchattacks")
if "ta-pgd" not in fsapp.available("attack"):
    pytest.skip("fsapp-torchattacks is not installed (make dev installs it)", allow_module_level=True)

SMALL = {
    "ta-fgsm": "", "ta-ffgsm": "", "ta-bim": "steps=3", "ta-rfgsm": "steps=3", "ta-pgd": "steps=3",
    "ta-eotpgd": "steps=2", "ta-tpgd": "steps=2", "ta-mifgsm": "steps=3", "ta-difgsm": "steps=3",
    "ta-jitter": "steps=3", "ta-spsa": "nb_iter=2,nb_sample=8,max_batch_size=8", "ta-apgd-ce": "steps=5",
    "ta-apgd-dlr": "steps=5", "ta-apgd-t": "steps=5", "ta-fab": "steps=5", "ta-fab-t": "steps=5",
    "ta-square": "n_queries=30", "ta-autoattack": "", "ta-autoattack-fast": "", "ta-pgd-l2": "steps=3",
    "ta-cw-l2": "steps=5", "ta-deepfool": "steps=5",
}
L2 = {"ta-pgd-l2", "ta-cw-l2", "ta-deepfool"}
UNBOUNDED = {"ta-cw-l2", "ta-deepfool"}


pytestmark = pytest.mark.usefixtures("one_thread")


def toy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.rand(12, 3, 4, 4) * 0.5 + 0.25
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_package_metadata_and_makefile():
    project = tomllib.loads((PLUGIN / "pyproject.toml").read_text())["project"]
    assert project["name"] == "fsapp-torchattacks"
    assert any(dep.startswith("torchattacks") for dep in project["dependencies"])
    assert project["entry-points"]["fsapp"] == {"torchattacks": "fsapp_torchattacks"}
    assert "plugins/fsapp-torchattacks" in (ROOT / "Makefile").read_text()
    assert get_registry().get("attack", "ta-pgd").plugin == "fsapp-torchattacks"


def test_listing_does_not_import_torchattacks():
    code = "import sys, fsapp; names = fsapp.available('attack'); print('ta-apgd-t' in names, 'torchattacks' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_every_attack_is_listed():
    names = {n for n in fsapp.available("attack") if n.startswith("ta-")}
    assert names == set(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_each_attack_runs_inside_its_declared_threat_model(name):
    model, x, y = toy()
    spec = f"{name}:{SMALL[name]}" if SMALL[name] else name
    report = fsapp.evaluate(model, x, y, [spec], batch_size=12, defaults={"eps": 0.1})
    run = report.attacks[0]
    assert run.invalid == 0, f"{spec} returned examples outside its threat model"
    assert run.threat.norm == ("L2" if name in L2 else "Linf")
    assert (run.threat.eps is None) == (name in UNBOUNDED)
    assert run.in_worst_case == (name not in L2)
    if name not in L2:
        assert run.threat.eps == 0.1  # the report's eps reached the attack
    if name in ("ta-pgd", "ta-apgd-ce", "ta-autoattack", "ta-deepfool"):
        assert report.accuracy[spec] < 1.0
    if name == "ta-autoattack":
        assert list(report.stage_accuracy(run)) == ["apgd-ce", "apgd-t", "fab-t", "square"]


def test_ta_autoattack_equals_the_native_autoattack():
    """Both run the standard settings on the points still robust; with seed 0 they agree sample by sample."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    x = torch.rand(40, 3, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    report = fsapp.evaluate(model, x, y, ["autoattack:eps=0.01,seed=0", "ta-autoattack:eps=0.01,seed=0"],
                            batch_size=40)
    native, ta = report.attacks
    assert 0 < report.accuracy[native.spec] < 1
    assert torch.equal(native.robust, ta.robust)
    assert report.stage_accuracy(native) == report.stage_accuracy(ta)


def test_bad_parameters_are_one_line_errors():
    with pytest.raises(UsageError, match="steps"):
        fsapp.create("attack", "ta-pgd:steps=0")
    with pytest.raises(UsageError, match="unknown parameter 'alpha'"):
        fsapp.create("attack", "ta-apgd-ce:alpha=1")


def test_gradient_free_model_is_reported_not_crashed():
    torch.manual_seed(0)
    lin = nn.Linear(48, 10)
    model = nn.Sequential(nn.Flatten(), nn.Identity()).eval()
    model.forward = lambda x: lin((x.flatten(1) > 0.5).float())  # type: ignore[method-assign]
    x = torch.rand(8, 3, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    report = fsapp.evaluate(model, x, y, ["ta-deepfool:steps=3", "ta-pgd:steps=2"], defaults={"eps": 0.05})
    ids = {f["id"] for f in report.flags}
    assert {"zero-gradient", "unbounded-attack-fails"} <= ids
    assert report.attacks[0].no_gradient == 8
