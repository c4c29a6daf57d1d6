"""Built-in datasets: ``digits`` (embedded), ``cifar10``, ``cifar100``, ``svhn``, ``synthetic``.

``digits`` is the UCI handwritten digits set shipped inside fsapp (``_data/digits.csv.gz``, see
``_data/README.md``): 1797 grayscale 8x8 images, pixel values 0..16 stored as bytes
round(v * 255 / 16). Its split is fixed: the **test** split is the images whose 0-based index in
the file is a multiple of 5 (360 images), the **train** split is all the others (1437), both in
file order.

``cifar10``, ``cifar100`` and ``svhn`` read the official files in torchvision's on-disk layout
(``<root>/cifar-10-batches-py/``, ``<root>/cifar-100-python/``, ``<root>/{train,test}_32x32.mat``),
verify their MD5 sums unless ``check_integrity=false`` and download them with torchvision when
``download=true``. The CIFAR batches are Python pickles; they are read with an unpickler that only
accepts plain containers and numpy arrays, so a doctored file cannot run code.

Nothing heavy is imported until a dataset is built (torchvision and scipy load in the factories).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fsapp.data import Dataset
from fsapp.errors import UsageError
from fsapp.hookspecs import Register, hookimpl
from fsapp.registry import NoParams, ranged

__all__ = [
    "DIGITS_TEST_EVERY",
    "FileParams",
    "SyntheticParams",
    "channel_stats",
    "load_cifar",
    "load_digits",
    "load_svhn",
    "make_synthetic",
    "synthetic_bytes",
]

DIGITS_TEST_EVERY = 5
"""Digits split: the image at file index i is a test image iff ``i % DIGITS_TEST_EVERY == 0``."""


def channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and (population) std of uint8 images [N, C, H, W], in [0, 1] units.

    Computed from 256-bin histograms, so it needs no float copy of the data. A channel that is
    constant gets std 1.0 rather than 0 (so normalising never divides by zero).
    """
    values = torch.arange(256, dtype=torch.float64)
    means: list[float] = []
    stds: list[float] = []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = counts.sum().item()
        if n == 0:
            means.append(0.5)
            stds.append(1.0)
            continue
        mean = (counts * values).sum().item() / n
        var = max((counts * values * values).sum().item() / n - mean * mean, 0.0)
        std = math.sqrt(var) / 255.0
        means.append(round(mean / 255.0, 6))
        stds.append(round(std, 6) if std > 1e-6 else 1.0)
    return tuple(means), tuple(stds)


def _make(name: str, x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor,
          classes: tuple[str, ...], augment: str) -> Dataset:
    mean, std = channel_stats(x_train)
    return Dataset(name, x_train.contiguous(), y_train, x_test.contiguous(), y_test, classes,
                   mean, std, augment)


# --------------------------------------------------------------------------- digits


def load_digits() -> Dataset:
    """The embedded UCI digits: train 1437 / test 360 (test = file index % 5 == 0)."""
    raw = resources.files("fsapp.builtins").joinpath("_data/digits.csv.gz").read_bytes()
    table = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",", dtype=np.float64, ndmin=2)
    pixels = np.rint(table[:, :64] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    x = torch.from_numpy(pixels.reshape(-1, 1, 8, 8).copy())
    y = torch.from_numpy(table[:, 64].astype(np.int64))
    test = torch.arange(len(y)) % DIGITS_TEST_EVERY == 0
    return _make("digits", x[~test], y[~test], x[test], y[test],
                 tuple(str(d) for d in range(10)), "none")


# --------------------------------------------------------------------------- files on disk


@dataclass
class FileParams:
    """Where a dataset's official files live and how they are checked."""

    root: str = "data"
    download: bool = False
    check_integrity: bool = True


_PAGES = {
    "cifar10": ("CIFAR-10", "https://www.cs.toronto.edu/~kriz/cifar.html"),
    "cifar100": ("CIFAR-100", "https://www.cs.toronto.edu/~kriz/cifar.html"),
    "svhn": ("SVHN", "http://ufldl.stanford.edu/housenumbers/"),
}
_DOWNLOAD_HINT = "pass --download (download=true) where the network allows"


def _import_torchvision(title: str) -> Any:
    try:
        import torchvision.datasets
    except ImportError as exc:
        msg = f"the {title} loader needs torchvision: pip install torchvision ({exc})"
        raise UsageError(msg) from None
    return torchvision.datasets


def _file_problem(path: Path, md5: str | None) -> str | None:
    """``None`` if the file is usable, else ``"missing"`` or ``"corrupted"`` (MD5 mismatch)."""
    if not path.is_file():
        return "missing"
    if md5 is not None:
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != md5:
            return "corrupted"
    return None


def _first_problem(files: list[tuple[Path, str]], verify: bool) -> tuple[Path, str] | None:
    for path, md5 in files:
        problem = _file_problem(path, md5 if verify else None)
        if problem:
            return path, problem
    return None


def _raise_problem(name: str, root: Path, what: str, found: tuple[Path, str], any_present: bool,
                   download: bool) -> None:
    title, page = _PAGES[name]
    path, problem = found
    if download:
        how = "the download did not produce it; check the network and the disk, or put it there"
    else:
        how = _DOWNLOAD_HINT
    if problem == "corrupted":
        raise UsageError(
            f"{title} file {path} is corrupted (MD5 mismatch): replace it from {page}"
            f" or delete it and {_DOWNLOAD_HINT}; check_integrity=false skips the check for"
            " custom files"
        )
    if not any_present:
        raise UsageError(
            f"{title} not found under {root}{os.sep}: put {what} there (from {page}) or {how}"
        )
    raise UsageError(f"{title} incomplete: {path} is missing; put {what} under {root}{os.sep}"
                     f" (from {page}) or {how}")


def _download_failed(name: str, url: str, exc: Exception, root: Path, what: str) -> UsageError:
    title, page = _PAGES[name]
    reason = " ".join(f"{type(exc).__name__}: {exc}".split())
    return UsageError(f"{title} download from {url} failed ({reason}); put {what} under"
                      f" {root}{os.sep} by hand (from {page})")


def _corrupt(title: str, path: Path, why: str) -> UsageError:
    why = " ".join(why.split())[:200]  # one line, whatever the underlying error said
    return UsageError(f"{title} file {path} is truncated or corrupt ({why}); replace it")


class _SafeUnpickler(pickle.Unpickler):
    """Loads plain containers and numpy arrays only (the contents of the CIFAR batch files)."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core"):  # numpy 2 moved numpy.core to numpy._core
            try:
                return super().find_class("numpy._core" + module[len("numpy.core"):], name)
            except (ImportError, AttributeError):
                pass
        return super().find_class(module, name)


def _read_pickle(title: str, path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="latin1").load()
    except OSError as exc:
        raise UsageError(f"{title} file {path} cannot be read: {exc.strerror or exc}") from None
    except Exception as exc:  # truncated or foreign data: EOFError, UnpicklingError, ...
        raise _corrupt(title, path, f"{type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise _corrupt(title, path, f"expected a dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _read_cifar_batches(title: str, folder: Path, names: list[str],
                        num_classes: int) -> tuple[Tensor, Tensor]:
    xs, ys = [], []
    for name in names:
        path = folder / name
        entry = _read_pickle(title, path)
        data = entry.get("data")
        labels = entry.get("labels", entry.get("fine_labels"))
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
                or data.shape[1] != 3 * 32 * 32:
            raise _corrupt(title, path, "'data' is not a uint8 array [N, 3072]")
        try:
            y = np.asarray(labels, dtype=np.int64).reshape(-1)
        except (TypeError, ValueError):
            raise _corrupt(title, path, "labels are not integers") from None
        if len(y) != len(data):
            raise _corrupt(title, path, f"{len(data)} images but {len(y)} labels")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise _corrupt(title, path, f"labels outside 0..{num_classes - 1}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(y)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def load_cifar(name: str, p: FileParams) -> Dataset:
    """CIFAR-10 or CIFAR-100 (fine labels) in torchvision's layout under ``root``."""
    title, _ = _PAGES[name]
    tvd = _import_torchvision(title)
    tv = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
    root = Path(os.path.expanduser(p.root))
    folder = root / tv.base_folder
    files = [(folder / f, md5) for f, md5 in tv.train_list + tv.test_list]
    files.append((folder / tv.meta["filename"], tv.meta["md5"]))
    found = _first_problem(files, p.check_integrity)
    if found and p.download:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(tv.url, str(root), filename=tv.filename, md5=tv.tgz_md5)
        except Exception as exc:
            raise _download_failed(name, tv.url, exc, root, f"{tv.base_folder}/") from None
        found = _first_problem(files, p.check_integrity)
    if found:
        _raise_problem(name, root, f"{tv.base_folder}/", found, folder.is_dir(), p.download)
    meta_path = folder / tv.meta["filename"]
    names = _read_pickle(title, meta_path).get(tv.meta["key"])
    if not isinstance(names, (list, tuple)) or not names:
        raise _corrupt(title, meta_path, f"no '{tv.meta['key']}' list")
    classes = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    k = len(classes)
    x_train, y_train = _read_cifar_batches(title, folder, [f for f, _ in tv.train_list], k)
    x_test, y_test = _read_cifar_batches(title, folder, [f for f, _ in tv.test_list], k)
    return _make(name, x_train, y_train, x_test, y_test, classes, "crop-flip")


def load_svhn(p: FileParams) -> Dataset:
    """SVHN ``train`` and ``test`` (not ``extra``) from ``<root>/{train,test}_32x32.mat``."""
    title, _ = _PAGES["svhn"]
    try:
        import scipy.io  # noqa: F401  (torchvision's SVHN reads .mat files with it)
    except ImportError:
        raise UsageError("the svhn dataset reads .mat files with scipy: pip install scipy") \
            from None
    tvd = _import_torchvision(title)
    root = Path(os.path.expanduser(p.root))

    class _SVHN(tvd.SVHN):  # type: ignore[misc, valid-type]
        # Files are verified (or only found, with check_integrity=false) before loading.
        def _check_integrity(self) -> bool:
            return os.path.isfile(os.path.join(self.root, self.filename))

    splits = {s: tvd.SVHN.split_list[s] for s in ("train", "test")}
    files = [(root / fname, md5) for _, fname, md5 in splits.values()]
    found = _first_problem(files, p.check_integrity)
    if found and p.download:
        from torchvision.datasets.utils import download_url

        for url, fname, md5 in splits.values():
            if _file_problem(root / fname, md5 if p.check_integrity else None):
                try:
                    download_url(url, str(root), fname, md5)
                except Exception as exc:
                    raise _download_failed("svhn", url, exc, root, fname) from None
        found = _first_problem(files, p.check_integrity)
    if found:
        present = any(path.is_file() for path, _ in files)
        what = "train_32x32.mat and test_32x32.mat"
        _raise_problem("svhn", root, what, found, present, p.download)
    tensors: list[Tensor] = []
    for split, (_, fname, _) in splits.items():
        path = root / fname
        try:
            ds = _SVHN(str(root), split=split)
            data, labels = np.asarray(ds.data), np.asarray(ds.labels, dtype=np.int64).reshape(-1)
        except Exception as exc:  # scipy's MatReadError, ValueError, KeyError 'X', ...
            raise _corrupt(title, path, f"{type(exc).__name__}: {exc}") from None
        if data.dtype != np.uint8 or data.ndim != 4 or data.shape[1] != 3:
            raise _corrupt(title, path, "'X' is not a uint8 array [32, 32, 3, N]")
        if len(labels) != len(data):
            raise _corrupt(title, path, f"{len(data)} images but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() > 9):
            raise _corrupt(title, path, "labels outside 0..9")
        tensors += [torch.from_numpy(np.ascontiguousarray(data)), torch.from_numpy(labels)]
    x_train, y_train, x_test, y_test = tensors
    return _make("svhn", x_train, y_train, x_test, y_test, tuple(str(d) for d in range(10)), "none")


# --------------------------------------------------------------------------- synthetic


SYNTHETIC_MAX_BYTES = 8 << 30
"""The most memory generating a synthetic set may take (the same limit on every machine)."""


@dataclass
class SyntheticParams:
    """A seeded, learnable toy set: class prototypes plus Gaussian pixel noise."""

    n_train: int = ranged(512, 1, 1_000_000)
    n_test: int = ranged(256, 1, 1_000_000)
    classes: int = ranged(10, 2, 10_000)
    channels: int = ranged(3, 1, 64)
    size: int = ranged(32, 1, 1024)
    seed: int = ranged(0, 0, 2**63 - 1)
    noise: float = ranged(0.15, 0.0, 1.0)

    def __post_init__(self) -> None:
        for key in ("n_train", "n_test", "channels", "size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.classes < 2:
            raise ValueError(f"classes must be at least 2, got {self.classes}")
        if not 0.0 <= self.noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {self.noise}")
        need = synthetic_bytes(self)
        if need > SYNTHETIC_MAX_BYTES:
            raise ValueError(f"n_train={self.n_train}, n_test={self.n_test}, classes={self.classes}, "
                             f"channels={self.channels}, size={self.size} would need about {need / 1e9:.3g} GB "
                             f"to generate (limit {SYNTHETIC_MAX_BYTES / 1e9:.3g} GB); make the set smaller")


def synthetic_bytes(p: SyntheticParams) -> int:
    """Peak memory of :func:`make_synthetic`: float64 prototypes, one split's float64 working
    copies (noise, picked prototypes, result: 24 bytes a pixel) and both splits' uint8 images."""
    pixels = p.channels * p.size * p.size
    return 16 * p.classes * pixels + 24 * max(p.n_train, p.n_test) * pixels + (p.n_train + p.n_test) * pixels


def make_synthetic(p: SyntheticParams) -> Dataset:
    """Each class has a fixed random smooth pattern; an image is its class pattern plus noise.

    Everything is drawn from one generator seeded with ``seed``, in a fixed order, so the same
    parameters give the same bytes on every machine. Labels cycle through the classes and are
    then shuffled, so every class appears (almost) equally often in both splits.
    """
    g = torch.Generator().manual_seed(p.seed)
    coarse = max(1, p.size // 4)
    protos = torch.rand(p.classes, p.channels, coarse, coarse, generator=g, dtype=torch.float64)
    protos = torch.nn.functional.interpolate(protos, size=(p.size, p.size), mode="bilinear",
                                             align_corners=False)
    protos = 0.15 + 0.7 * protos  # keep room for the noise inside [0, 1]

    def draw(n: int) -> tuple[Tensor, Tensor]:
        y = (torch.arange(n) % p.classes)[torch.randperm(n, generator=g)]
        noise = torch.randn(n, p.channels, p.size, p.size, generator=g, dtype=torch.float64)
        x = (protos[y] + p.noise * noise).clamp(0.0, 1.0)
        return torch.round(x * 255.0).to(torch.uint8), y.to(torch.int64)

    x_train, y_train = draw(p.n_train)
    x_test, y_test = draw(p.n_test)
    classes = tuple(f"class{i}" for i in range(p.classes))
    return _make("synthetic", x_train, y_train, x_test, y_test, classes, "none")


# --------------------------------------------------------------------------- registration


@hookimpl
def register_datasets(register: Register) -> None:
    """Register the built-in datasets."""
    register(
        "digits",
        lambda _params: load_digits(),
        params=NoParams,
        description="embedded UCI handwritten digits, 8x8 gray; test = file index % 5 == 0 "
        "(360), train = the rest (1437)",
    )
    register(
        "cifar10",
        lambda params: load_cifar("cifar10", params),
        params=FileParams,
        description="CIFAR-10, 32x32 color, 50000/10000, from <root>/cifar-10-batches-py",
    )
    register(
        "cifar100",
        lambda params: load_cifar("cifar100", params),
        params=FileParams,
        description="CIFAR-100 (fine labels), 32x32 color, 50000/10000, "
        "from <root>/cifar-100-python",
    )
    register(
        "svhn",
        load_svhn,
        params=FileParams,
        description="SVHN train/test (no extra), 32x32 color, from <root>/{train,test}_32x32.mat",
    )
    register(
        "synthetic",
        make_synthetic,
        params=SyntheticParams,
        description="seeded learnable toy images: a random pattern per class plus noise",
    )
