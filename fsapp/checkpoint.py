"""safetensors model files and resumable training checkpoints, written atomically.

Model files carry string metadata enough to rebuild the model by name (format version, model
name and parameters, classes, input shape, normalisation, dataset, method, fsapp version).
Loading validates everything before use: header size, metadata schema and version, the exact
key set, shapes, dtypes and finite values. Nothing named in metadata is imported or executed;
no pickle is ever read.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fsapp.errors import FsappError, UsageError

MODEL_FORMAT = "fsapp-model"
CHECKPOINT_FORMAT = "fsapp-checkpoint"
FORMAT_VERSION = "1"
MAX_HEADER_BYTES = 100 * 1024 * 1024
REQUIRED_MODEL_META = ("format", "format_version", "model", "model_params", "num_classes", "input_shape")
_SLOW_WRITES = float(os.environ.get("FSAPP_FAULT_SLOW_WRITES", "0") or 0)
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".tar")


# Atomic, durable writes -------------------------------------------------------------------

def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path``, fsync it, rename over ``path``, fsync the dir.

    A crash at any moment leaves either the old file or the new one, never a torn one; a failed
    write (a full disk) removes its temp file and raises, leaving the old file untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if _SLOW_WRITES:  # fault injection for the crash tests: widen the window a kill can hit
                step = max(1, len(data) // 8)
                for i in range(0, len(data), step):
                    fh.write(data[i:i + step])
                    fh.flush()
                    time.sleep(_SLOW_WRITES / 8)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically write UTF-8 text (configs, reports, manifests)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def file_sha256(path: str | Path) -> str:
    """The hex SHA-256 of a file (model hashes in reports)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Reading safetensors safely ---------------------------------------------------------------

def _refuse_pickle(path: Path, head: bytes) -> None:
    """Refuse PyTorch zip checkpoints and raw pickles (a safetensors header starts with '{')."""
    looks_safetensors = head[8:9] == b"{"
    looks_zip = head.startswith(b"PK\x03\x04")
    looks_pickle = head[:1] == b"\x80" and not looks_safetensors
    if looks_zip or looks_pickle or path.suffix.lower() in PICKLE_SUFFIXES:
        raise UsageError(
            f"{path}: looks like a PyTorch/pickle checkpoint; fsapp never unpickles files (they can run "
            "arbitrary code). Convert a trusted file with: fsapp import-checkpoint "
            f"{path} --format featurescatter --trust"
        )


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and metadata after checking the file's header; UsageError on any problem."""
    tensors, meta, _ = read_safetensors_digest(path)
    return tensors, meta


def read_safetensors_digest(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """:func:`read_safetensors` plus the SHA-256 of exactly the bytes that were read and loaded."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(9)
            _refuse_pickle(path, head)
            fh.seek(8)
            head = head[:8]
            if len(head) < 8:
                raise UsageError(f"{path}: not a safetensors file (too short: {size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > MAX_HEADER_BYTES or header_len + 8 > size:
                raise UsageError(
                    f"{path}: not a valid safetensors file (header claims {header_len} bytes, "
                    f"file has {size})"
                )
            header_bytes = fh.read(header_len)
            body = fh.read()
    except FileNotFoundError:
        raise UsageError(f"model file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory; expected a .safetensors file") from None
    except PermissionError:
        raise UsageError(f"cannot read {path}: permission denied") from None
    try:
        header = json.loads(header_bytes)
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: corrupt safetensors header ({exc})") from None
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UsageError(f"{path}: safetensors metadata must map strings to strings")
    data = head + header_bytes + body
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise UsageError(f"{path}: corrupt or truncated safetensors data ({exc})") from None
    return tensors, dict(meta), hashlib.sha256(data).hexdigest()


# Model files ------------------------------------------------------------------------------

def model_metadata(
    model_name: str,
    model_params: dict[str, Any],
    *,
    dataset: str = "",
    method: str = "",
    plugin: str = "fsapp",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Metadata for :func:`save_model` from a model spec (params include the dataset fields)."""
    from fsapp._version import __version__

    meta = {
        "format": MODEL_FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "model_plugin": plugin,
        "model_params": model_params,
        "num_classes": model_params.get("num_classes"),
        "input_shape": [model_params.get("channels"), model_params.get("size"), model_params.get("size")],
        "mean": list(model_params.get("mean", ())),
        "std": list(model_params.get("std", ())),
        "dataset": dataset,
        "method": method,
        "fsapp_version": __version__,
    }
    meta.update(extra or {})
    return meta


def _meta_strings(meta: dict[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def _state_tensors(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_model(path: str | Path, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Save ``model``'s weights as safetensors with ``meta`` (see :func:`model_metadata`)."""
    meta = dict(meta)
    meta.setdefault("format", MODEL_FORMAT)
    meta.setdefault("format_version", FORMAT_VERSION)
    missing = [k for k in REQUIRED_MODEL_META if k not in meta]
    if missing:
        raise UsageError(f"model metadata lacks {', '.join(missing)}; build it with model_metadata()")
    model = getattr(model, "module", model)  # DDP / compiled wrappers
    model = getattr(model, "_orig_mod", model)
    data = st_save(_state_tensors(model.state_dict()), metadata=_meta_strings(meta))
    return atomic_write_bytes(path, data)


def parse_model_meta(path: str | Path, meta: dict[str, str]) -> dict[str, Any]:
    """Decode and check the metadata schema of a model file."""
    if meta.get("format") != MODEL_FORMAT:
        raise UsageError(
            f"{path}: not an fsapp model file (metadata format is {meta.get('format')!r}, "
            f"expected '{MODEL_FORMAT}')"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise UsageError(
            f"{path}: model format version {meta.get('format_version')!r} is not supported "
            f"(this fsapp reads version {FORMAT_VERSION})"
        )
    missing = [k for k in REQUIRED_MODEL_META if k not in meta]
    if missing:
        raise UsageError(f"{path}: metadata lacks {', '.join(missing)}")
    out: dict[str, Any] = dict(meta)
    for key in ("model_params", "num_classes", "input_shape", "mean", "std"):
        if key in meta:
            try:
                out[key] = json.loads(meta[key])
            except ValueError:
                raise UsageError(f"{path}: metadata field '{key}' is not valid JSON") from None
    if not isinstance(out["model_params"], dict):
        raise UsageError(f"{path}: metadata field 'model_params' must be an object")
    if not isinstance(out["num_classes"], int) or out["num_classes"] < 1:
        raise UsageError(f"{path}: metadata field 'num_classes' must be a positive integer")
    shape = out["input_shape"]
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise UsageError(f"{path}: metadata field 'input_shape' must be [channels, height, width]")
    return out


def load_model_file(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild and validate a model from its file; returns ``(model in eval mode, metadata)``."""
    model, meta, _ = load_model_file_digest(path, device)
    return model, meta


def load_model_file_digest(path: str | Path, device: str | torch.device = "cpu",
                           ) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """:func:`load_model_file` plus the SHA-256 of the bytes the weights came from (the file is
    read once: a file replaced meanwhile cannot lend its hash to these weights)."""
    from fsapp.errors import PluginError
    from fsapp.plugins import get_registry

    tensors, raw, digest = read_safetensors_digest(path)
    meta = parse_model_meta(path, raw)
    registry = get_registry()
    name = meta["model"]
    if name not in registry.names("model"):
        plugin = meta.get("model_plugin", "")
        hint = f"; install the plugin '{plugin}' that provides it" if plugin and plugin != "fsapp" else ""
        raise UsageError(f"{path}: model '{name}' is not available{hint} (available: "
                         f"{', '.join(registry.names('model'))})")
    try:
        model = registry.create("model", name, **meta["model_params"])
    except (UsageError, PluginError) as exc:
        raise UsageError(f"{path}: cannot rebuild model '{name}' from metadata: {exc}") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
        raise UsageError(f"{path}: weights do not match model '{name}': {'; '.join(parts)}")
    for key, ref in expected.items():
        t = tensors[key]
        if t.shape != ref.shape:
            raise UsageError(f"{path}: tensor '{key}' has shape {tuple(t.shape)}, model expects {tuple(ref.shape)}")
        if t.dtype != ref.dtype:
            raise UsageError(f"{path}: tensor '{key}' has dtype {t.dtype}, model expects {ref.dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UsageError(f"{path}: tensor '{key}' holds NaN or infinite values")
    model.load_state_dict(tensors, strict=True)
    model.to(device).eval()
    return model, meta, digest


def load_model(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a model from an fsapp model file (validated); eval mode, on ``device``."""
    return load_model_file(path, device)[0]


# Training checkpoints ---------------------------------------------------------------------

def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save model, optimizer, RNG states and ``state`` (epoch, step, ...) in one safetensors file."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    tensors = _state_tensors(model.state_dict(), "model.")
    opt = optimizer.state_dict()
    opt_meta: dict[str, Any] = {"param_groups": opt["param_groups"], "state": {}}
    for idx, entry in opt["state"].items():
        scalars = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars[key] = value
        opt_meta["state"][str(idx)] = scalars
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for key, value in (extra_tensors or {}).items():
        tensors[key] = value.detach().to("cpu").contiguous().clone()
    meta = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "state": json.dumps(state),
        "optimizer": json.dumps(opt_meta),
    }
    return atomic_write_bytes(path, st_save(tensors, metadata=meta))


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read a checkpoint: ``(tensors, state, optimizer metadata)``."""
    tensors, meta = read_safetensors(path)
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"{path}: not an fsapp training checkpoint (format {meta.get('format')!r})")
    try:
        return tensors, json.loads(meta["state"]), json.loads(meta["optimizer"])
    except (KeyError, ValueError):
        raise UsageError(f"{path}: checkpoint metadata is damaged") from None


def restore_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load a checkpoint into ``model`` and ``optimizer``, restore RNG states; returns the state."""
    tensors, state, opt_meta = load_checkpoint(path)
    target = getattr(model, "module", model)
    target = getattr(target, "_orig_mod", target)
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        target.load_state_dict(model_state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UsageError(f"{path}: checkpoint does not match the configured model ({first})") from None
    opt_state: dict[str, Any] = {"param_groups": opt_meta["param_groups"], "state": {}}
    for idx, scalars in opt_meta["state"].items():
        entry = dict(scalars)
        prefix = f"optim.{idx}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                entry[key[len(prefix):]] = value
        opt_state["state"][int(idx)] = entry
    optimizer.load_state_dict(opt_state)
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda_states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    state["_extra"] = {k: v for k, v in tensors.items() if k.startswith("extra.")}
    return state


__all__ = [
    "FsappError",
    "atomic_write_bytes",
    "atomic_write_text",
    "file_sha256",
    "load_checkpoint",
    "load_model",
    "load_model_file",
    "model_metadata",
    "read_safetensors",
    "restore_checkpoint",
    "save_checkpoint",
    "save_model",
]
