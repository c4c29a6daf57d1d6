"""Model selection never on test data: the validation split held out of the training set,
best.safetensors chosen on it, the paper's switch (data.validation = 0), resume keeps the split."""

from __future__ import annotations

import json

import pytest
import torch

from fsapp.builtins.datasets import DIGITS_TEST_EVERY, load_digits
from fsapp.checkpoint import load_model_file, read_safetensors
from fsapp.config import from_tables
from fsapp.data import split_train_validation, validation_size
from fsapp.engine import events as ev
from fsapp.engine.rundir import BEST, RunState, summarise
from fsapp.engine.train import train
from fsapp.errors import UsageError


def _digits():
    return load_digits()


def test_sizes_follow_the_documented_rule():
    assert validation_size(50_000, -1) == 1000  # CIFAR: 1,000 images (Rice et al. 2020)
    assert validation_size(73_257, -1) == 1000  # SVHN
    assert validation_size(1437, -1) == 144  # digits: 10%
    assert validation_size(1437, 0) == 0
    assert validation_size(1437, 0.25) == 359
    assert validation_size(1437, 300) == 300
    assert validation_size(10, 50) == 9  # one image is always left for training


def test_split_is_disjoint_from_training_and_test_and_fixed_by_its_seed():
    data = _digits()
    n = len(data.y_train)
    split = split_train_validation(n, -1, seed=0)
    train_idx, val_idx = set(split.train.tolist()), set(split.validation.tolist())
    assert not train_idx & val_idx and len(train_idx) + len(val_idx) == n
    # Back to rows of the digits file: the test split is the rows i % 5 == 0, training the others.
    train_rows = [i for i in range(n + len(data.y_test)) if i % DIGITS_TEST_EVERY]
    val_rows = {train_rows[j] for j in split.validation.tolist()}
    assert len(val_rows) == 144 and not any(r % DIGITS_TEST_EVERY == 0 for r in val_rows)
    assert torch.equal(data.x_train[split.validation][0], data.x_train[int(split.validation[0])])
    assert split.digest() == split_train_validation(n, -1, seed=0).digest()
    assert split.digest() != split_train_validation(n, -1, seed=1).digest()
    limited = split_train_validation(n, -1, seed=0, train_limit=100)
    assert torch.equal(limited.train, split.train[:100]) and torch.equal(limited.validation, split.validation)


def test_bad_values_are_one_line(tmp_path, tiny_digits_config):
    for over, text in (({"data__validation": -0.5}, "data.validation"), ({"data__validation": 12.5}, "whole number"),
                       ({"eval__select": "fgsm"}, "eval.select")):
        with pytest.raises(UsageError, match=text):
            from_tables(tiny_digits_config(tmp_path, **over))


def _evals(events):
    return [e for e in events if isinstance(e, ev.EvalResult)]


def test_live_eval_on_validation_and_best_model_matches_best_epoch(tmp_path, tiny_digits_config):
    tables = tiny_digits_config(tmp_path, data__validation=60, schedule__epochs=3, schedule__milestones=[2])
    events = list(train(tables, run_dir=tmp_path / "r"))
    evals = _evals(events)
    assert [e.split for e in evals] == ["validation"] * 3 and all(e.n == 40 for e in evals)
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())["live_eval"]
    split = split_train_validation(1437, 60, seed=0, train_limit=180)
    assert manifest["split"] == "validation" and manifest["validation_images"] == 60
    assert manifest["train_images"] == 180 and manifest["indices_sha256"] == split.digest()
    # best.safetensors holds the first epoch with the highest validation worst case.
    values = [e.accuracy["worst_case"] for e in evals]
    best_epoch = values.index(max(values))
    _, meta = load_model_file(tmp_path / "r" / BEST, "cpu")
    assert float(meta["selected_value"]) == pytest.approx(max(values)) and meta["selected_split"] == "validation"
    assert int(meta["selected_global_step"]) == evals[best_epoch].global_step
    state = RunState()
    for e in events:
        state.add(e)
    assert state.best_robust == (max(values), best_epoch) and state.best_split == "validation"
    assert summarise(tmp_path / "r", state).best_split == "validation"


def test_paper_switch_evaluates_on_test_and_keeps_no_best_model(tmp_path, tiny_digits_config):
    tables = tiny_digits_config(tmp_path, data__validation=0, schedule__epochs=1, schedule__milestones=[1])
    evals = _evals(train(tables, run_dir=tmp_path / "r"))
    assert [e.split for e in evals] == ["test"]
    assert not (tmp_path / "r" / BEST).exists()
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())["live_eval"]
    assert manifest["split"] == "test" and manifest["validation_images"] == 0 and manifest["train_images"] == 180


def test_resume_keeps_the_split(tmp_path, tiny_digits_config):
    from fsapp.engine.rundir import Control

    tables = tiny_digits_config(tmp_path, data__validation=0.1, schedule__epochs=2)
    full = _evals(train(tables, run_dir=tmp_path / "full"))
    control = Control.new()
    for event in train(tables, run_dir=tmp_path / "part", control=control):
        if isinstance(event, ev.EvalResult):
            control.stop.set()
    state = json.loads(read_safetensors(tmp_path / "part" / "checkpoint.safetensors")[1]["state"])
    assert state["best_select"] == pytest.approx(full[0].accuracy["worst_case"])
    resumed = _evals(train(resume=tmp_path / "part"))
    # The resumed epoch is evaluated on the same validation images with the same results.
    assert [e.split for e in resumed] == ["validation"] and resumed[0].accuracy == full[1].accuracy
    a, _ = load_model_file(tmp_path / "full" / BEST, "cpu")
    b, _ = load_model_file(tmp_path / "part" / BEST, "cpu")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
