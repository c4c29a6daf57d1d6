"""Datasets as uint8 tensors, batch order from the seed, augmentation on the training device."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Dataset:
    """A whole dataset in memory: uint8 images [N, C, H, W] and int64 labels, plus metadata.

    ``augment`` names the training augmentation its paper setting uses: ``"crop-flip"``
    (random 4-pixel-padded crop and horizontal flip) or ``"none"``.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "none"

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(f"{self.name} {split} images must be uint8 [N, C, H, W]")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"{self.name} {split} labels must be int64 [N]")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return (int(c), int(h), int(w))

    def fingerprint(self) -> str:
        """A short hash of the data, recorded in the run manifest."""
        h = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(t.contiguous().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def select_train(self, idx: Tensor) -> "Dataset":
        """The training samples at ``idx`` (all of them, unchanged, when ``idx`` is 0..N-1)."""
        if len(idx) == len(self.y_train) and bool((idx == torch.arange(len(idx))).all()):
            return self
        return Dataset(self.name, self.x_train[idx], self.y_train[idx], self.x_test, self.y_test,
                       self.classes, self.mean, self.std, self.augment)

    def limit_train(self, n: int) -> "Dataset":
        """The first ``n`` training samples (``n <= 0`` keeps all)."""
        if n <= 0 or n >= len(self.y_train):
            return self
        return Dataset(self.name, self.x_train[:n], self.y_train[:n], self.x_test, self.y_test,
                       self.classes, self.mean, self.std, self.augment)


def to_unit(x: Tensor) -> Tensor:
    """uint8 images to float32 in [0, 1]."""
    return x.float().div_(255.0)


def _mix(*parts: int) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 62) - 1)


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The sample order of an epoch: a permutation that depends only on (seed, epoch)."""
    g = torch.Generator().manual_seed(_mix(seed, epoch, 0x0DE7))
    return torch.randperm(n, generator=g)


def batch_generator(seed: int, epoch: int, step: int, device: torch.device) -> torch.Generator:
    """A generator for one batch's augmentation, so a resumed run draws the same crops."""
    return torch.Generator(device=device).manual_seed(_mix(seed, epoch, step, 0xA06))


def augment_crop_flip(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop with ``pad``-pixel zero padding and random horizontal flip, on x's device."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=x.device)
    flip = torch.rand(n, generator=generator, device=x.device) < 0.5
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # [n, h]
    cols = dx[:, None] + torch.arange(w, device=x.device)[None, :]  # [n, w]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # [n, h, w, c]
    return out.permute(0, 3, 1, 2).contiguous()


def iterate_batches(order: Tensor, batch_size: int, start_step: int = 0):
    """Yield ``(step, indices)`` over an epoch's order; the last batch may be short (no drop)."""
    n = order.numel()
    steps = (n + batch_size - 1) // batch_size
    for step in range(start_step, steps):
        yield step, order[step * batch_size:(step + 1) * batch_size]


def steps_per_epoch(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


AUTO_VALIDATION = -1.0
"""``data.validation`` default: hold out ``min(1000, 10% of the training set)`` images."""
AUTO_VALIDATION_CAP = 1000


def validation_size(n_train: int, validation: float) -> int:
    """How many training images ``data.validation`` holds out of ``n_train``.

    ``-1`` (auto): 1,000 images, or 10% when that is fewer (CIFAR/SVHN: 1,000; digits: 144);
    ``0``: none (live evaluation runs on the test split, as the paper did); a value in (0, 1): that
    fraction; a value >= 1: that many images. At least one image is always left for training.
    """
    if validation == 0:
        return 0
    if validation < 0:
        k = min(AUTO_VALIDATION_CAP, round(0.1 * n_train))
    elif validation < 1:
        k = round(validation * n_train)
    else:
        k = int(validation)
    return max(1, min(k, n_train - 1)) if n_train > 1 else 0


@dataclass(frozen=True)
class TrainValidationSplit:
    """Indices into a dataset's training split: those trained on and those held out."""

    train: Tensor
    validation: Tensor

    def digest(self) -> str:
        """A short hash of both index lists (recorded in the run manifest)."""
        h = hashlib.sha256()
        for t in (self.train, self.validation):
            h.update(t.to(torch.int64).contiguous().numpy().tobytes())
            h.update(b"|")
        return h.hexdigest()[:16]


def split_train_validation(n_train: int, validation: float, seed: int, train_limit: int = 0) -> TrainValidationSplit:
    """Hold ``validation_size(n_train, validation)`` images out of the training split, drawn by a
    permutation seeded from ``seed`` alone (the same for every run seed); the rest, in file order,
    is trained on (its first ``train_limit`` when > 0). Both lists are sorted and disjoint."""
    k = validation_size(n_train, validation)
    g = torch.Generator().manual_seed(_mix(seed, n_train, 0x7A11))
    held = torch.randperm(n_train, generator=g)[:k].sort().values
    keep = torch.ones(n_train, dtype=torch.bool)
    keep[held] = False
    train = torch.arange(n_train)[keep]
    if train_limit > 0:
        train = train[:train_limit]
    return TrainValidationSplit(train, held)
