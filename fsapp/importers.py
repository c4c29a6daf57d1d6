"""Convert third-party checkpoints into fsapp model files.

The only place fsapp reads a PyTorch checkpoint, and only when the user confirms they trust the
file: it is opened with ``torch.load(weights_only=True)`` (PyTorch's restricted unpickler, which
refuses code objects and arbitrary classes), converted, and written as safetensors. Everything
else in fsapp reads safetensors only.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import torch

from fsapp.checkpoint import model_metadata, save_model
from fsapp.errors import UsageError

FORMATS = ("featurescatter",)
_FS_PREFIX = "module.basic_net."


def _load_trusted(path: Path) -> Any:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UsageError(f"checkpoint not found: {path}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):  # a FIFO or device would hang or stream forever
        raise UsageError(f"{path} is not a regular file; expected a PyTorch checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refusals and corrupt files alike
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{path}: cannot read as a weights-only PyTorch checkpoint ({first})") from None


def _featurescatter_key(key: str) -> str:
    """Map the authors' WRN names (block1.layer.0.convShortcut, bn1) to fsapp's wrn names."""
    key = re.sub(r"^block(\d)\.layer\.(\d+)\.", r"block\1.\2.", key)
    key = key.replace(".convShortcut.", ".shortcut.")
    if key.startswith("bn1."):
        key = "bn." + key[len("bn1."):]
    return key


def convert_featurescatter(state: Any, source: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The authors' released CIFAR-10 layout -> (fsapp wrn state dict, wrn parameters)."""
    if not isinstance(state, dict) or "net" not in state or not isinstance(state["net"], dict):
        raise UsageError(f"{source}: expected a dict with a 'net' state dict (the Feature Scattering layout)")
    net = state["net"]
    foreign = [k for k in net if not k.startswith(_FS_PREFIX)]
    if foreign:
        raise UsageError(f"{source}: keys outside '{_FS_PREFIX}': {', '.join(sorted(foreign)[:3])}")
    tensors = {_featurescatter_key(k[len(_FS_PREFIX):]): v for k, v in net.items()}
    if "fc.weight" not in tensors or "conv1.weight" not in tensors:
        raise UsageError(f"{source}: not a wide ResNet (no conv1.weight / fc.weight)")
    blocks = {int(m.group(1)) for k in tensors if (m := re.match(r"block1\.(\d+)\.", k))}
    num_classes, width = tensors["fc.weight"].shape
    if width % 64:
        raise UsageError(f"{source}: final width {width} is not a multiple of 64 (not a WRN)")
    params = {"depth": 6 * len(blocks) + 4, "widen": width // 64, "dropout": 0.0,
              "num_classes": int(num_classes), "channels": 3, "size": 32,
              "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # their inputs: x * 2 - 1
    return tensors, params


def import_checkpoint(source: str | Path, fmt: str, out: str | Path, *, trust: bool,
                      dataset: str = "cifar10") -> Path:
    """Convert ``source`` (format ``fmt``) into the fsapp model file ``out``."""
    from fsapp.plugins import get_registry

    source, out = Path(source), Path(out)
    if fmt not in FORMATS:
        raise UsageError(f"unknown checkpoint format '{fmt}'; valid: {', '.join(FORMATS)}")
    if not trust:
        raise UsageError(
            f"{source} is a pickle-based PyTorch file; fsapp opens it only with torch.load(weights_only=True) "
            "and only if you trust where it came from: pass --trust to confirm"
        )
    tensors, params = convert_featurescatter(_load_trusted(source), source)
    model = get_registry().create("model", "wrn", **params)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UsageError(f"{source}: layout mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, ref in expected.items():
        if tensors[key].shape != ref.shape:
            raise UsageError(f"{source}: '{key}' has shape {tuple(tensors[key].shape)}, expected {tuple(ref.shape)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    meta = model_metadata("wrn", params, dataset=dataset, method="feature-scatter (imported)",
                          extra={"eval_eps": 8 / 255, "eval_step_size": 2 / 255,
                                 "imported_from": source.name, "imported_format": fmt})
    return save_model(out, model, meta)
