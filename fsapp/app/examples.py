"""A few adversarial examples saved beside an evaluation report, as tensors and as a picture.

The evaluator keeps per-sample masks, not the adversarial inputs themselves, so the examples are
made again: the report's strongest white-box attack inside its threat model (the lowest accuracy)
is re-run on ``k`` chosen samples, seeded from the report's seed and the attack's name. Chosen
first are samples that were correct clean and fooled by that attack in the report, then ones
fooled by any attack, then any correct ones, then any. A re-run on a smaller batch may not fool
every chosen sample again (random starts differ); the saved predictions are those of the saved
examples, so the file never claims more than it shows.

Files, beside ``<stem>.json``:

- ``<stem>-examples.safetensors``: ``clean`` and ``adversarial`` (uint8, k x C x H x W),
  ``labels``, ``clean_pred``, ``adv_pred`` and ``indices`` (int64, positions in the evaluated
  sample order), with the attack spec, eps and seed in the metadata. No pickle.
- ``<stem>-examples.png``: clean images above their adversarial examples, upscaled so that 8x8
  digits are visible (written by a small PNG encoder here: no imaging library needed).
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fsapp.errors import FsappError, UsageError

K_EXAMPLES = 8
"""How many samples are saved with a report."""
TENSOR_NAMES = ("clean", "adversarial", "labels", "clean_pred", "adv_pred", "indices")
MAX_EXAMPLE_BYTES = 16 << 20


def example_paths(report: Path) -> tuple[Path, Path]:
    """The tensors file and the PNG beside ``report``."""
    return (report.with_name(f"{report.stem}-examples.safetensors"),
            report.with_name(f"{report.stem}-examples.png"))


def strongest_attack(data: dict[str, Any]) -> str | None:
    """The key of the white-box attack inside the threat model with the lowest accuracy."""
    acc = data.get("accuracy") or {}
    usable = [a for a in data.get("attacks") or [] if a.get("access") != "transfer" and a.get("in_worst_case", True)
              and isinstance(acc.get(a.get("key")), (int, float))]
    if not usable:
        return None
    return str(min(usable, key=lambda a: acc[a["key"]])["key"])


def choose_samples(per_sample: dict[str, str], attack: str, k: int) -> list[int]:
    """``k`` sample positions: fooled by ``attack`` after being right clean, then fooled by any
    attack, then right clean, then any (each group in sample order)."""
    def mask(key: str) -> list[bool]:
        return [c == "1" for c in per_sample.get(key, "")]

    clean, hit, worst = mask("clean"), mask(attack), mask("worst_case")
    n = len(clean)
    groups = [
        [i for i in range(n) if clean[i] and i < len(hit) and not hit[i]],
        [i for i in range(n) if clean[i] and i < len(worst) and not worst[i]],
        [i for i in range(n) if clean[i]],
        list(range(n)),
    ]
    chosen: list[int] = []
    for group in groups:
        chosen += [i for i in group if i not in chosen][: k - len(chosen)]
    return chosen


def craft(model: torch.nn.Module, x: Tensor, y: Tensor, spec: str, defaults: dict[str, Any], seed: int) -> Tensor:
    """Adversarial examples of ``spec`` for (x, y), checked into the attack's threat model and
    [0, 1]; the caller's random state is left as it was."""
    from fsapp.adversary import preserved_state, threat_of
    from fsapp.engine.checks import check_examples
    from fsapp.plugins import get_registry
    from fsapp.registry import apply_defaults, make_params, parse_spec

    parsed = parse_spec(apply_defaults(spec, defaults))
    component = get_registry().get("attack", parsed.name)
    params = make_params(component, parsed.params)
    attack = component.factory(params)
    threat = threat_of(attack, component.params, dataclasses.asdict(params))
    device = x.device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        value = zlib.crc32(f"{seed}/examples/{parsed.name}".encode()) & 0x7FFFFFFF
        torch.manual_seed(value)
        with preserved_state(model):
            x_adv = attack(model, x.clone(), y.clone())
    x_adv, _ = check_examples(x, x_adv.detach(), threat)
    return x_adv


def to_uint8(x: Tensor) -> Tensor:
    """Images in [0, 1] as uint8 0..255 on the CPU."""
    return (x.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)


def save_examples(model: torch.nn.Module, x: Tensor, y: Tensor, data: dict[str, Any], report: Path,
                  defaults: dict[str, Any], k: int = K_EXAMPLES) -> None:
    """Save ``k`` clean/adversarial pairs beside ``report`` and name them in ``data["examples"]``;
    what cannot be done is one line in ``data["notes"]`` (the report is never lost for it)."""
    from fsapp.adversary import predict

    notes = data.setdefault("notes", [])
    attack = strongest_attack(data)
    per_sample = data.get("per_sample") or {}
    if attack is None or not per_sample.get("clean"):
        notes.append("no adversarial examples saved: the report has no white-box attack to make them with")
        return
    idx = choose_samples(per_sample, attack, k)
    device = next(iter(model.parameters()), torch.empty(0)).device
    xs = x[idx].to(device)
    xs = xs.float() / 255.0 if xs.dtype == torch.uint8 else xs
    ys = y[idx].to(device)
    tensors_path, png_path = example_paths(report)
    try:
        adv = craft(model, xs, ys, attack, defaults, int(data.get("seed") or 0))
        tensors = {"clean": to_uint8(xs), "adversarial": to_uint8(adv), "labels": ys.cpu().long(),
                   "clean_pred": predict(model, xs).cpu().long(), "adv_pred": predict(model, adv).cpu().long(),
                   "indices": torch.tensor(idx, dtype=torch.long)}
        write_tensors(tensors_path, tensors, {"attack": attack, "seed": str(data.get("seed", 0)),
                                              "report": report.name})
    except (FsappError, RuntimeError, ValueError, OSError) as exc:
        notes.append(f"no adversarial examples saved ({attack}): {exc}")
        return
    entry: dict[str, Any] = {"file": tensors_path.name, "png": None, "attack": attack, "k": len(idx),
                             "fooled": int((tensors["adv_pred"] != tensors["labels"]).sum()),
                             "how": "re-run of the strongest attack on these samples, same seed"}
    try:
        write_png(png_path, grid(tensors["clean"], tensors["adversarial"]))
        entry["png"] = png_path.name
    except OSError as exc:
        notes.append(f"cannot write the examples picture {png_path}: {exc.strerror or exc}")
    data["examples"] = entry


def write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    """The examples as a safetensors file (atomically)."""
    from safetensors.torch import save

    from fsapp.checkpoint import atomic_write_bytes

    return atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def load_examples(path: Path) -> dict[str, Tensor]:
    """An examples file, checked: the expected tensors, dtypes and matching shapes; a UsageError
    (one line) otherwise."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        if path.stat().st_size > MAX_EXAMPLE_BYTES:
            raise UsageError(f"{path} is larger than {MAX_EXAMPLE_BYTES >> 20} MiB; not an examples file")
        tensors = load(path.read_bytes())
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except SafetensorError as exc:
        raise UsageError(f"{path} is not a safetensors file ({exc})") from None
    missing = [k for k in TENSOR_NAMES if k not in tensors]
    if missing:
        raise UsageError(f"{path} lacks tensor(s) {', '.join(missing)}; not an fsapp examples file")
    clean, adv = tensors["clean"], tensors["adversarial"]
    if clean.dtype != torch.uint8 or adv.dtype != torch.uint8 or clean.dim() != 4 or clean.shape != adv.shape:
        raise UsageError(f"{path}: images must be two uint8 tensors of the same k x C x H x W shape")
    if clean.shape[1] not in (1, 3):
        raise UsageError(f"{path}: images must have 1 or 3 channels, not {clean.shape[1]}")
    k = clean.shape[0]
    for name in ("labels", "clean_pred", "adv_pred", "indices"):
        if tensors[name].shape != (k,) or tensors[name].dtype != torch.int64:
            raise UsageError(f"{path}: '{name}' must be {k} int64 values")
    return tensors


def grid(clean: Tensor, adv: Tensor, gap: int = 1) -> Tensor:
    """Clean images in a row above their adversarial examples, with a white gap; uint8 (C, H', W')."""
    k, c, h, w = clean.shape
    out = torch.full((c, 2 * h + 3 * gap, k * w + (k + 1) * gap), 255, dtype=torch.uint8)
    for i in range(k):
        left = gap + i * (w + gap)
        out[:, gap:gap + h, left:left + w] = clean[i]
        out[:, 2 * gap + h:2 * gap + 2 * h, left:left + w] = adv[i]
    return out


def upscale_factor(height: int) -> int:
    """How many pixels a source pixel becomes: about 160 pixels for the picture's height."""
    return max(1, min(32, 160 // max(height, 1)))


def write_png(path: Path, image: Tensor, scale: int | None = None) -> Path:
    """A uint8 (C, H, W) image (1 or 3 channels) as a PNG, upscaled by nearest neighbour."""
    from fsapp.checkpoint import atomic_write_bytes

    scale = scale or upscale_factor(image.shape[1])
    big = image.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    c, h, w = big.shape
    rows = big.permute(1, 2, 0).contiguous().numpy().reshape(h, w * c)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    return atomic_write_bytes(path, png)
