"""A corpus of hostile model files: every one is refused with one line and exit 2, fast and small.

Container-level cases break the safetensors framing (lengths, offsets, dtypes, JSON); metadata-level
cases are well-formed files whose metadata is absurd, contradictory or of the wrong type; special
cases are paths that are not regular files. Most run in-process through the loader; a subset runs
through the real ``python -m fsapp eval FILE --n 5`` with its time, peak memory and writes measured.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from fsapp.checkpoint import load_model_file, model_metadata, save_model
from fsapp.errors import UsageError
from fsapp.plugins import get_registry

TIME_LIMIT_S = 10.0
RSS_LIMIT_KB = 2 * 1024 * 1024
AS_LIMIT = 6 << 30  # a safety net for the machine; torch alone maps ~3 GB of address space
PARAMS = {"num_classes": 10, "channels": 1, "size": 8, "mean": [0.3], "std": [0.3], "hidden": 16, "layers": 1}
_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.int64: "I64", torch.float16: "F16"}


# --------------------------------------------------------------------------- running the CLI


@dataclass
class Outcome:
    """What a child process did: exit code, stderr, wall time and peak RSS."""

    code: int
    stderr: str
    seconds: float
    rss_kb: int


def run_cli(args: list[str], cwd: Path, timeout: float = 60.0) -> Outcome:
    """Run ``python -m fsapp ARGS`` in ``cwd`` (also its HOME) and measure it with wait4.

    The child is killed after ``timeout`` seconds (code -9) and may not map more than AS_LIMIT.
    """
    env = dict(os.environ, HOME=str(cwd), COLUMNS="200")
    err_path = cwd.parent / f".{cwd.name}.stderr"
    t0 = time.perf_counter()
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "fsapp", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=err,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT)))
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                os.kill(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = err_path.read_text(errors="replace")
    err_path.unlink()
    return Outcome(proc.returncode, stderr, time.perf_counter() - t0, usage.ru_maxrss)


def assert_one_clean_line(text: str) -> None:
    """Exactly one non-empty line, and no traceback."""
    assert "Traceback" not in text, text[-2000:]
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text[-2000:]


def tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder`` (file bytes, or the kind of a special entry)."""
    out: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            out[rel] = path.read_bytes()
        else:
            out[rel] = "dir" if path.is_dir() else "special"
    return out


# --------------------------------------------------------------------------- building files


@dataclass
class Base:
    """The pieces of one good model file: tensors, string metadata and its bytes."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]
    data: bytes


def layout(tensors: dict[str, torch.Tensor]) -> tuple[dict, bytes]:
    """A safetensors header (without metadata) and body for ``tensors``, contiguous, in key order."""
    header, chunks, offset = {}, [], 0
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        raw = t.numpy().tobytes()
        header[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    return header, b"".join(chunks)


def container(header: dict | str | bytes, body: bytes) -> bytes:
    """``<u64 header length><header><body>``; a dict header is JSON-encoded."""
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def with_meta(base: Base, **changes: str | None) -> bytes:
    """The good tensors with metadata fields replaced (None drops a field)."""
    meta = dict(base.meta)
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    header, body = layout(base.tensors)
    return container({"__metadata__": meta, **header}, body)


def with_params(base: Base, **changes: object) -> bytes:
    """The good tensors, model_params changed consistently with the top-level fields."""
    params = {**PARAMS, **changes}
    meta = dict(base.meta, model_params=json.dumps(params), num_classes=json.dumps(params["num_classes"]),
                input_shape=json.dumps([params["channels"], params["size"], params["size"]]))
    header, body = layout(base.tensors)
    return container({"__metadata__": meta, **header}, body)


def with_tensors(base: Base, tensors: dict[str, torch.Tensor]) -> bytes:
    header, body = layout(tensors)
    return container({"__metadata__": base.meta, **header}, body)


def edit_header(base: Base, edit: Callable[[dict], None], body: bytes | None = None) -> bytes:
    header, good_body = layout(base.tensors)
    header = {"__metadata__": dict(base.meta), **header}
    edit(header)
    return container(header, good_body if body is None else body)


def deep(n: int) -> str:
    return "[" * n + "]" * n


def _first(h: dict) -> dict:
    return h[sorted(k for k in h if k != "__metadata__")[0]]


def _last(h: dict) -> dict:
    return h[sorted(k for k in h if k != "__metadata__")[-1]]


def _set(entry: dict, **values: object) -> None:
    entry.update(values)


def _dup_tensor_key(base: Base) -> bytes:
    header, body = layout(base.tensors)
    key = sorted(header)[0]
    text = json.dumps({"__metadata__": base.meta, **header})
    dup = json.dumps({key: header[key]})[1:-1]
    return container(text[:-1] + ", " + dup + "}", body)


def _dup_meta_key(base: Base) -> bytes:
    header, body = layout(base.tensors)
    meta = json.dumps(base.meta)
    meta = meta[:-1] + ', "format": "fsapp-model"}'
    rest = json.dumps(header)[1:]
    return container('{"__metadata__": ' + meta + ", " + rest, body)


def _special_fifo(tmp: Path) -> Path:
    path = tmp / "model.safetensors"
    os.mkfifo(path)
    return path


def _special_dir(tmp: Path) -> Path:
    path = tmp / "model.safetensors"
    path.mkdir()
    return path


def _special_link_fifo(tmp: Path) -> Path:
    fifo = tmp / "pipe"
    os.mkfifo(fifo)
    path = tmp / "model.safetensors"
    path.symlink_to(fifo)
    return path


def _special_socket(tmp: Path) -> Path:
    path = tmp / "model.safetensors"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()  # the socket file stays
    return path


def _special_device(tmp: Path) -> Path:
    path = tmp / "model.safetensors"
    path.symlink_to("/dev/zero")
    return path


def _special_missing(tmp: Path) -> Path:
    return tmp / "absent.safetensors"


def _special_loop(tmp: Path) -> Path:
    path = tmp / "model.safetensors"
    path.symlink_to(path)
    return path


def _nan(base: Base, value: float) -> bytes:
    tensors = dict(base.tensors)
    key = sorted(k for k in tensors if k.endswith("weight"))[0]
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = value
    return with_tensors(base, tensors)


def _gap(base: Base) -> bytes:
    header, body = layout(base.tensors)
    last = header[sorted(header)[-1]]
    begin = last["data_offsets"][0]
    last["data_offsets"] = [x + 4 for x in last["data_offsets"]]
    return container({"__metadata__": base.meta, **header}, body[:begin] + b"\0" * 4 + body[begin:])


def _reshaped(base: Base) -> bytes:
    tensors = dict(base.tensors)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].reshape(-1)[:12].reshape(3, 4).clone()
    return with_tensors(base, tensors)


# Each case: (id, fragment of the expected message, builder). A builder returns the file's bytes
# (written as model.safetensors) or, for special files, makes the path itself.
Builder = Callable[[Base], bytes]
CONTAINER: list[tuple[str, str, Builder]] = [
    ("empty", "too short", lambda b: b""),
    ("too-short", "too short", lambda b: b"abc"),
    ("header-length-huge", "header claims", lambda b: struct.pack("<Q", 2**60) + b"{}"),
    ("header-past-end", "header claims", lambda b: struct.pack("<Q", 500) + b"{}"),
    ("header-length-zero", "header", lambda b: struct.pack("<Q", 0) + b"{}"),
    ("truncated", "", lambda b: b.data[:-10]),
    ("trailing-bytes", "", lambda b: b.data + b"\0" * 16),
    ("not-json", "header", lambda b: container("{nope", b"")),
    ("non-object-header", "header", lambda b: container("[1, 2, 3]", b"")),
    ("json-string-header", "header", lambda b: container('"hello"', b"")),
    ("bom", "header", lambda b: container(b"\xef\xbb\xbf" + b.data[8:8 + struct.unpack("<Q", b.data[:8])[0]],
                                          b.data[8 + struct.unpack("<Q", b.data[:8])[0]:])),
    ("invalid-utf8", "header", lambda b: container(b'{"\xff\xfe": 1}', b"")),
    ("nested-200k", "nested", lambda b: container('{"a": ' + deep(200_000) + "}", b"")),
    ("duplicate-tensor-key", "duplicate", _dup_tensor_key),
    ("duplicate-metadata-key", "duplicate", _dup_meta_key),
    ("offsets-overlap", "offset", lambda b: edit_header(b, lambda h: _set(_last(h), data_offsets=[0, _last(h)["data_offsets"][1] - _last(h)["data_offsets"][0]]))),
    ("offsets-out-of-bounds", "offset", lambda b: edit_header(b, lambda h: _set(_last(h), data_offsets=[_last(h)["data_offsets"][0], 10**12]))),
    ("offsets-gap", "offset", lambda b: _gap(b)),
    ("offsets-reversed", "offset", lambda b: edit_header(b, lambda h: _set(_first(h), data_offsets=list(reversed(_first(h)["data_offsets"]))))),
    ("offsets-negative", "offset", lambda b: edit_header(b, lambda h: _set(_first(h), data_offsets=[-4, 0]))),
    ("offsets-not-ints", "offset", lambda b: edit_header(b, lambda h: _set(_first(h), data_offsets=["0", "4"]))),
    ("offsets-three", "offset", lambda b: edit_header(b, lambda h: _set(_first(h), data_offsets=[0, 4, 8]))),
    ("dtype-shape-size-mismatch", "", lambda b: edit_header(b, lambda h: _set(_first(h), shape=[20, 64]))),
    ("unknown-dtype", "dtype", lambda b: edit_header(b, lambda h: _set(_first(h), dtype="Q7"))),
    ("dtype-not-string", "dtype", lambda b: edit_header(b, lambda h: _set(_first(h), dtype=7))),
    ("shape-negative", "shape", lambda b: edit_header(b, lambda h: _set(_first(h), shape=[-16, -64]))),
    ("shape-huge", "", lambda b: edit_header(b, lambda h: _set(_first(h), shape=[2**40, 2**40]))),
    ("shape-not-list", "shape", lambda b: edit_header(b, lambda h: _set(_first(h), shape="16x64"))),
    ("entry-not-object", "", lambda b: edit_header(b, lambda h: h.update(bogus=5))),
    ("entry-extra-field", "", lambda b: edit_header(b, lambda h: _set(_first(h), extra=1))),
    ("metadata-not-strings", "metadata", lambda b: edit_header(b, lambda h: h["__metadata__"].update(num_classes=10))),
    ("metadata-not-object", "metadata", lambda b: edit_header(b, lambda h: h.update(__metadata__=[1, 2]))),
    ("pickle-magic", "pickle", lambda b: b"\x80\x04\x95" + b"\0" * 64),
    ("zip-magic", "pickle", lambda b: b"PK\x03\x04" + b"\0" * 64),
]

METADATA: list[tuple[str, str, Builder]] = [
    ("num-classes-1e12", "num_classes", lambda b: with_params(b, num_classes=10**12)),
    ("hidden-1e9", "hidden", lambda b: with_params(b, hidden=10**9)),
    ("mlp-layers-1e7", "layers", lambda b: with_params(b, layers=10**7)),
    ("mlp-layers-too-many-for-file", "more than 80", lambda b: with_params(b, layers=100, hidden=4096)),
    ("mlp-in-range-but-huge", "parameters", lambda b: with_params(b, layers=1000, hidden=65536)),
    ("small-cnn-width-1e9", "width", lambda b: with_meta(b, model="small-cnn", model_params=json.dumps(
        {**{k: PARAMS[k] for k in ("num_classes", "channels", "size", "mean", "std")}, "width": 10**9}))),
    ("wrn-widen-1e9", "widen", lambda b: with_meta(b, model="wrn", model_params=json.dumps(
        {**{k: PARAMS[k] for k in ("num_classes", "channels", "size", "mean", "std")}, "widen": 10**9}))),
    ("wrn-depth-huge", "depth", lambda b: with_meta(b, model="wrn", model_params=json.dumps(
        {**{k: PARAMS[k] for k in ("num_classes", "channels", "size", "mean", "std")}, "depth": 6 * 166666666 + 4}))),
    ("wrn-28-10-in-tiny-file", "more than 80", lambda b: with_meta(b, model="wrn", model_params=json.dumps(
        {**{k: PARAMS[k] for k in ("num_classes", "channels", "size", "mean", "std")}, "depth": 28, "widen": 10}))),
    ("size-negative", "input_shape", lambda b: with_params(b, size=-8)),
    ("size-huge", "size", lambda b: with_params(b, size=10**6)),
    ("channels-zero", "channels", lambda b: with_params(b, channels=0)),
    ("num-classes-negative", "num_classes", lambda b: with_params(b, num_classes=-3)),
    ("num-classes-bool", "num_classes", lambda b: with_meta(b, num_classes="true")),
    ("num-classes-float", "num_classes", lambda b: with_meta(b, num_classes="10.5")),
    ("num-classes-vs-params", "num_classes", lambda b: with_meta(b, num_classes="5")),
    ("num-classes-vs-head", "", lambda b: with_params(b, num_classes=5)),
    ("eval-step-size-abc", "eval_step_size", lambda b: with_meta(b, eval_step_size="abc")),
    ("eval-eps-nan", "eval_eps", lambda b: with_meta(b, eval_eps="NaN")),
    ("eval-eps-1e300", "eval_eps", lambda b: with_meta(b, eval_eps="1e300")),
    ("eval-eps-list", "eval_eps", lambda b: with_meta(b, eval_eps="[0.1]")),
    ("input-shape-3ch-for-1ch", "input_shape", lambda b: with_meta(b, input_shape="[3, 8, 8]")),
    ("input-shape-short", "input_shape", lambda b: with_meta(b, input_shape="[1, 8]")),
    ("input-shape-strings", "input_shape", lambda b: with_meta(b, input_shape='["1", "8", "8"]')),
    ("input-shape-size-mismatch", "input_shape", lambda b: with_meta(b, input_shape="[1, 16, 16]")),
    ("mean-wrong-length", "mean", lambda b: with_meta(b, mean="[0.1, 0.2]")),
    ("std-wrong-length-in-params", "std", lambda b: with_params(b, std=[0.3, 0.3])),
    ("std-zero", "std", lambda b: with_params(b, std=[0.0])),
    ("mean-not-numbers", "mean", lambda b: with_meta(b, mean='["a"]')),
    ("model-params-not-object", "model_params", lambda b: with_meta(b, model_params="[1, 2]")),
    ("model-params-not-json", "model_params", lambda b: with_meta(b, model_params="{oops")),
    ("model-params-unknown-key", "unknown parameter", lambda b: with_params(b, bogus=1)),
    ("model-params-nested-100k", "nested", lambda b: with_meta(b, model_params='{"hidden": ' + deep(100_000) + "}")),
    ("dataset-params-nested-100k", "nested", lambda b: with_meta(b, dataset_params=deep(100_000))),
    ("dataset-params-not-object", "dataset_params", lambda b: with_meta(b, dataset_params="[1]")),
    ("dataset-not-a-name", "dataset", lambda b: with_meta(b, dataset='{"name": 1}')),
    ("unknown-model", "not available", lambda b: with_meta(b, model="resnet-9000")),
    ("model-name-markup", "model", lambda b: with_meta(b, model="[/x]")),
    ("format-version-99", "version", lambda b: with_meta(b, format_version="99")),
    ("format-other", "not an fsapp model file", lambda b: with_meta(b, format="something")),
    ("checkpoint-as-model", "not an fsapp model file", lambda b: with_meta(b, format="fsapp-checkpoint")),
    ("model-field-missing", "model", lambda b: with_meta(b, model=None)),
    ("missing-tensor", "missing keys net.3.weight", lambda b: with_tensors(b, {k: v for k, v in b.tensors.items() if k != sorted(b.tensors)[-1]})),
    ("renamed-tensor", "missing keys net.3.bias", lambda b: with_tensors(b, {("net.3.bais" if k == "net.3.bias" else k): v for k, v in b.tensors.items()})),
    ("extra-tensor", "unexpected", lambda b: with_tensors(b, {**b.tensors, "extra.weight": torch.zeros(2)})),
    ("wrong-shape", "", _reshaped),
    ("transposed", "has shape (64, 16)", lambda b: with_tensors(b, {**b.tensors, "net.1.weight": b.tensors["net.1.weight"].t().contiguous()})),
    ("wrong-dtype", "dtype", lambda b: with_tensors(b, {**b.tensors, sorted(b.tensors)[0]: b.tensors[sorted(b.tensors)[0]].double()})),
    ("nan-weights", "nan", lambda b: _nan(b, math.nan)),
    ("inf-weights", "nan or infinite", lambda b: _nan(b, math.inf)),
]

SPECIAL: list[tuple[str, str, Callable[[Path], Path]]] = [
    ("fifo", "not a regular file", _special_fifo),
    ("directory", "directory", _special_dir),
    ("symlink-to-fifo", "not a regular file", _special_link_fifo),
    ("socket", "not a regular file", _special_socket),
    ("device-file", "not a regular file", _special_device),
    ("missing-file", "not found", _special_missing),
    ("symlink-loop", "", _special_loop),
]

ALL_CASES = [("container", *c) for c in CONTAINER] + [("metadata", *c) for c in METADATA] + \
    [("special", *c) for c in SPECIAL]
# the kinds that also go through the real CLI (a subprocess each: about 1.5 s)
CLI_CASES = {
    "header-length-huge", "truncated", "nested-200k", "duplicate-tensor-key", "offsets-overlap", "bom",
    "num-classes-1e12", "mlp-layers-1e7", "wrn-depth-huge", "small-cnn-width-1e9", "eval-step-size-abc",
    "input-shape-3ch-for-1ch", "num-classes-vs-head", "model-params-nested-100k", "nan-weights",
    "fifo", "symlink-to-fifo", "device-file", "directory",
}


def make_case(tmp: Path, base: Base, build: Callable) -> Path:
    """Write one hostile case into ``tmp``; returns the path to give fsapp."""
    if build in [c[2] for c in SPECIAL]:
        return build(tmp)
    path = tmp / "model.safetensors"
    path.write_bytes(build(base))
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    """One tiny good model file (mlp, 1x8x8 digits)."""
    torch.manual_seed(0)
    model = get_registry().create("model", "mlp", **PARAMS)
    path = tmp_path_factory.mktemp("base") / "good.safetensors"
    save_model(path, model, model_metadata("mlp", PARAMS, dataset="digits",
                                           extra={"eval_eps": 0.2, "eval_step_size": 0.05}))
    data = path.read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + header_len])["__metadata__"]
    return Base({k: v.clone() for k, v in model.state_dict().items()}, meta, data)


def test_the_corpus_is_big_enough():
    assert len(CONTAINER) + len(SPECIAL) >= 35 and len(METADATA) >= 40
    assert len({c[1] for c in ALL_CASES}) == len(ALL_CASES)
    assert len(CLI_CASES & {c[1] for c in ALL_CASES}) == len(CLI_CASES) >= 15


def test_the_good_file_loads(base, tmp_path):
    path = tmp_path / "good.safetensors"
    path.write_bytes(base.data)
    model, meta = load_model_file(path)
    assert meta["num_classes"] == 10 and meta["eval_step_size"] == 0.05
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("category, name, fragment, build", ALL_CASES, ids=[c[1] for c in ALL_CASES])
def test_hostile_model_file_is_refused_in_process(base, tmp_path, category, name, fragment, build):
    path = make_case(tmp_path, base, build)
    before = tree(tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(UsageError) as info:
        load_model_file(path)
    elapsed = time.perf_counter() - t0
    message = str(info.value)
    assert "\n" not in message and message.strip(), message
    assert fragment.lower() in message.lower(), message
    assert elapsed < 2.0, f"{name} took {elapsed:.1f} s"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < RSS_LIMIT_KB
    assert tree(tmp_path) == before


CLI = [c for c in ALL_CASES if c[1] in CLI_CASES]


@pytest.mark.parametrize("category, name, fragment, build", CLI, ids=[c[1] for c in CLI])
def test_hostile_model_file_through_the_cli(base, tmp_path, category, name, fragment, build):
    work = tmp_path / "work"
    work.mkdir()
    path = make_case(work, base, build)
    before = tree(tmp_path)
    out = run_cli(["eval", str(path), "--n", "5"], work, timeout=30)
    assert out.code == 2, (out.code, out.stderr[-2000:])
    assert_one_clean_line(out.stderr)
    assert fragment.lower() in out.stderr.lower(), out.stderr
    assert out.seconds < TIME_LIMIT_S, f"{name} took {out.seconds:.1f} s"
    assert out.rss_kb < RSS_LIMIT_KB, f"{name} peaked at {out.rss_kb // 1024} MB"
    assert tree(tmp_path) == before


def test_good_file_through_the_cli_still_evaluates(base, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "good.safetensors").write_bytes(base.data)
    out = run_cli(["eval", "good.safetensors", "--n", "5", "--attack", "fgsm"], work, timeout=60)
    assert out.code == 0, out.stderr[-2000:]
    assert list((work / "eval").glob("*.json"))


# --------------------------------------------------------------------------- hypothesis

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**15), 10**15) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_param_values = st.one_of(_json, st.integers(-5, 70_000), st.sampled_from([0, 1, 2, 3, 8, 16, 10**9]))
_fields = ("format", "format_version", "model", "model_params", "num_classes", "input_shape", "mean", "std",
           "dataset", "dataset_params", "eval_eps", "eval_step_size", "epsilon")


@st.composite
def hostile_metadata(draw: st.DrawFn) -> dict[str, str]:
    """Good metadata with a few fields dropped, replaced by random JSON, or model params edited."""
    meta = json.loads(json.dumps(model_metadata("mlp", PARAMS, dataset="digits")))
    for key in draw(st.lists(st.sampled_from(_fields), max_size=4, unique=True)):
        action = draw(st.sampled_from(["drop", "json", "text", "param"]))
        if action == "drop":
            meta.pop(key, None)
        elif action == "json":
            meta[key] = draw(_json)
        elif action == "text":
            meta[key] = draw(st.text(max_size=12))
        else:
            params = dict(meta["model_params"]) if isinstance(meta.get("model_params"), dict) else dict(PARAMS)
            params[draw(st.sampled_from([*PARAMS, "width", "depth", "bogus"]))] = draw(_param_values)
            meta["model_params"] = params
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(meta=hostile_metadata())
def test_random_metadata_loads_or_is_refused_with_one_line(base, tmp_path, meta):
    path = tmp_path / "random.safetensors"
    save_file(base.tensors, path, metadata=meta)
    t0 = time.perf_counter()
    try:
        model, parsed = load_model_file(path)
    except UsageError as exc:
        assert "\n" not in str(exc)
    else:
        assert parsed["num_classes"] == 10
        assert model(torch.rand(1, 1, 8, 8)).shape == (1, 10)
    assert time.perf_counter() - t0 < 2.0
