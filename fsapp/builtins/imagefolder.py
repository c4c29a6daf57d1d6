"""The ``imagefolder`` dataset: your own images in torchvision's ``ImageFolder`` layout.

::

    <root>/train/<class>/*.png   (or .jpg, .jpeg, .bmp, .gif, .ppm, .pgm, .tif, .tiff, .webp)
    <root>/test/<class>/*.png

Classes are the sub-folders of ``train/`` in sorted order, labelled 0..K-1; the test split uses
the same labels (its classes must be a subset of the training classes). Every image is converted
to RGB (``channels = 3``) or grayscale (``channels = 1``) and fitted to ``size`` x ``size``: the
largest centred crop with that aspect ratio, resized bilinearly. Images are read in sorted file
order and held as uint8 tensors like every other dataset.

The normalisation statistics (per-channel mean and std over the training split) are computed
from the decoded bytes each time the set loads (exactly, from byte histograms, so the same folder
always gives the same numbers) and recorded in the model file's metadata; nothing is written into
``root``, which may be read-only or shared.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fsapp.builtins.datasets import channel_stats
from fsapp.data import Dataset
from fsapp.errors import UsageError
from fsapp.hookspecs import Register, hookimpl
from fsapp.registry import ranged

__all__ = ["IMAGE_SUFFIXES", "ImageFolderParams", "load_imagefolder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
MAX_SOURCE_PIXELS = 40_000_000
"""An image whose header declares more pixels than this is refused before it is decoded."""
MAX_BYTES = 8 << 30
"""The decoded dataset (uint8) may hold at most this many bytes."""


@dataclass
class ImageFolderParams:
    """Where the folder is and the image shape the images are fitted to."""

    root: str = "data/images"
    size: int = ranged(32, 4, 512)
    channels: int = ranged(3, 1, 3)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")


def _classes(folder: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise UsageError(f"imagefolder cannot list {folder}: {exc.strerror or exc}") from None


def _images(folder: Path) -> list[Path]:
    try:
        names = sorted(e.name for e in os.scandir(folder)
                       if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_SUFFIXES))
    except OSError as exc:
        raise UsageError(f"imagefolder cannot list {folder}: {exc.strerror or exc}") from None
    return [folder / n for n in names]


def _read(path: Path, size: int, channels: int) -> np.ndarray:
    """One image as uint8 [C, size, size]; a UsageError names a file that cannot be decoded."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            w, h = im.size
            if w * h > MAX_SOURCE_PIXELS:
                raise UsageError(f"imagefolder image {path} is {w}x{h} pixels; at most "
                                 f"{MAX_SOURCE_PIXELS:,} are read")
            im = im.convert("RGB" if channels == 3 else "L")
            im = ImageOps.fit(im, (size, size), method=Image.Resampling.BILINEAR)
            array = np.asarray(im, dtype=np.uint8)
    except UsageError:
        raise
    except Exception as exc:  # PIL's UnidentifiedImageError, truncated files, decompression bombs
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise UsageError(f"imagefolder cannot read image {path} ({why})") from None
    return array.reshape(size, size, channels).transpose(2, 0, 1)


def _split(folder: Path, classes: list[str], labels: dict[str, int], p: ImageFolderParams) -> tuple[Tensor, Tensor]:
    files: list[tuple[Path, int]] = []
    for name in classes:
        images = _images(folder / name)
        if not images:
            raise UsageError(f"imagefolder class folder {folder / name} holds no images "
                             f"({', '.join(IMAGE_SUFFIXES)})")
        files += [(path, labels[name]) for path in images]
    return files_to_tensors(files, p)


def files_to_tensors(files: list[tuple[Path, int]], p: ImageFolderParams) -> tuple[Tensor, Tensor]:
    """Decode ``(path, label)`` pairs into uint8 images [N, C, size, size] and int64 labels."""
    need = len(files) * p.channels * p.size * p.size
    if need > MAX_BYTES:
        raise UsageError(f"imagefolder would hold {len(files)} images of {p.channels}x{p.size}x{p.size} = "
                         f"{need / 2**30:.1f} GiB in memory (limit {MAX_BYTES / 2**30:.0f} GiB); lower data.size")
    x = np.empty((len(files), p.channels, p.size, p.size), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        x[i] = _read(path, p.size, p.channels)
    y = torch.tensor([label for _, label in files], dtype=torch.int64)
    return torch.from_numpy(x), y


def load_imagefolder(p: ImageFolderParams) -> Dataset:
    """Read ``root/train`` and ``root/test`` (see the module docstring)."""
    root = Path(os.path.expanduser(p.root))
    if not root.is_dir():
        raise UsageError(f"imagefolder root {root} is not a folder; expected {root}{os.sep}train{os.sep}CLASS "
                         f"and {root}{os.sep}test{os.sep}CLASS holding images")
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise UsageError(f"imagefolder root {root} has no {split}{os.sep} folder; expected "
                             f"{root}{os.sep}{split}{os.sep}CLASS{os.sep}*.png")
    classes = _classes(root / "train")
    if len(classes) < 2:
        found = f"only '{classes[0]}'" if classes else "none"
        raise UsageError(f"imagefolder needs at least 2 class folders in {root / 'train'}; found {found}")
    test_classes = _classes(root / "test")
    if not test_classes:
        raise UsageError(f"imagefolder test folder {root / 'test'} has no class folders")
    unknown = [c for c in test_classes if c not in classes]
    if unknown:
        raise UsageError(f"imagefolder test classes {', '.join(unknown)} have no training folder in "
                         f"{root / 'train'}; training classes: {', '.join(classes)}")
    labels = {name: i for i, name in enumerate(classes)}
    x_train, y_train = _split(root / "train", classes, labels, p)
    x_test, y_test = _split(root / "test", test_classes, labels, p)
    mean, std = channel_stats(x_train)
    return Dataset("imagefolder", x_train, y_train, x_test, y_test, tuple(classes), mean, std, "none")


@hookimpl
def register_datasets(register: Register) -> None:
    """Register the ``imagefolder`` dataset."""
    register("imagefolder", load_imagefolder, params=ImageFolderParams,
             description="your images: <root>/train/CLASS/* and <root>/test/CLASS/*, fitted to size x size; "
             "classes in sorted order")
