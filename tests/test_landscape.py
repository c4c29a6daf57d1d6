"""Loss surfaces (the paper's Figure 4): the grid's centre is the clean loss, a standard model's
loss rises faster along the adversarial direction than along a Rademacher one, the PNG and the
JSON grid are written by ``fsapp eval --landscape``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from fsapp.app.evaljob import EvalRequest, run_eval
from fsapp.checkpoint import load_model_file
from fsapp.engine.landscape import landscape
from fsapp.engine.train import train
from fsapp.errors import UsageError


@pytest.fixture(scope="module")
def standard_model(tmp_path_factory):
    """A standard (clean) small-cnn trained for two epochs on digits."""
    tmp = tmp_path_factory.mktemp("standard")
    tables = {
        "run": {"runs_dir": str(tmp), "seed": 0, "log_every": 50},
        "data": {"name": "digits", "batch_size": 60, "validation": 0},
        "model": {"name": "small-cnn"},
        "method": {"perturbation": "none", "loss": "ce", "label_smoothing": 0.0},
        "optim": {"lr": 0.05},
        "schedule": {"epochs": 3, "milestones": [2]},
        "eval": {"n": 0},
    }
    list(train(tables, run_dir=tmp / "run"))
    return tmp / "run" / "model.safetensors"


def _test_images(n: int = 8):
    from fsapp.builtins.datasets import load_digits
    from fsapp.data import to_unit

    data = load_digits()
    return to_unit(data.x_test[:n]), data.y_test[:n]


def test_centre_is_clean_loss_and_adversarial_direction_rises_faster(standard_model):
    model, _ = load_model_file(standard_model, "cpu")
    x, y = _test_images()
    surfaces, used = landscape(model, x, y, list(range(8)), eps=0.2, grid=5)
    rise_a, rise_r = [], []
    for s in surfaces:
        z = torch.tensor(s.z)
        with torch.no_grad():
            clean = torch.nn.functional.cross_entropy(model.eval()(x[s.index:s.index + 1]), y[s.index:s.index + 1])
        assert s.a[2] == 0.0 and s.b[2] == 0.0
        assert z[2, 2].item() == pytest.approx(clean.item(), rel=1e-5, abs=1e-6)
        rise_a.append(z[4, 2].item() - z[2, 2].item())  # a = +1, b = 0
        rise_r.append(max(z[2, 4].item(), z[2, 0].item()) - z[2, 2].item())  # b = +-1, a = 0
    assert sum(rise_a) / len(rise_a) > 2 * max(sum(rise_r) / len(rise_r), 1e-3)
    d_a, d_r = used[0]
    assert set(d_r.unique().tolist()) == {-1.0, 1.0} and d_a.abs().max() == 1


def test_pgd_direction_and_clip_off(standard_model):
    model, _ = load_model_file(standard_model, "cpu")
    x, y = _test_images(2)
    clipped, _ = landscape(model, x, y, [1], eps=0.5, grid=3, direction="pgd")
    free, _ = landscape(model, x, y, [1], eps=0.5, grid=3, direction="pgd", clip=False)
    assert clipped[0].z[1][1] == pytest.approx(free[0].z[1][1])  # the centre is the image itself
    assert clipped[0].z != free[0].z  # eps 0.5 leaves [0, 1]: clipping changes the corners
    with pytest.raises(UsageError, match="--landscape-direction"):
        landscape(model, x, y, [0], eps=0.1, direction="hessian")


def test_eval_landscape_writes_grid_and_png(standard_model, tmp_path):
    out = tmp_path / "report.json"
    data = run_eval(EvalRequest(standard_model, n=20, out=out, landscape=True, landscape_index=[0, 5], grid=9,
                                compare=[standard_model]))
    saved = json.loads(out.read_text())
    scape = saved["landscape"]
    assert data["attacks"] == [] and scape["clip"] is True and scape["grid"] == 9
    assert len(scape["models"]) == 2 and [s["index"] for s in scape["models"][0]["surfaces"]] == [0, 5]
    surface = scape["models"][0]["surfaces"][1]
    assert len(surface["a"]) == len(surface["b"]) == 9 and [len(r) for r in surface["z"]] == [9] * 9
    assert any("clipped to [0, 1]" in n for n in saved["notes"])
    assert len(scape["png"]) == 2
    with Image.open(scape["png"][0]) as img:
        assert img.size[0] > 1.8 * img.size[1] > 300  # two panels side by side


def test_cli_refuses_a_bad_landscape_request(standard_model):
    proc = subprocess.run([sys.executable, "-m", "fsapp", "eval", str(standard_model), "--landscape", "--index", "99",
                           "--n", "10"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--index 99 is out of range; valid: 0..9" in proc.stderr
    assert "Traceback" not in proc.stderr
