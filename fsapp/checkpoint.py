"""safetensors model files and resumable training checkpoints, written atomically.

Model files carry string metadata enough to rebuild the model by name (format version, model
name and parameters, classes, input shape, normalisation, dataset and its parameters, method,
fsapp version). A file is hostile until checked, and it is checked in an order that never costs
more than the file itself:

1. the path must be a regular file (a FIFO, socket, device or directory is refused before it is
   opened, so nothing can hang);
2. the safetensors header is read alone and checked: its length against the file size, its JSON
   against a nesting limit and duplicate keys, every tensor's dtype, shape and byte range
   (contiguous, non-overlapping, in bounds, sized as dtype x shape);
3. the metadata is decoded and checked field by field (types, ranges, agreement between fields);
4. the model is described from the metadata without being materialised: parameter ranges and a
   parameter-count estimate first, then a build on torch's ``meta`` device under a bound on the
   number of modules and tensors derived from the file's tensor count; every expected tensor's
   shape and dtype is compared with the header;
5. only then is the tensor data read, checked for finite values and loaded.

Checkpoints get the same container checks plus a schema of their own (model tensors, optimizer
state matching the live optimizer, RNG states, counters). Nothing named in metadata is imported
or executed; no pickle is ever read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import stat
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch.nn.modules import module as nn_module

from fsapp._version import __version__
from fsapp.builtins.models import parameter_count
from fsapp.errors import FsappError, PluginError, UsageError
from fsapp.registry import make_params

MODEL_FORMAT = "fsapp-model"
CHECKPOINT_FORMAT = "fsapp-checkpoint"
FORMAT_VERSION = "1"
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_HEADER_DEPTH = 16
"""A safetensors header is an object of objects of lists: nothing legitimate nests deeper."""
MAX_VALUE_DEPTH = 16
"""Nesting limit of a JSON metadata value (model_params, dataset_params, optimizer, state)."""
MODULE_BOUND_FACTOR = 4
"""A model described by a file may register at most ``4 x tensors + 64`` modules and tensors."""
BYTES_PER_TRAINED_PARAMETER = 16
"""float32 weights, gradients, momentum and one spare copy: the memory a trained parameter needs."""
REQUIRED_MODEL_META = ("format", "format_version", "model", "model_params", "num_classes", "input_shape")
_SLOW_WRITES = float(os.environ.get("FSAPP_FAULT_SLOW_WRITES", "0") or 0)
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".tar")
_NAME = re.compile(r"[A-Za-z0-9_.:\-]*")
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)

_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
for _name, _attr, _size in (("F8_E4M3", "float8_e4m3fn", 1), ("F8_E5M2", "float8_e5m2", 1),
                            ("U16", "uint16", 2), ("U32", "uint32", 4), ("U64", "uint64", 8)):
    if hasattr(torch, _attr):
        _DTYPES[_name] = (getattr(torch, _attr), _size)


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


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new ``.NAME.XXXXXXXX.tmp`` beside ``path``, created with mode 0o666 less the umask (the
    permissions any other new file of the user gets; mkstemp's 0600 would hide run files from
    colleagues on a shared machine)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        return fd, tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path``, fsync it, rename over ``path``, fsync the dir.

    A crash at any moment leaves either the old file or the new one, never a torn one; a failed
    write (a full disk) removes its temp file and raises, leaving the old file untouched. The new
    file's permissions follow the umask (0o666 & ~umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
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
    with _open_regular(Path(path), "file") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Bounded JSON -----------------------------------------------------------------------------

class _DuplicateKey(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def json_depth(raw: bytes | str) -> int:
    """How deeply ``raw``'s arrays and objects nest (strings ignored); linear time, no recursion."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    codes = np.frombuffer(_STRING.sub(b'""', data), dtype=np.uint8)
    if codes.size == 0:
        return 0
    steps = ((codes == ord("[")) | (codes == ord("{"))).astype(np.int64)
    steps -= ((codes == ord("]")) | (codes == ord("}"))).astype(np.int64)
    return int(np.cumsum(steps).max())


def parse_json(raw: bytes | str, what: str, max_depth: int = MAX_VALUE_DEPTH) -> Any:
    """``json.loads`` with a nesting limit and duplicate keys refused; UsageError naming ``what``."""
    depth = json_depth(raw)
    if depth > max_depth:
        raise UsageError(f"{what} is nested {depth} levels deep (limit {max_depth})")
    try:
        return json.loads(raw, object_pairs_hook=_unique_pairs)
    except _DuplicateKey as exc:
        raise UsageError(f"{what} has a duplicate key {str(exc)!r}") from None
    except RecursionError:
        raise UsageError(f"{what} is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())[:120]
        raise UsageError(f"{what} is not valid JSON ({reason})") from None


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


_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def _not_regular(path: Path, mode: int) -> UsageError:
    if stat.S_ISDIR(mode):
        return UsageError(f"{path} is a directory; expected a .safetensors file")
    kind = next((name for test, name in _KINDS if test(mode)), "a special file")
    return UsageError(f"{path} is not a regular file ({kind}); expected a .safetensors file")


@contextmanager
def _open_regular(path: Path, what: str) -> Iterator[IO[bytes]]:
    """Open ``path`` for reading only if it is a regular file (checked before and after opening;
    opened non-blocking, so a FIFO swapped in meanwhile cannot hang the open)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UsageError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise _not_regular(path, mode)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise UsageError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_regular(path, mode)
    try:
        with os.fdopen(fd, "rb") as fh:
            yield fh
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the header describes it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Container:
    """A checked safetensors header: the tensors it describes, its metadata, and the open file
    positioned at the start of the data (read with :meth:`load`)."""

    path: Path
    prefix: bytes
    header: bytes
    entries: dict[str, TensorInfo]
    meta: dict[str, str]
    data_len: int
    fh: IO[bytes]

    @property
    def total_values(self) -> int:
        """How many numbers the file's tensors hold."""
        return sum(e.numel for e in self.entries.values())

    def load(self) -> tuple[dict[str, torch.Tensor], str]:
        """Read the tensor data (exactly the length the header implies); ``(tensors, sha256)``."""
        body = self.fh.read(self.data_len + 1)
        if len(body) != self.data_len:
            raise UsageError(f"{self.path}: the file changed while it was read ({len(body)} data bytes, "
                             f"header promises {self.data_len})")
        data = self.prefix + self.header + body
        try:
            tensors = st_load(data)
        except Exception as exc:  # safetensors raises its own error types
            reason = " ".join(str(exc).split())[:160]
            raise UsageError(f"{self.path}: corrupt safetensors data ({reason})") from None
        return tensors, hashlib.sha256(data).hexdigest()


def _entry(path: Path, key: str, value: Any) -> TensorInfo:
    where = f"{path}: tensor {key!r} in the header"
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise UsageError(f"{where} must be an object with exactly dtype, shape and data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise UsageError(f"{where} has an unknown dtype {dtype!r}; valid: {', '.join(_DTYPES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise UsageError(f"{where} has a bad shape {shape!r}; expected a list of sizes >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise UsageError(f"{where} has bad data_offsets {offsets!r}; expected [begin, end], 0 <= begin <= end")
    torch_dtype, size = _DTYPES[dtype]
    info = TensorInfo(torch_dtype, tuple(shape), offsets[0], offsets[1])
    if info.end - info.begin != info.numel * size:
        raise UsageError(f"{where}: shape {shape} of {dtype} needs {info.numel * size} bytes, data_offsets "
                         f"give {info.end - info.begin}")
    return info


def _check_layout(path: Path, entries: dict[str, TensorInfo], data_len: int) -> None:
    """The byte ranges must tile the data exactly: from 0, contiguous, no overlap, to the end."""
    pos = 0
    for key, info in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin < pos:
            raise UsageError(f"{path}: tensor {key!r} data_offsets [{info.begin}, {info.end}] overlap another tensor")
        if info.begin > pos:
            raise UsageError(f"{path}: tensor {key!r} data_offsets [{info.begin}, {info.end}] leave a gap "
                             f"after byte {pos}")
        if info.end > data_len:
            raise UsageError(f"{path}: tensor {key!r} data_offsets [{info.begin}, {info.end}] run past the end "
                             f"of the data ({data_len} bytes): truncated or corrupt")
        pos = info.end
    if pos != data_len:
        raise UsageError(f"{path}: the tensors end at byte {pos} but the file holds {data_len} data bytes "
                         "(truncated or trailing bytes)")


@contextmanager
def open_safetensors(path: str | Path, what: str = "file") -> Iterator[Container]:
    """Open a safetensors file and check its header without reading the tensor data."""
    path = Path(path)
    with _open_regular(path, what) as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(9)
        _refuse_pickle(path, head)
        prefix = head[:8]
        if len(prefix) < 8:
            raise UsageError(f"{path}: not a safetensors file (too short: {size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or header_len + 8 > size:
            raise UsageError(f"{path}: not a valid safetensors file (header claims {header_len} bytes, "
                             f"file has {size})")
        fh.seek(8)
        header_bytes = fh.read(header_len)
        if len(header_bytes) != header_len:
            raise UsageError(f"{path}: the file changed while it was read (header cut short)")
        if header_bytes[:1] != b"{":
            raise UsageError(f"{path}: corrupt safetensors header (it must start with '{{'; "
                             f"found {header_bytes[:4]!r})")
        try:
            text = header_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"{path}: corrupt safetensors header (not UTF-8)") from None
        header = parse_json(text, f"{path}: safetensors header", MAX_HEADER_DEPTH)
        if not isinstance(header, dict):
            raise UsageError(f"{path}: corrupt safetensors header (not a JSON object)")
        meta = header.pop("__metadata__", None)
        if meta is None:
            meta = {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise UsageError(f"{path}: safetensors metadata must map strings to strings")
        entries = {key: _entry(path, key, value) for key, value in header.items()}
        data_len = size - 8 - header_len
        _check_layout(path, entries, data_len)
        yield Container(path, prefix, header_bytes, entries, meta, data_len, fh)


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read tensors and metadata after checking the file's header; UsageError on any problem."""
    tensors, meta, _ = read_safetensors_digest(path)
    return tensors, meta


def read_safetensors_digest(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str], str]:
    """:func:`read_safetensors` plus the SHA-256 of exactly the bytes that were read and loaded."""
    with open_safetensors(path) as box:
        tensors, digest = box.load()
        return tensors, dict(box.meta), digest


# Model metadata ---------------------------------------------------------------------------

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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _field(path: str | Path, meta: dict[str, str], key: str, max_depth: int = MAX_VALUE_DEPTH) -> Any:
    return parse_json(meta[key], f"{path}: metadata field '{key}'", max_depth)


def _float_list(path: str | Path, key: str, value: Any) -> list[float]:
    if not isinstance(value, list) or not value or not all(_is_number(v) for v in value):
        raise UsageError(f"{path}: metadata field '{key}' must be a non-empty list of finite numbers, "
                         f"got {str(value)[:60]}")
    return [float(v) for v in value]


def parse_model_meta(path: str | Path, meta: dict[str, str]) -> dict[str, Any]:
    """Decode and check the metadata of a model file: every field's type and range, and that the
    fields agree with each other. Returns the metadata with JSON fields decoded (``model_params``,
    ``num_classes``, ``input_shape``, ``mean``, ``std``, ``dataset_params``) and the numbers
    ``epsilon``, ``eval_eps`` and ``eval_step_size`` as floats."""
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
    for key in ("model", "dataset", "model_plugin"):
        if key in meta and not (_NAME.fullmatch(meta[key]) and len(meta[key]) <= 200):
            raise UsageError(f"{path}: metadata field '{key}' must be a component name (letters, digits, "
                             f"'-', '_', '.', ':'), got {meta[key][:60]!r}")
    if not meta["model"]:
        raise UsageError(f"{path}: metadata field 'model' is empty")
    params = _field(path, meta, "model_params")
    if not isinstance(params, dict):
        raise UsageError(f"{path}: metadata field 'model_params' must be an object")
    out["model_params"] = params
    num_classes = _field(path, meta, "num_classes")
    if not _is_int(num_classes) or num_classes < 1:
        raise UsageError(f"{path}: metadata field 'num_classes' must be a positive integer, got {meta['num_classes'][:40]}")
    out["num_classes"] = num_classes
    shape = _field(path, meta, "input_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(s) and s > 0 for s in shape)):
        raise UsageError(f"{path}: metadata field 'input_shape' must be [channels, height, width] of "
                         f"positive integers, got {meta['input_shape'][:40]}")
    out["input_shape"] = shape
    for key in ("mean", "std"):
        if key in meta:
            out[key] = _float_list(path, key, _field(path, meta, key))
    if "dataset_params" in meta:
        dataset_params = _field(path, meta, "dataset_params")
        if not isinstance(dataset_params, dict):
            raise UsageError(f"{path}: metadata field 'dataset_params' must be an object")
        out["dataset_params"] = dataset_params
    for key in ("epsilon", "eval_eps", "eval_step_size"):
        if key in meta:
            value = _field(path, meta, key)
            if not _is_number(value) or not 0 <= value <= 1:
                raise UsageError(f"{path}: metadata field '{key}' must be a number in 0..1 (inputs are in "
                                 f"[0, 1]), got {meta[key][:40]!r}")
            out[key] = float(value)
    _check_agreement(path, out)
    return out


def _check_agreement(path: str | Path, meta: dict[str, Any]) -> None:
    """The top-level fields repeat parts of model_params: they must say the same thing."""
    params = meta["model_params"]
    channels, height, width = meta["input_shape"]
    if "num_classes" in params and params["num_classes"] != meta["num_classes"]:
        raise UsageError(f"{path}: metadata field 'num_classes' is {meta['num_classes']} but model_params "
                         f"say num_classes={str(params['num_classes'])[:40]}")
    if "channels" in params and params["channels"] != channels:
        raise UsageError(f"{path}: metadata field 'input_shape' says {channels} channels but model_params say "
                         f"channels={str(params['channels'])[:40]}")
    if "size" in params and not params["size"] == height == width:
        raise UsageError(f"{path}: metadata field 'input_shape' is {meta['input_shape']} but model_params say "
                         f"size={str(params['size'])[:40]}")
    for key in ("mean", "std"):
        values = meta.get(key)
        if values is None:
            continue
        if len(values) not in (1, channels):
            raise UsageError(f"{path}: metadata field '{key}' has {len(values)} values; the model has "
                             f"{channels} channels (valid: 1 or {channels})")
        if key in params and (not isinstance(params[key], list) or [float(v) if _is_number(v) else v
                                                                    for v in params[key]] != values):
            raise UsageError(f"{path}: metadata field '{key}' is {values} but model_params say "
                             f"{key}={str(params[key])[:60]}")


# Describing a model without building it ---------------------------------------------------

class _TooManyParts(Exception):
    pass


@contextmanager
def _registration_bound(max_modules: int, max_tensors: int) -> Iterator[None]:
    """Abort a model's construction as soon as it registers too many modules or tensors."""

    counts = {"modules": 0, "tensors": 0}

    def count(kind: str, limit: int) -> Any:
        def hook(*_args: Any) -> None:
            counts[kind] += 1
            if counts[kind] > limit:
                raise _TooManyParts(f"more than {limit} {kind}")
        return hook

    handles = [
        nn_module.register_module_module_registration_hook(count("modules", max_modules)),
        nn_module.register_module_parameter_registration_hook(count("tensors", max_tensors)),
        nn_module.register_module_buffer_registration_hook(count("tensors", max_tensors)),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def model_params_for(name: str, params: dict[str, Any]) -> Any:
    """The model's parameter dataclass from raw values: coerced and range-checked (one line)."""
    from fsapp.plugins import get_registry

    registry = get_registry()
    if name not in registry.names("model"):
        raise UsageError(f"model '{name}' is not available (available: {', '.join(registry.names('model'))})")
    return make_params(registry.get("model", name), params)


def _build_on_meta(name: str, instance: Any, max_parts: int) -> torch.nn.Module:
    """Construct the model on torch's meta device (no memory for weights), bounded in parts."""
    from fsapp.plugins import get_registry

    component = get_registry().get("model", name)
    try:
        with _registration_bound(max_parts, max_parts), torch.device("meta"):
            return component.factory(instance)
    except _TooManyParts as exc:
        raise UsageError(f"model '{name}' with these parameters has {exc} (limit {max_parts})") from None
    except (UsageError, ValueError, TypeError, RuntimeError, NotImplementedError) as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise UsageError(f"cannot describe model '{name}' from its parameters: {reason}") from None


def estimate_parameters(name: str, params: dict[str, Any], *, max_parts: int = 100_000) -> int:
    """How many learnable parameters model ``name`` would have with ``params`` (raw values, as in a
    config or a model file), without allocating them.

    Ranges are checked first (UsageError naming the key, value and valid range). Built-in models
    are counted by formula; others are built on the meta device, aborted past ``max_parts``
    registered modules or tensors.
    """

    instance = model_params_for(name, params)
    count = parameter_count(instance)
    if count is None:
        model = _build_on_meta(name, instance, max_parts)
        count = sum(p.numel() for p in model.parameters())
    return count


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def _size_text(n: float, unit: str = "") -> str:
    for suffix in ("", " k", " M", " G", " T", " P"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}"
        n /= 1000
    return f"{n:.3g} E{unit}"


def check_model_fits(name: str, params: dict[str, Any], *, limit_bytes: int | None = None) -> int:
    """Refuse (UsageError, saying the estimate) a model whose training would not fit in memory.

    The estimate is :func:`estimate_parameters` x 16 bytes (weights, gradients, momentum, a copy);
    ``limit_bytes`` defaults to this machine's physical memory (pass a GPU's memory for CUDA).
    Returns the parameter count.
    """
    count = estimate_parameters(name, params)
    limit = _memory_bytes() if limit_bytes is None else limit_bytes
    need = count * BYTES_PER_TRAINED_PARAMETER
    if need > limit:
        raise UsageError(f"model '{name}' would have about {_size_text(count)} parameters, needing about "
                         f"{_size_text(need, 'B')} to train; this device has {_size_text(limit, 'B')}: lower "
                         "its size parameters")
    return count


def describe_model(path: str | Path, meta: dict[str, Any], box: Container) -> dict[str, tuple[torch.dtype, tuple]]:
    """The ``{key: (dtype, shape)}`` the metadata's model expects, found without allocating it:
    parameter ranges, then a parameter-count estimate (a model larger than this machine's memory is
    refused, saying the estimate), then a build on the meta device bounded by the file's tensor
    count. Comparing the result with the header (:func:`check_tensors_match`) then guarantees the
    real model allocates exactly what the file holds."""
    from fsapp.plugins import get_registry

    name = meta["model"]
    registry = get_registry()
    if name not in registry.names("model"):
        plugin = meta.get("model_plugin", "")
        hint = f"; install the plugin '{plugin}' that provides it" if plugin and plugin != "fsapp" else ""
        raise UsageError(f"{path}: model '{name}' is not available{hint} (available: "
                         f"{', '.join(registry.names('model'))})")
    try:
        instance = model_params_for(name, meta["model_params"])
    except UsageError as exc:
        raise UsageError(f"{path}: metadata field 'model_params': {exc}") from None
    for key, want in (("num_classes", meta["num_classes"]), ("channels", meta["input_shape"][0]),
                      ("size", meta["input_shape"][1])):
        have = getattr(instance, key, want)
        if have != want:
            raise UsageError(f"{path}: metadata field 'model_params' gives {key}={have} (a default?) but the "
                             f"file's {'num_classes' if key == 'num_classes' else 'input_shape'} says {want}")
    count = parameter_count(instance)
    memory = _memory_bytes()
    if count is not None and count * 4 > memory:
        raise UsageError(f"{path}: metadata describes model '{name}' with about {_size_text(count)} parameters "
                         f"({_size_text(count * 4, 'B')} as float32), more than this machine's memory "
                         f"({_size_text(memory, 'B')}); the file holds {_size_text(box.total_values)} values")
    bound = MODULE_BOUND_FACTOR * len(box.entries) + 64
    try:
        model = _build_on_meta(name, instance, bound)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc}; the file has {len(box.entries)} tensors") from None
    state = model.state_dict()
    return {key: (t.dtype, tuple(t.shape)) for key, t in state.items()}


def _keys_text(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")


def check_tensors_match(path: str | Path, what: str, expected: dict[str, tuple[torch.dtype, tuple]],
                        found: dict[str, TensorInfo]) -> None:
    """Exact key set, shapes and dtypes, from the header alone (before any data is read)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_keys_text(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_keys_text(unexpected)}")
        raise UsageError(f"{path}: weights do not match {what}: {'; '.join(parts)}")
    for key, (dtype, shape) in expected.items():
        info = found[key]
        if info.shape != shape:
            raise UsageError(f"{path}: tensor '{key}' has shape {info.shape}, {what} expects {shape}")
        if info.dtype != dtype:
            raise UsageError(f"{path}: tensor '{key}' has dtype {info.dtype}, {what} expects {dtype}")


def _check_finite(path: str | Path, tensors: dict[str, torch.Tensor], keys: Any = None) -> None:
    for key in keys if keys is not None else tensors:
        t = tensors[key]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UsageError(f"{path}: tensor '{key}' holds NaN or infinite values")


# Model files ------------------------------------------------------------------------------

def load_model_file(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild and validate a model from its file; returns ``(model in eval mode, metadata)``."""
    model, meta, _ = load_model_file_digest(path, device)
    return model, meta


def check_model_file(path: str | Path) -> dict[str, Any]:
    """Validate a model file completely except its tensor values, reading only the header:
    container, metadata, parameter ranges and every tensor's shape and dtype. Returns the metadata."""
    with open_safetensors(path, "model file") as box:
        meta = parse_model_meta(path, box.meta)
        check_tensors_match(path, f"model '{meta['model']}'", describe_model(path, meta, box), box.entries)
        return meta


def load_model_file_digest(path: str | Path, device: str | torch.device = "cpu",
                           ) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """:func:`load_model_file` plus the SHA-256 of the bytes the weights came from (the file is
    read once: a file replaced meanwhile cannot lend its hash to these weights)."""
    from fsapp.plugins import get_registry

    with open_safetensors(path, "model file") as box:
        meta = parse_model_meta(path, box.meta)
        name = meta["model"]
        check_tensors_match(path, f"model '{name}'", describe_model(path, meta, box), box.entries)
        tensors, digest = box.load()
    _check_finite(path, tensors)
    try:
        model = get_registry().create("model", name, **meta["model_params"])
    except (UsageError, PluginError) as exc:
        raise UsageError(f"{path}: cannot rebuild model '{name}' from metadata: {exc}") from None
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:  # a model that builds differently than it described itself
        first = str(exc).strip().splitlines()[0]
        raise UsageError(f"{path}: weights do not match model '{name}' ({first})") from None
    model.to(device).eval()
    return model, meta, digest


def load_model(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a model from an fsapp model file (validated); eval mode, on ``device``."""
    return load_model_file(path, device)[0]


# Training checkpoints ---------------------------------------------------------------------

_PARAM_SHAPED = {"momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "acc_delta",
                 "sum", "grad_avg", "prev", "ax", "eta"}
_STATE_COUNTERS = ("epoch", "step", "global_step", "bad_steps")
_RNG_EXTRA = re.compile(r"extra\.rng\.rank(\d+)\.(torch|cuda)")
_MAX_RNG_BYTES = 1 << 16
MAX_STEPS = 1 << 40
"""No run takes a trillion steps: a larger counter in a checkpoint is damage."""


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


def _checkpoint_meta(path: str | Path, meta: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoint's format, ``state`` and ``optimizer`` fields, decoded and checked in shape."""
    if meta.get("format") != CHECKPOINT_FORMAT:
        what = "a model file" if meta.get("format") == MODEL_FORMAT else f"format {meta.get('format')!r}"
        raise UsageError(f"{path}: not an fsapp training checkpoint ({what})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"{path}: checkpoint format version {meta.get('format_version')!r} is not supported "
                         f"(this fsapp reads version {FORMAT_VERSION})")
    for key in ("state", "optimizer"):
        if key not in meta:
            raise UsageError(f"{path}: checkpoint metadata lacks '{key}'")
    state = parse_json(meta["state"], f"{path}: checkpoint field 'state'")
    opt = parse_json(meta["optimizer"], f"{path}: checkpoint field 'optimizer'")
    if not isinstance(state, dict):
        raise UsageError(f"{path}: checkpoint field 'state' must be an object")
    if not isinstance(opt, dict) or set(opt) != {"param_groups", "state"}:
        raise UsageError(f"{path}: checkpoint field 'optimizer' must be an object with param_groups and state")
    if not isinstance(opt["param_groups"], list) or not isinstance(opt["state"], dict):
        raise UsageError(f"{path}: checkpoint field 'optimizer' has malformed param_groups or state")
    _check_counters(path, state)
    return state, opt


def read_checkpoint_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's ``state`` (epoch, step, config digest...), checked, from its header alone."""
    with open_safetensors(path, "checkpoint") as box:
        state, _ = _checkpoint_meta(path, box.meta)
    return state


def _check_counters(path: str | Path, state: dict[str, Any], steps_per_epoch: int | None = None) -> None:
    where = f"{path}: checkpoint state"
    for key in ("epoch", "step", "global_step"):
        if key not in state:
            raise UsageError(f"{where} lacks '{key}'")
    for key in _STATE_COUNTERS:
        if key in state and not (_is_int(state[key]) and 0 <= state[key] < MAX_STEPS):
            raise UsageError(f"{where} field '{key}' must be a non-negative integer, got {str(state[key])[:40]}")
    if "world_size" in state and not (_is_int(state["world_size"]) and 1 <= state["world_size"] <= 1 << 20):
        raise UsageError(f"{where} field 'world_size' must be a positive integer, got {str(state['world_size'])[:40]}")
    for key, value in state.items():
        if key == "config" and isinstance(value, dict):  # the resolved config tables, for --resume's check
            continue
        if not (value is None or isinstance(value, (str, bool, int)) or _is_number(value)):
            raise UsageError(f"{where} field '{key}' must be a plain value, got {type(value).__name__}")
    epoch, step, global_step = state["epoch"], state["step"], state["global_step"]
    # global_step counts every step taken: epoch * steps_per_epoch + step
    if epoch == 0 and global_step != step:
        raise UsageError(f"{where}: global_step {global_step} disagrees with epoch 0 step {step}")
    if epoch > 0:
        per_epoch, rest = divmod(global_step - step, epoch)
        if global_step < step or rest or per_epoch < 1 or step >= per_epoch:
            raise UsageError(f"{where}: epoch {epoch}, step {step} and global_step {global_step} do not agree "
                             "(step must lie within an epoch)")
        if steps_per_epoch is not None and per_epoch != steps_per_epoch:
            raise UsageError(f"{where}: epochs of {per_epoch} steps, but this run has {steps_per_epoch} per epoch")
    if steps_per_epoch is not None and step >= steps_per_epoch:
        raise UsageError(f"{where} field 'step' = {step} is beyond the epoch's {steps_per_epoch} steps")


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Read a checkpoint: ``(tensors, state, optimizer metadata)`` (container and schema checked,
    finite values checked; use :func:`restore_checkpoint` to check it against a model)."""
    with open_safetensors(path, "checkpoint") as box:
        state, opt = _checkpoint_meta(path, box.meta)
        tensors, _ = box.load()
    _check_finite(path, tensors)
    return tensors, state, opt


def _check_param_groups(path: str | Path, saved: list[Any], live: list[dict[str, Any]]) -> None:
    where = f"{path}: checkpoint optimizer"
    if len(saved) != len(live):
        raise UsageError(f"{where} has {len(saved)} parameter groups; the model's optimizer has {len(live)}")
    for i, (group, ref) in enumerate(zip(saved, live, strict=True)):
        if not isinstance(group, dict):
            raise UsageError(f"{where} parameter group {i} is not an object")
        unknown = sorted(set(group) - set(ref))
        if unknown:
            raise UsageError(f"{where} parameter group {i} has unknown keys {_keys_text(unknown)}")
        if group.get("params") != ref["params"]:
            raise UsageError(f"{where} parameter group {i} lists params {str(group.get('params'))[:60]}, "
                             f"expected {str(ref['params'])[:60]}")
        for key, value in group.items():
            if key == "params":
                continue
            kind = ref[key]
            if isinstance(kind, bool) or kind is None:
                ok = value is None or isinstance(value, bool)
            elif isinstance(kind, (int, float)):
                ok = _is_number(value) and value >= 0
            elif isinstance(kind, tuple | list):
                ok = isinstance(value, list) and len(value) == len(kind) and all(_is_number(v) for v in value)
            else:
                ok = isinstance(value, type(kind))
            if not ok:
                raise UsageError(f"{where} parameter group {i} field '{key}' = {str(value)[:40]} is not valid "
                                 f"(expected like {kind!r})")


def _expected_checkpoint(path: str | Path, target: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         opt_meta: dict[str, Any], found: dict[str, TensorInfo],
                         ) -> dict[str, tuple[torch.dtype, tuple]]:
    """Every tensor key the checkpoint must hold, with its dtype and shape."""
    where = f"{path}: checkpoint optimizer"
    expected = {f"model.{k}": (t.dtype, tuple(t.shape)) for k, t in target.state_dict().items()}
    live = optimizer.state_dict()
    _check_param_groups(path, opt_meta["param_groups"], live["param_groups"])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in live["param_groups"] for i in group["params"]]
    by_id = dict(zip(ids, params, strict=True))
    entries = opt_meta["state"]
    if entries and sorted(entries) != sorted(str(i) for i in ids):
        covered = ", ".join(sorted(entries, key=lambda s: (len(s), s))[:8])
        raise UsageError(f"{where} state covers parameters [{covered}] but the model's optimizer has "
                         f"{len(ids)} (all or none must have state)")
    for idx, scalars in entries.items():
        if not isinstance(scalars, dict):
            raise UsageError(f"{where} state {idx!r} is not an object")
        for key, value in scalars.items():
            if key != "step" or not (_is_number(value) and value >= 0):
                raise UsageError(f"{where} state {idx} field '{key}' = {str(value)[:40]} is not valid "
                                 "(only a non-negative 'step' counter may be a number)")
        param = by_id[int(idx)]
        prefix = f"optim.{idx}."
        for key in found:
            if not key.startswith(prefix):
                continue
            name = key[len(prefix):]
            if name in _PARAM_SHAPED:
                expected[key] = (param.dtype, tuple(param.shape))
            elif name == "step":
                expected[key] = (found[key].dtype, ())
            else:
                raise UsageError(f"{where} state {idx} has an unknown tensor '{name}'")
    kinds = {idx: sorted(k[len(f"optim.{idx}."):] for k in found if k.startswith(f"optim.{idx}."))
             for idx in entries}
    if len({tuple(v) for v in kinds.values()}) > 1:
        idx, names = min(kinds.items(), key=lambda kv: len(kv[1]))
        raise UsageError(f"{where} state {idx} holds tensors {names or 'none'}, unlike the other parameters' "
                         f"{max(kinds.values(), key=len)}")
    momentum = any(group.get("momentum") for group in live["param_groups"])
    if momentum and entries and not all("momentum_buffer" in v for v in kinds.values()):
        raise UsageError(f"{where} state lacks momentum buffers although the optimizer uses momentum")
    stray = sorted(k for k in found if k.startswith("optim.") and k not in expected)
    if stray:
        raise UsageError(f"{where} has tensors for unknown parameters: {_keys_text(stray)}")
    rng = torch.get_rng_state()
    expected["rng.torch"] = (rng.dtype, tuple(rng.shape))
    for key, info in found.items():
        if re.fullmatch(r"rng\.cuda\.\d+", key) or _RNG_EXTRA.fullmatch(key):
            if info.dtype != torch.uint8 or len(info.shape) != 1 or not 0 < info.numel <= _MAX_RNG_BYTES:
                raise UsageError(f"{path}: RNG state '{key}' must be a 1-D uint8 tensor, got {info.dtype} "
                                 f"{info.shape}")
            if key.endswith(".torch"):
                expected[key] = (rng.dtype, tuple(rng.shape))
            else:
                expected[key] = (info.dtype, info.shape)
    return expected


def restore_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
    steps_per_epoch: int | None = None,
) -> dict[str, Any]:
    """Load a checkpoint into ``model`` and ``optimizer``, restore RNG states; returns the state.

    Everything is checked before anything is changed: the container, the schema, the exact tensor
    key set with every shape and dtype (model tensors against ``model``; momentum buffers and
    parameter groups against ``optimizer``; RNG states), finite values and the counters (with
    ``steps_per_epoch``, a step beyond the epoch is refused too). UsageError, one line, otherwise.
    """
    target = getattr(model, "module", model)
    target = getattr(target, "_orig_mod", target)
    with open_safetensors(path, "checkpoint") as box:
        state, opt_meta = _checkpoint_meta(path, box.meta)
        _check_counters(path, state, steps_per_epoch)
        expected = _expected_checkpoint(path, target, optimizer, opt_meta, box.entries)
        check_tensors_match(path, "the configured model and optimizer", expected, box.entries)
        tensors, _ = box.load()
    _check_finite(path, tensors)
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    opt_state: dict[str, Any] = {"param_groups": opt_meta["param_groups"], "state": {}}
    for idx, scalars in opt_meta["state"].items():
        entry = dict(scalars)
        prefix = f"optim.{idx}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                entry[key[len(prefix):]] = value
        opt_state["state"][int(idx)] = entry
    try:
        target.load_state_dict(model_state, strict=True)
        optimizer.load_state_dict(opt_state)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"{path}: checkpoint does not match the configured model ({first})") from None
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        keys = [t for t in tensors if t.startswith("rng.cuda.") and t.removeprefix("rng.cuda.").isdigit()]
        cuda_states = [tensors[k] for k in sorted(keys, key=lambda k: int(k.removeprefix("rng.cuda.")))]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    state["_extra"] = {k: v for k, v in tensors.items() if k.startswith("extra.")}
    return state


__all__ = [
    "FsappError",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_model_file",
    "check_model_fits",
    "estimate_parameters",
    "file_sha256",
    "load_checkpoint",
    "load_model",
    "load_model_file",
    "load_model_file_digest",
    "model_metadata",
    "open_safetensors",
    "parse_json",
    "read_safetensors",
    "read_safetensors_digest",
    "restore_checkpoint",
    "save_checkpoint",
    "save_model",
]
