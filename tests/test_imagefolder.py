"""The ``imagefolder`` dataset on generated folders of PNGs: classes, labels, sizes, statistics,
one-line errors, and ``fsapp train --set data.name=imagefolder`` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fsapp.builtins.datasets import channel_stats
from fsapp.errors import UsageError
from fsapp.plugins import get_registry

COLOURS = {"cat": (220, 40, 40), "dog": (40, 220, 40), "emu": (40, 40, 220)}


def make_folder(root: Path, per_class: int = 6, test_per_class: int = 3, size: int = 8,
                classes: dict[str, tuple[int, int, int]] = COLOURS, test_classes: list[str] | None = None) -> Path:
    """root/{train,test}/<class>/<i>.png: each class a colour plus seeded noise."""
    rng = np.random.default_rng(0)
    for split, count, names in (("train", per_class, list(classes)), ("test", test_per_class,
                                                                      test_classes or list(classes))):
        for name in names:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(classes[name]) + rng.integers(-30, 30, (size, size, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8), "RGB").save(folder / f"{i:02d}.png")
    return root


def build(root: Path, **params):
    return get_registry().create("dataset", "imagefolder", root=str(root), **params)


def test_classes_labels_shapes_and_statistics(tmp_path):
    root = make_folder(tmp_path / "img")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    (root / "train" / ".hidden").mkdir()  # ignored: hidden
    data = build(root, size=8)
    assert data.classes == ("cat", "dog", "emu") and data.num_classes == 3
    assert data.x_train.shape == (18, 3, 8, 8) and data.x_train.dtype == torch.uint8
    assert data.x_test.shape == (9, 3, 8, 8)
    assert data.y_train.tolist() == [0] * 6 + [1] * 6 + [2] * 6 and data.y_test.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    first = np.asarray(Image.open(root / "train" / "cat" / "00.png")).transpose(2, 0, 1)
    assert torch.equal(data.x_train[0], torch.from_numpy(first.copy()))  # 8x8 at size 8: the bytes themselves
    assert (data.mean, data.std) == channel_stats(data.x_train)
    assert data.mean[0] > data.mean[1] - 0.05 and 0.3 < data.mean[0] < 0.6  # one class of three is red
    again = build(root, size=8)
    assert (again.mean, again.std) == (data.mean, data.std) and data.fingerprint() == again.fingerprint()
    assert not [p for p in root.rglob("*") if p.suffix == ".json"]  # nothing written into the folder


def test_grayscale_resize_and_non_square_images(tmp_path):
    root = make_folder(tmp_path / "img")
    wide = np.zeros((8, 16, 3), dtype=np.uint8)
    wide[:, 4:12] = 255  # the centre 8 columns are white: the centred crop keeps only them
    Image.fromarray(wide, "RGB").save(root / "train" / "emu" / "99.png")
    data = build(root, size=8, channels=1)
    assert data.x_train.shape == (19, 1, 8, 8) and len(data.mean) == 1
    assert int(data.x_train[-1].min()) == 255  # the black sides are cropped away, not squeezed in
    big = build(root, size=16, channels=1)
    assert big.x_train.shape == (19, 1, 16, 16) and big.x_test.shape == (9, 1, 16, 16)
    assert int(big.x_train[-1, :, :, 4:12].min()) == 255


def test_test_labels_follow_the_training_classes(tmp_path):
    root = make_folder(tmp_path / "img", test_classes=["emu"])
    data = build(root, size=8)
    assert data.y_test.tolist() == [2, 2, 2]


@pytest.mark.parametrize("case, message", [
    ("missing", "imagefolder root .* is not a folder"),
    ("no-test", "has no test/ folder"),
    ("one-class", "needs at least 2 class folders .*; found only 'cat'"),
    ("unknown-test-class", "test classes yak have no training folder .*; training classes: cat, dog, emu"),
    ("empty-class", "class folder .*dog holds no images"),
    ("unreadable", "cannot read image .*01.png"),
])
def test_errors_are_one_line(tmp_path, case, message):
    root = tmp_path / "img"
    if case != "missing":
        make_folder(root)
    if case == "no-test":
        for path in sorted((root / "test").rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        (root / "test").rmdir()
    elif case == "one-class":
        for name in ("dog", "emu"):
            for path in (root / "train" / name).iterdir():
                path.unlink()
            (root / "train" / name).rmdir()
    elif case == "unknown-test-class":
        (root / "test" / "yak").mkdir()
    elif case == "empty-class":
        for path in (root / "train" / "dog").iterdir():
            path.unlink()
    elif case == "unreadable":
        (root / "train" / "cat" / "01.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(UsageError, match=message) as info:
        build(root, size=8)
    assert "\n" not in str(info.value)


def test_parameters_are_bounded():
    with pytest.raises(UsageError, match="parameter 'size' = 5000 is out of range; valid: 4..512"):
        build(Path("nowhere"), size=5000)
    with pytest.raises(UsageError, match="channels must be 1 .* or 3"):
        build(Path("nowhere"), channels=2)


def test_fsapp_train_on_an_image_folder_end_to_end(tmp_path):
    root = make_folder(tmp_path / "img")
    cmd = [sys.executable, "-m", "fsapp", "train", "--set", "data.name=imagefolder", "--set", f"data.root={root}",
           "--set", "data.size=8", "--set", "data.batch_size=6", "--set", "model.name=small-cnn",
           "--set", "schedule.epochs=1", "--set", "eval.n=6", "--set", "eval.attacks=['pgd:steps=2']",
           "--set", f"run.runs_dir={tmp_path / 'runs'}", "--set", "run.name=img", "-q"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    run = tmp_path / "runs" / "img"
    assert (run / "model.safetensors").is_file()
    assert f'root = "{root}"' in (run / "config.toml").read_text()
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "EvalResult"]
    manifest = json.loads((run / "manifest.json").read_text())
    held_out = manifest["live_eval"]["validation_images"]  # live evaluation never touches the test split
    assert len(evals) == 1 and evals[0]["split"] == "validation" and evals[0]["n"] == min(6, held_out)
    assert set(evals[0]["accuracy"]) == {"clean", "pgd:steps=2", "worst_case"}
    from fsapp.checkpoint import read_safetensors

    _, meta = read_safetensors(run / "model.safetensors")
    data = build(root, size=8)
    recorded = json.loads(meta["model_params"])
    assert recorded["mean"] == list(data.mean) and recorded["std"] == list(data.std)
    assert recorded["num_classes"] == 3 and meta["dataset"] == "imagefolder"
