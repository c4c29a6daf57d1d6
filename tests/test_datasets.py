"""Built-in datasets: the embedded digits, CIFAR/SVHN in their real on-disk formats, synthetic."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fsapp.builtins.datasets import channel_stats
from fsapp.data import Dataset
from fsapp.errors import UsageError
from fsapp.plugins import load_registry

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "fsapp" / "builtins" / "_data" / "digits.csv.gz"


@pytest.fixture(scope="module")
def reg():
    return load_registry()


def one_line_error(reg, spec: str, **params) -> str:
    with pytest.raises(UsageError) as info:
        reg.create("dataset", spec, **params)
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- digits


def test_all_builtin_datasets_registered(reg):
    for name in ("digits", "cifar10", "cifar100", "svhn", "synthetic"):
        comp = reg.get("dataset", name)
        assert comp.plugin == "fsapp" and comp.description
    assert "index % 5 == 0" in reg.get("dataset", "digits").description


def test_digits_split_sizes_dtypes_ranges(reg):
    d = reg.create("dataset", "digits")
    assert isinstance(d, Dataset) and d.name == "digits"
    assert d.x_train.shape == (1437, 1, 8, 8) and d.x_test.shape == (360, 1, 8, 8)
    assert d.x_train.dtype == d.x_test.dtype == torch.uint8
    assert d.y_train.dtype == d.y_test.dtype == torch.int64
    assert int(d.x_train.min()) == 0 and int(d.x_train.max()) == 255
    assert set(d.y_train.tolist()) == set(d.y_test.tolist()) == set(range(10))
    assert d.classes == tuple("0123456789") and d.num_classes == 10
    assert d.shape == (1, 8, 8) and d.augment == "none"
    assert len(d.mean) == len(d.std) == 1 and 0 < d.mean[0] < 1 and 0 < d.std[0] < 1


def test_digits_split_is_every_fifth_image_in_file_order(reg):
    with gzip.open(DIGITS, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    assert table.shape == (1797, 65)
    pixels = np.rint(table[:, :64] * 255 / 16).astype(np.uint8).reshape(-1, 1, 8, 8)
    labels = table[:, 64].astype(np.int64)
    test = np.arange(1797) % 5 == 0
    d = reg.create("dataset", "digits")
    assert np.array_equal(d.x_test.numpy(), pixels[test])
    assert np.array_equal(d.y_test.numpy(), labels[test])
    assert np.array_equal(d.x_train.numpy(), pixels[~test])
    assert np.array_equal(d.y_train.numpy(), labels[~test])
    x = d.x_train.double() / 255
    assert d.mean[0] == pytest.approx(x.mean().item(), abs=1e-6)
    assert d.std[0] == pytest.approx(x.std(unbiased=False).item(), abs=1e-6)


def test_channel_stats_are_exact_per_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (50, 3, 5, 5), generator=g, dtype=torch.uint8)
    x[:, 2] = 7  # a constant channel gets std 1, never 0
    mean, std = channel_stats(x)
    xf = x.double() / 255
    for c in range(2):
        assert mean[c] == pytest.approx(xf[:, c].mean().item(), abs=1e-6)
        assert std[c] == pytest.approx(xf[:, c].std(unbiased=False).item(), abs=1e-6)
    assert mean[2] == pytest.approx(7 / 255, abs=1e-6) and std[2] == 1.0


def test_listing_does_not_import_torchvision_or_scipy():
    code = ("import sys, fsapp.builtins.datasets, fsapp.builtins.models; "
            "print(sorted(m for m in ('torchvision', 'scipy', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- CIFAR fixtures


def cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def write_pickle(path: Path, obj, protocol: int = 2) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def make_cifar10(root: Path, n: int = 4, n_test: int = 3) -> Path:
    """Tiny CIFAR-10 in the official python layout (str keys, as the py2 files load as latin1)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        write_pickle(folder / f"data_batch_{i}", {
            "batch_label": f"training batch {i} of 5",
            "labels": [(i + j) % 10 for j in range(n)],
            "data": cifar_rows(n, i),
            "filenames": [f"img{i}_{j}.png" for j in range(n)],
        })
    test = {"batch_label": "testing batch 1 of 1", "labels": list(range(n_test)),
            "data": cifar_rows(n_test, 9)}
    write_pickle(folder / "test_batch", test)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    write_pickle(folder / "batches.meta", {"label_names": names, "num_cases_per_batch": n,
                                           "num_vis": 3072})
    return folder


def make_cifar100(root: Path) -> Path:
    """Tiny CIFAR-100 (bytes keys, pickle protocol 4: both key styles must load)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n, seed in (("train", 6, 1), ("test", 2, 2)):
        batch = {b"filenames": [b"x"] * n, b"fine_labels": [99, 0, 5, 7, 1, 2][:n],
                 b"coarse_labels": [0] * n, b"data": cifar_rows(n, seed)}
        write_pickle(folder / name, batch, protocol=4)
    write_pickle(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                                   b"coarse_label_names": [b"s"] * 20}, protocol=4)
    return folder


def test_cifar10_loads_the_real_format(reg, tmp_path):
    make_cifar10(tmp_path)
    d = reg.create("dataset", "cifar10", root=str(tmp_path), check_integrity=False)
    assert d.name == "cifar10" and d.augment == "crop-flip"
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    assert d.x_train.dtype == torch.uint8 and d.y_train.dtype == torch.int64
    assert d.classes[0] == "airplane" and len(d.classes) == 10
    # the row layout is 1024 red, 1024 green, 1024 blue, each row-major: data[c*1024 + h*32 + w]
    row = cifar_rows(4, 2)[1]
    assert np.array_equal(d.x_train[5].numpy(), row.reshape(3, 32, 32))
    assert d.x_train[5, 1, 3, 7].item() == row[1024 + 3 * 32 + 7]
    assert d.y_train[:8].tolist() == [1, 2, 3, 4, 2, 3, 4, 5]
    assert d.y_test.tolist() == [0, 1, 2]
    assert len(d.mean) == 3 and len(d.std) == 3
    assert d.mean[0] == pytest.approx((d.x_train[:, 0].double() / 255).mean().item(), abs=1e-6)
    # the spec-string form works too
    again = reg.create("dataset", f"cifar10:root={tmp_path},check_integrity=false")
    assert torch.equal(again.x_test, d.x_test)


def test_cifar100_loads_fine_labels(reg, tmp_path):
    make_cifar100(tmp_path)
    d = reg.create("dataset", "cifar100", root=str(tmp_path), check_integrity=False)
    assert d.x_train.shape == (6, 3, 32, 32) and d.num_classes == 100
    assert d.y_train.tolist() == [99, 0, 5, 7, 1, 2] and d.classes[99] == "c99"
    assert d.augment == "crop-flip"


def test_cifar_missing_files_say_what_and_where(reg, tmp_path):
    message = one_line_error(reg, "cifar10", root=str(tmp_path))
    assert "CIFAR-10 not found" in message and "cifar-10-batches-py/" in message
    assert str(tmp_path) in message and "cs.toronto.edu" in message and "--download" in message
    message = one_line_error(reg, "cifar100", root=str(tmp_path / "nowhere"))
    assert "cifar-100-python/" in message


def test_cifar_incomplete_names_the_missing_file(reg, tmp_path):
    folder = make_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    message = one_line_error(reg, "cifar10", root=str(tmp_path), check_integrity=False)
    assert "data_batch_3" in message and "missing" in message


def test_cifar_integrity_check_rejects_non_official_files(reg, tmp_path):
    make_cifar10(tmp_path)
    message = one_line_error(reg, "cifar10", root=str(tmp_path))  # check_integrity defaults on
    assert "data_batch_1" in message and "MD5" in message and "check_integrity=false" in message


def test_cifar_truncated_file_is_named(reg, tmp_path):
    folder = make_cifar10(tmp_path)
    path = folder / "data_batch_2"
    path.write_bytes(path.read_bytes()[:500])
    message = one_line_error(reg, "cifar10", root=str(tmp_path), check_integrity=False)
    assert str(path) in message and "truncated or corrupt" in message


def test_cifar_wrong_content_is_named(reg, tmp_path):
    folder = make_cifar10(tmp_path)
    write_pickle(folder / "test_batch", {"labels": [0, 1], "data": np.zeros((3, 3072), np.uint8)})
    message = one_line_error(reg, "cifar10", root=str(tmp_path), check_integrity=False)
    assert "test_batch" in message and "3 images but 2 labels" in message


def py2_batch(rows: bytes, labels: list[int]) -> bytes:
    """A batch exactly as Python 2's cPickle wrote the official files: str keys, str array data."""

    def short(b: bytes) -> bytes:  # SHORT_BINSTRING, a Python 2 str
        return b"U" + bytes([len(b)]) + b

    n = len(rows) // 3072
    shape = b"K" + bytes([n]) + b"M\x00\x0c\x86"  # (n, 3072)
    array = (b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85"
             + short(b"b") + b"\x87R(K\x01" + shape + b"cnumpy\ndtype\n" + short(b"u1")
             + b"K\x00K\x01\x87R(K\x03" + short(b"|")
             + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T"
             + struct.pack("<I", len(rows)) + rows + b"tb")
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return (b"\x80\x02}q\x00(" + short(b"data") + array + short(b"labels") + label_list
            + b"u.")


def test_cifar_reads_python2_pickles(reg, tmp_path):
    folder = make_cifar10(tmp_path)
    rows = cifar_rows(2, 42)
    (folder / "test_batch").write_bytes(py2_batch(rows.tobytes(), [7, 3]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy.core deprecation noise either
        d = reg.create("dataset", "cifar10", root=str(tmp_path), check_integrity=False)
    assert d.y_test.tolist() == [7, 3]
    assert np.array_equal(d.x_test.numpy(), rows.reshape(2, 3, 32, 32))


class _Payload:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (str(self.target),))


def test_cifar_pickles_cannot_run_code(reg, tmp_path):
    folder = make_cifar10(tmp_path)
    target = tmp_path / "pwned"
    write_pickle(folder / "data_batch_4", {"labels": [0], "data": _Payload(target)})
    message = one_line_error(reg, "cifar10", root=str(tmp_path), check_integrity=False)
    assert "data_batch_4" in message and "refusing" in message
    assert not target.exists()


# --------------------------------------------------------------------------- SVHN


def make_svhn(root: Path, n_train: int = 5, n_test: int = 3) -> np.ndarray:
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    x = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x[split] = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)  # labels 1..10, 10 = digit 0
        savemat(root / f"{split}_32x32.mat", {"X": x[split], "y": y})
    return x["train"]


def test_svhn_loads_the_real_format(reg, tmp_path):
    x = make_svhn(tmp_path, n_train=11)
    d = reg.create("dataset", "svhn", root=str(tmp_path), check_integrity=False)
    assert d.x_train.shape == (11, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32)
    assert d.x_train.dtype == torch.uint8 and d.y_train.dtype == torch.int64
    assert d.y_train.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]  # 10 -> 0
    assert d.x_train[4, 2, 5, 9].item() == x[5, 9, 2, 4]  # X is [H, W, C, N]
    assert d.classes == tuple("0123456789") and d.augment == "none" and len(d.mean) == 3


def test_svhn_missing_and_truncated(reg, tmp_path):
    message = one_line_error(reg, "svhn", root=str(tmp_path))
    assert "SVHN not found" in message and "train_32x32.mat" in message and str(tmp_path) in message
    make_svhn(tmp_path)
    path = tmp_path / "test_32x32.mat"
    path.write_bytes(path.read_bytes()[:300])
    message = one_line_error(reg, "svhn", root=str(tmp_path), check_integrity=False)
    assert "test_32x32.mat" in message and "truncated or corrupt" in message
    message = one_line_error(reg, "svhn", root=str(tmp_path))
    assert "train_32x32.mat" in message and "MD5" in message


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_by_seed(reg):
    spec = "synthetic:n_train=40,n_test=20,classes=4,channels=1,size=8"
    a = reg.create("dataset", spec + ",seed=3")
    b = reg.create("dataset", spec + ",seed=3")
    c = reg.create("dataset", spec + ",seed=4")
    assert a.x_train.shape == (40, 1, 8, 8) and a.x_test.shape == (20, 1, 8, 8)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert a.y_train.bincount().tolist() == [10, 10, 10, 10]
    assert a.classes == ("class0", "class1", "class2", "class3") and a.augment == "none"
    default = reg.create("dataset", "synthetic")
    assert default.x_train.shape == (512, 3, 32, 32) and default.x_test.shape == (256, 3, 32, 32)


def test_synthetic_bad_parameters(reg):
    assert "classes" in one_line_error(reg, "synthetic:classes=1")
    assert "noise" in one_line_error(reg, "synthetic:noise=-1")
    assert "valid:" in one_line_error(reg, "digits:root=x")


@pytest.mark.parametrize(("spec", "needle"), [
    ("synthetic:size=100000", "'size' = 100000 is out of range; valid: 1..1024"),
    ("synthetic:classes=1000000", "'classes' = 1000000 is out of range; valid: 2..10000"),
    ("synthetic:n_train=10000000", "'n_train' = 10000000 is out of range; valid: 1..1000000"),
    ("synthetic:seed=-1", "'seed' = -1 is out of range"),
    ("synthetic:n_train=1000000,size=64", "would need about 307 GB to generate (limit 8.59 GB)"),
    ("synthetic:classes=10000,channels=64,size=1024", "GB to generate"),
])
def test_synthetic_sizes_are_bounded_before_generating(reg, spec, needle):
    import time

    t0 = time.perf_counter()
    assert needle in one_line_error(reg, spec)
    assert time.perf_counter() - t0 < 1.0


def test_synthetic_memory_estimate_allows_cifar_sized_sets():
    from fsapp.builtins.datasets import SYNTHETIC_MAX_BYTES, SyntheticParams, synthetic_bytes

    cifar = SyntheticParams(n_train=50_000, n_test=10_000, classes=100, channels=3, size=32)
    assert synthetic_bytes(cifar) < SYNTHETIC_MAX_BYTES
    imagenet_like = SyntheticParams(n_train=1_000, n_test=200, classes=1000, channels=3, size=224)
    assert synthetic_bytes(imagenet_like) < SYNTHETIC_MAX_BYTES
