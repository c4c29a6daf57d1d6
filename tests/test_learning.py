"""Demo-scale learning: Feature Scattering on digits is far more robust than standard training."""

from __future__ import annotations

import pytest
import torch

import fsapp

ATTACK = "pgd:eps=0.2,step_size=0.05,steps=20"


def _train_and_attack(tmp_path, method: dict) -> dict[str, float]:
    tables = {
        "run": {"runs_dir": str(tmp_path), "seed": 0},
        "schedule": {"epochs": 6, "milestones": [4, 5]},
        "eval": {"n": 0},
        "method": {"perturbation": "feature-scatter", "epsilon": 0.2, "step_size": 0.2, **method},
    }
    events = list(fsapp.train(tables))
    model = fsapp.load_model(events[-1].model_path)
    data = fsapp.create("dataset", "digits")
    torch.manual_seed(0)
    return fsapp.evaluate(model, data.x_test, data.y_test, attacks=[ATTACK]).accuracy


@pytest.mark.slow
def test_feature_scattering_is_robust_where_standard_training_is_not(tmp_path):
    fs = _train_and_attack(tmp_path / "fs", {})
    standard = _train_and_attack(tmp_path / "std", {"perturbation": "none", "loss": "ce"})
    print(f"\nfeature-scatter: {fs}\nstandard: {standard}")
    assert fs["clean"] > 0.9 and standard["clean"] > 0.9
    assert standard[ATTACK] < 0.15
    assert fs[ATTACK] > standard[ATTACK] + 0.25
