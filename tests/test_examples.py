"""Adversarial examples saved beside an evaluation report: tensors, picture, and the report's names for them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fsapp.app.evaljob import EvalRequest, run_eval
from fsapp.app.examples import (
    choose_samples,
    grid,
    load_examples,
    strongest_attack,
    upscale_factor,
    write_png,
)
from fsapp.errors import UsageError


def tiny_model_file(path: Path) -> Path:
    from fsapp.checkpoint import model_metadata, save_model
    from fsapp.plugins import get_registry

    torch.manual_seed(0)
    params = {"num_classes": 10, "channels": 1, "size": 8, "mean": [0.5], "std": [0.5], "width": 8, "hidden": 16}
    model = get_registry().create("model", "small-cnn", **params)
    meta = model_metadata("small-cnn", params, dataset="digits", method="test", extra={"eval_eps": 0.2})
    return save_model(path, model, meta)


def test_an_evaluation_saves_examples_beside_its_report(tmp_path):
    from PIL import Image

    model = tiny_model_file(tmp_path / "m" / "model.safetensors")
    out = tmp_path / "m" / "eval" / "r.json"
    data = run_eval(EvalRequest(model=model, attacks=["fgsm", "pgd:steps=3"], n=20, batch_size=10, device="cpu",
                                out=out))
    assert data is not None
    saved = json.loads(out.read_text())
    assert saved["examples"]["file"] == "r-examples.safetensors" and saved["examples"]["png"] == "r-examples.png"
    assert saved["examples"]["attack"] == strongest_attack(saved)
    t = load_examples(out.with_name("r-examples.safetensors"))
    assert t["clean"].shape == t["adversarial"].shape == (8, 1, 8, 8)
    assert t["clean"].dtype == t["adversarial"].dtype == torch.uint8
    assert t["labels"].dtype == torch.int64 and t["labels"].shape == (8,)
    # the labels are those of the evaluated samples the indices name, and the clean pixels are theirs
    from fsapp.app.evaljob import load_test_split
    from fsapp.checkpoint import load_model_file_digest

    _, meta, _ = load_model_file_digest(model, "cpu")
    x, y = load_test_split(meta, 20, 0, None, model)
    assert torch.equal(t["labels"], y[t["indices"]])
    assert x.dtype == torch.uint8 and torch.equal(t["clean"], x[t["indices"]])
    # inside the ball (eps 0.2, after uint8 rounding)
    assert (t["adversarial"].int() - t["clean"].int()).abs().max() <= round(0.2 * 255) + 1
    assert saved["examples"]["fooled"] == int((t["adv_pred"] != t["labels"]).sum())
    with Image.open(out.with_name("r-examples.png")) as img:
        scale = upscale_factor(2 * 8 + 3)  # the grid: two rows of 8-pixel images and three 1-pixel gaps
        assert img.size == ((8 * 8 + 9) * scale, (2 * 8 + 3) * scale) and img.mode == "L"


def test_samples_fooled_by_the_strongest_attack_come_first():
    per_sample = {"clean": "1111011", "pgd": "1010011", "cw": "0111011", "worst_case": "0010011"}
    assert choose_samples(per_sample, "pgd", 4) == [1, 3, 0, 2]
    assert choose_samples(per_sample, "pgd", 9) == [1, 3, 0, 2, 5, 6, 4]
    data = {"accuracy": {"pgd": 0.4, "cw": 0.3, "transfer/pgd": 0.1},
            "attacks": [{"key": "pgd", "access": "gradient"}, {"key": "cw", "access": "gradient"},
                        {"key": "transfer/pgd", "access": "transfer"}]}
    assert strongest_attack(data) == "cw"
    assert strongest_attack({"accuracy": {}, "attacks": []}) is None


def test_rgb_png_has_the_grid_size(tmp_path):
    from PIL import Image

    clean = torch.zeros(3, 3, 4, 4, dtype=torch.uint8)
    adv = torch.full((3, 3, 4, 4), 200, dtype=torch.uint8)
    image = grid(clean, adv)
    assert image.shape == (3, 2 * 4 + 3, 3 * 4 + 4)
    path = write_png(tmp_path / "g.png", image, scale=2)
    with Image.open(path) as img:
        assert img.mode == "RGB" and img.size == (2 * 16, 2 * 11)
        assert img.getpixel((2, 2)) == (0, 0, 0) and img.getpixel((2, 2 * 6)) == (200, 200, 200)
        assert img.getpixel((0, 0)) == (255, 255, 255)


def test_a_file_that_is_not_an_examples_file_is_one_line(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"clean": torch.zeros(2, 1, 4, 4)}, str(path))
    with pytest.raises(UsageError, match="lacks tensor"):
        load_examples(path)
    path.write_bytes(b"not safetensors at all")
    with pytest.raises(UsageError, match="not a safetensors file"):
        load_examples(path)
