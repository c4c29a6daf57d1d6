"""Data on the training device: the uint8 set, crop-and-flip augmentation drawn from the seed
(the same as a per-sample pad-crop-flip), a sample order reproducible from the seed and
resumable, and the host-memory loader path for data sets that do not fit."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fsapp.checkpoint import read_safetensors
from fsapp.data import augment_crop_flip, batch_generator, epoch_order, iterate_batches, steps_per_epoch
from fsapp.engine.train import train


def _images(n: int = 16, c: int = 3, h: int = 8, w: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, 256, (n, c, h, w), generator=g, dtype=torch.uint8)  # no zeros: padding shows


def _per_sample(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """The textbook augmentation, one image at a time, drawing (dy, dx, flip) as documented."""
    n, _, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = []
    for i in range(n):
        padded = F.pad(x[i], (pad, pad, pad, pad))  # zeros
        crop = padded[:, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out.append(crop.flip(-1) if flip[i] else crop)
    return torch.stack(out)


def test_crop_flip_equals_per_sample_pad_crop_flip():
    x = _images()
    for step in range(5):
        got = augment_crop_flip(x, batch_generator(3, 1, step, torch.device("cpu")))
        want = _per_sample(x, batch_generator(3, 1, step, torch.device("cpu")))
        assert got.dtype == torch.uint8 and got.shape == x.shape and got.is_contiguous()
        assert torch.equal(got, want)


def test_crop_uses_four_pixel_zero_padding():
    x = torch.full((400, 1, 8, 8), 7, dtype=torch.uint8)
    out = augment_crop_flip(x, batch_generator(0, 0, 0, torch.device("cpu")))
    zeros = (out == 0).flatten(1).sum(1)
    # a shift by (dy-4, dx-4) leaves |dy-4|*8 + |dx-4|*8 - |dy-4||dx-4| zero pixels: at most 48
    assert zeros.max() == 4 * 8 + 4 * 8 - 16 and (zeros == 0).any()
    assert set(out.unique().tolist()) == {0, 7}
    # every offset 0..8 and both flips appear
    x = torch.arange(64, dtype=torch.uint8).view(1, 1, 8, 8).repeat(600, 1, 1, 1)
    out = augment_crop_flip(x, batch_generator(1, 0, 0, torch.device("cpu")))
    flipped = (out[:, 0, 4, 0] > out[:, 0, 4, 7]) & (out[:, 0, 4, 7] != 0)
    assert flipped.any() and (~flipped).any()


def test_augmentation_is_reproducible_from_the_seed_and_resumable():
    x = _images()
    cpu = torch.device("cpu")
    a = [augment_crop_flip(x, batch_generator(5, e, s, cpu)) for e in range(2) for s in range(4)]
    b = [augment_crop_flip(x, batch_generator(5, e, s, cpu)) for e in range(2) for s in range(4)]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[4])  # steps and epochs differ
    other = augment_crop_flip(x, batch_generator(6, 0, 0, cpu))
    assert not torch.equal(a[0], other)  # and seeds
    # resuming at step 2 of epoch 1 draws what the uninterrupted run drew there
    resumed = augment_crop_flip(x, batch_generator(5, 1, 2, cpu))
    assert torch.equal(resumed, a[4 + 2])


def test_sample_order_is_reproducible_and_resumable():
    n, bs = 103, 10
    first = epoch_order(n, seed=3, epoch=0)
    assert torch.equal(first, epoch_order(n, seed=3, epoch=0))
    assert torch.equal(first.sort().values, torch.arange(n))  # a permutation
    assert not torch.equal(first, epoch_order(n, seed=3, epoch=1))
    assert not torch.equal(first, epoch_order(n, seed=4, epoch=0))
    full = list(iterate_batches(first, bs))
    assert len(full) == steps_per_epoch(n, bs) == 11 and len(full[-1][1]) == 3  # last batch kept
    tail = list(iterate_batches(epoch_order(n, seed=3, epoch=0), bs, start_step=7))
    assert [s for s, _ in tail] == [7, 8, 9, 10]
    for (s1, i1), (s2, i2) in zip(full[7:], tail, strict=True):
        assert s1 == s2 and torch.equal(i1, i2)


def _run(tmp_path, tiny_digits_config, name: str, **over) -> dict[str, torch.Tensor]:
    tables = tiny_digits_config(tmp_path, schedule__epochs=1, eval__n=0, data__augment="crop-flip", **over)
    list(train(tables, run_dir=tmp_path / name))
    return read_safetensors(tmp_path / name / "model.safetensors")[0]


def test_loader_path_trains_exactly_like_the_device_path(tmp_path, tiny_digits_config):
    on = _run(tmp_path, tiny_digits_config, "on")
    off = _run(tmp_path, tiny_digits_config, "off", data__on_device=False)
    for key in on:
        assert torch.equal(on[key], off[key]), key
