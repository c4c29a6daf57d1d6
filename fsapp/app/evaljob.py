"""The eval job: evaluate a model file, as ``fsapp eval`` and the TUI's Evaluate screen both do.

:class:`EvalRequest` says what to evaluate; :func:`run_eval` runs it and returns the JSON report.
The job owns everything between the options and the rendering: reading the model file once (the
report's ``model_sha256`` is the digest of the bytes loaded), rebuilding the test split from the
dataset parameters the file records, eps and step defaults from its metadata, suites, sweeps
(through :func:`fsapp.engine.sweep.run_sweep`, so the curve flags are raised), transfer attacks,
the resumable state, the report, the PNG curves and the RobustBench entry.

Progress is reported as engine events (:mod:`fsapp.engine.events`) to a callback and, with
``events=PATH``, appended to that file as JSON lines: one ``EvalStarted``, ``EvalProgress`` per
batch and stage, then ``EvalFinished`` with the report path, or ``JobFailed`` with the one-line
error. Under ``torchrun`` every process evaluates its share; rank 0 writes and returns the report.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fsapp.app.examples import save_examples
from fsapp.app.request import EvalRequest
from fsapp.data import to_unit
from fsapp.engine import events as ev
from fsapp.engine.evaluate import SUITES
from fsapp.errors import FsappError, UsageError
from fsapp.registry import eps_text

DEFAULT_ATTACKS: tuple[str, ...] = SUITES["default"]
"""What an evaluation runs when it names no attack, suite or sweep."""
DEFAULT_TRANSFER: tuple[str, ...] = ("pgd:steps=20",)
"""What a transfer evaluation crafts on the source model when it names no attack."""
FILE_PARAMS = ("root", "download", "check_integrity")
"""Dataset parameters that say where files live, not what the data are."""

OnEvent = Callable[[ev.Event], Any]


# --------------------------------------------------------------------------- the job


def run_eval(request: EvalRequest, on_event: OnEvent | None = None) -> dict[str, Any] | None:
    """Run ``request``; returns the JSON report (also written to ``eval/`` beside the model or to
    ``out``). Events go to ``on_event`` and, with ``request.events``, to that file. Under torchrun
    only rank 0 returns the report (the others return None)."""
    stream = _EventFile(request.events, os.environ.get("RANK", "0") == "0")

    def emit(event: ev.Event) -> None:
        if not isinstance(event, ev.Warning):  # the file holds the job's own events only
            stream.write(event)
        if on_event is not None:
            on_event(event)

    try:
        return _run(request, emit, stream)
    except BaseException as exc:
        message = str(exc) if isinstance(exc, FsappError) else f"{type(exc).__name__}: {exc}"
        try:
            stream.write(ev.JobFailed(message))
        except FsappError:
            pass
        raise
    finally:
        stream.close()


def _run(req: EvalRequest, emit: Callable[[ev.Event], None], stream: "_EventFile") -> dict[str, Any] | None:
    from fsapp.checkpoint import load_model_file_digest
    from fsapp.engine import distributed as ddp
    from fsapp.engine.distributed import pick_device
    from fsapp.engine.evaluate import evaluate
    from fsapp.engine.sweep import parse_sweep, run_sweep

    if req.n < 1:
        raise UsageError(f"--n must be >= 1, got {req.n}")
    if req.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {req.batch_size}")
    sweep_list = [parse_sweep(s) for s in req.sweeps]
    if req.landscape:
        check_landscape(req)
    dev = ddp.local_device(pick_device(req.device))
    shard = ddp.init_from_env(dev)
    lead = shard.rank == 0
    stream.enabled = lead
    model, meta, model_sha = load_model_file_digest(req.model, dev)
    eps_value, step_size = eps_and_step(req.eps, meta, req.model)
    src_model, source_sha = _load_source(req, meta, dev)
    white, transfer, notes = attack_lists(req, bool(sweep_list))
    x, y = load_test_split(meta, req.n, req.seed, req.data_root, req.model)

    target = req.out if req.out is not None else req.model.parent / "eval" / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    settings = {"model_sha256": model_sha, "source_sha256": source_sha, "attacks": white, "transfer": transfer,
                "n": req.n, "seed": req.seed, "batch_size": req.batch_size, "eps": eps_value, "step_size": step_size,
                "sweeps": list(req.sweeps), "dataset": meta.get("dataset"),
                "dataset_params": meta.get("dataset_params")}
    state_file = _state_path(target.parent, settings, req.state, shard.rank, shard.world)
    if req.resume and not state_file.exists():
        raise UsageError(f"no interrupted evaluation to resume: {state_file} does not exist")
    if lead and not req.resume and state_file.exists():
        emit(ev.Warning(f"an interrupted evaluation of these settings exists ({state_file}); starting over "
                        "(use --resume to continue it)"))
    defaults = {"eps": eps_value, "step_size": step_size}
    common: dict[str, Any] = dict(batch_size=req.batch_size, device=dev, seed=req.seed, shard=shard.active,
                                  fingerprint={"model_sha256": model_sha, "source_sha256": source_sha})
    emit(ev.EvalStarted(str(req.model), req.n, white + transfer, list(req.sweeps), str(target)))
    prefix = [""]

    def on_batch(p: Any) -> None:
        emit(ev.EvalProgress(prefix[0] + p.key, p.stage or "", p.done, p.total, p.robust))

    t_job = time.perf_counter()
    sweeps_out: list[dict[str, Any]] = []
    try:
        report = evaluate(model, x, y, white, defaults=defaults, source=src_model, transfer=transfer,
                          on_batch=on_batch, state=state_file, resume=req.resume, **common)
        for j, (key, values) in enumerate(sweep_list):
            def label(i: int, value: float, key: str = key) -> None:
                prefix[0] = f"{key}={eps_text(value) if key == 'eps' else value} "

            sweeps_out.append(run_sweep(model, x, y, list(req.attacks) or list(DEFAULT_ATTACKS), key, values,
                                        defaults=defaults, on_point=label, on_batch=on_batch,
                                        state=state_file.with_name(f"{state_file.name}.sweep{j}"),
                                        resume=req.resume, **common))
    except KeyboardInterrupt:
        raise FsappError(f"interrupted; finished batches are saved in {state_file}: run the same command with "
                         "--resume to continue") from None
    if shard.active:
        ddp.barrier()

    data = report_data(req, meta, model_sha, source_sha, str(dev), white, transfer, (eps_value, step_size),
                       report.to_dict(), sweeps_out, notes)
    if req.landscape and lead:
        data["landscape"] = landscapes(req, model, x.to(dev), y.to(dev), eps_value, dev, target, data["notes"])
    if not lead:
        _remove_states(state_file)
        ddp.finish()
        return None
    save_examples(model, x, y, data, target, defaults)  # beside the report, named in it (fsapp.app.examples)
    write_outputs(data, meta, target, req.robustbench_json, state_file)
    _remove_states(state_file)
    if shard.active:
        ddp.finish()
    emit(ev.EvalFinished(str(target), dict(data["accuracy"]), data["flags"], time.perf_counter() - t_job))
    return data


def check_landscape(req: EvalRequest) -> None:
    """Refuse a bad landscape request before anything runs (one line each)."""
    from fsapp.engine.landscape import DIRECTIONS

    if req.landscape_direction not in DIRECTIONS:
        raise UsageError(f"--landscape-direction {req.landscape_direction!r} is not known; valid: "
                         f"{', '.join(DIRECTIONS)}")
    if not 2 <= req.grid <= 401:
        raise UsageError(f"--grid must be in 2..401, got {req.grid}")
    bad = [i for i in req.landscape_index if not 0 <= i < req.n]
    if bad:
        raise UsageError(f"--index {bad[0]} is out of range; valid: 0..{req.n - 1} (the --n evaluated test samples)")


_DIRECTION_TEXT = {"grad": "CE input gradient", "pgd": "PGD-20 perturbation"}


def landscapes(req: EvalRequest, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
               device: torch.device, target: Path, notes: list[str]) -> dict[str, Any]:
    """Figure 4: each model's loss surface around each ``--index`` test sample (the grid in the
    report, one PNG per sample with a panel per model on a shared z-scale)."""
    from fsapp.checkpoint import load_model_file_digest
    from fsapp.engine.landscape import landscape, plot_surfaces

    x = to_unit(x) if x.dtype == torch.uint8 else x

    models: list[tuple[str, Path, torch.nn.Module, str | None]] = [(req.model.stem, req.model, model, None)]
    for other in req.compare:
        m, other_meta, sha = load_model_file_digest(other, device)
        if list(other_meta["input_shape"]) != list(x.shape[1:]):
            raise UsageError(f"--compare {other} does not take this model's inputs {list(x.shape[1:])}")
        models.append((other.stem, other, m, sha))
    names = [n for n, *_ in models]
    if len(set(names)) < len(names):  # two run directories' model.safetensors: name them by folder
        names = [f"{p.parent.name}/{p.stem}" for _, p, *_ in models]
    entries = []
    surfaces = {}
    for name, (_, path, m, sha) in zip(names, models, strict=True):
        got, _ = landscape(m, x, y, list(req.landscape_index), eps, grid=req.grid, direction=req.landscape_direction,
                           clip=req.clip, seed=req.seed)
        surfaces[name] = got
        entries.append({"name": name, "model": str(path), "model_sha256": sha, "surfaces": [s.to_dict() for s in got]})
    pngs = []
    for k, index in enumerate(req.landscape_index):
        png = target.with_name(f"{target.stem}-landscape-{index}.png")
        panels = [(name, surfaces[name][k]) for name in names]
        title = (f"test sample {index}: CE along d_a ({req.landscape_direction}) and d_r (Rademacher), eps "
                 f"{eps_text(eps)}{', inputs clipped to [0, 1]' if req.clip else ', not clipped'}")
        try:
            pngs.append(str(plot_surfaces(panels, png, title)))
        except UsageError as exc:
            notes.append(str(exc))
            break
        except OSError as exc:
            notes.append(f"cannot write the landscape {png}: {exc.strerror or exc}")
    clip_note = ("inputs clipped to [0, 1] at every grid point" if req.clip else
                 "inputs NOT clipped to [0, 1] (--no-clip): points may leave the image domain")
    notes.append(f"landscape: {clip_note}")
    return {"indices": list(req.landscape_index), "grid": req.grid, "eps": eps, "clip": req.clip,
            "directions": {"d_a": f"sign of the {_DIRECTION_TEXT.get(req.landscape_direction, '?')} of each model "
                                  "at the sample", "d_r": f"Rademacher (+-1 per pixel), seed {req.seed}",
                           "kind": req.landscape_direction},
            "models": entries, "png": pngs}


def _load_source(req: EvalRequest, meta: dict[str, Any], device: torch.device
                 ) -> tuple[torch.nn.Module | None, str | None]:
    """The ``--source`` model of a transfer evaluation and the digest of its bytes, checked to take
    the same inputs and classes as the evaluated model."""
    from fsapp.checkpoint import load_model_file_digest

    if req.source is None:
        return None, None
    src_model, src_meta, source_sha = load_model_file_digest(req.source, device)
    if list(src_meta["input_shape"]) != list(meta["input_shape"]) or src_meta["num_classes"] != meta["num_classes"]:
        raise UsageError(f"--source {req.source} takes {src_meta['input_shape']} inputs and "
                         f"{src_meta['num_classes']} classes; {req.model} takes {meta['input_shape']} and "
                         f"{meta['num_classes']}")
    return src_model, source_sha


def report_data(req: EvalRequest, meta: dict[str, Any], model_sha: str, source_sha: str | None, device: str,
                white: list[str], transfer: list[str], eps_step: tuple[float, float], evaluated: dict[str, Any],
                sweeps: list[dict[str, Any]], notes: list[str]) -> dict[str, Any]:
    """The JSON report: what was evaluated and how, the evaluator's report, the sweeps, every flag."""
    from fsapp._version import __version__

    flags = list(evaluated["flags"])
    for sw in sweeps:
        flags += [f for f in sw["flags"] if f not in flags]
    return {
        "fsapp_version": __version__,
        "model": str(req.model),
        "model_sha256": model_sha,
        "architecture": architecture(meta),
        "dataset": meta.get("dataset"),
        "num_classes": meta.get("num_classes"),
        "seed": req.seed,
        "device": device,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {"suites": list(req.suites), "attacks": white, "transfer": transfer,
                     "source": str(req.source) if req.source is not None else None, "source_sha256": source_sha,
                     "eps": eps_step[0], "step_size": eps_step[1], "batch_size": req.batch_size,
                     "sweeps": list(req.sweeps),
                     "sample_order": f"first n of torch.randperm(test size) with seed {req.seed}, sorted"},
        **evaluated,
        "flags": flags,
        "sweeps": sweeps,
        "notes": notes,
    }


class _EventFile:
    """``--events FILE``: the job's events as JSON lines, opened on the first event (rank 0 only)."""

    def __init__(self, path: Path | None, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        self.log: Any = None

    def write(self, event: ev.Event) -> None:
        if self.path is None or not self.enabled:
            return
        from fsapp.engine.rundir import RunLog

        try:
            if self.log is None:
                self.log = RunLog(self.path)
            self.log.write(event)
        except OSError as exc:
            path, self.path = self.path, None  # no second attempt (the failure line goes to stderr)
            raise UsageError(f"cannot write the events file {path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


# --------------------------------------------------------------------------- settings


def eps_and_step(eps: str | None, meta: dict[str, Any], path: Path) -> tuple[float, float]:
    """The threat model's eps (``--eps`` text, else the file's ``eval_eps``, else 8/255) and the step
    for attacks that name none (eps/4 with ``--eps``, else the file's ``eval_step_size``)."""
    from fsapp.registry import parse_float

    if eps is not None:
        try:
            value = parse_float(eps)
        except ValueError as exc:
            raise UsageError(f"bad --eps: {exc}") from None
        if not 0 <= value <= 1:
            raise UsageError(f"bad --eps: {eps} is outside 0..1 (inputs live in [0, 1])")
        return value, value / 4
    value = _meta_fraction(meta, "eval_eps", 8 / 255, path)
    return value, _meta_fraction(meta, "eval_step_size", value / 4, path)


def _meta_fraction(meta: dict[str, Any], key: str, default: float, path: Path) -> float:
    raw = meta.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise UsageError(f"{path}: metadata field '{key}' = {str(raw)[:40]!r} is not a number") from None
    if not 0 <= value <= 1:
        raise UsageError(f"{path}: metadata field '{key}' = {value:g} is outside 0..1")
    return value


def expand_suites(suites: list[str]) -> list[str]:
    """The attack specs of the named suites, in order, without repeats."""
    specs: list[str] = []
    for suite in suites:
        if suite not in SUITES:
            raise UsageError(f"unknown suite '{suite}'; available: {', '.join(SUITES)}")
        specs += [s for s in SUITES[suite] if s not in specs]
    return specs


def attack_lists(req: EvalRequest, sweeping: bool) -> tuple[list[str], list[str], list[str]]:
    """(white-box specs, transfer specs, notes) of a request."""
    white = expand_suites(list(req.suites))
    transfer: list[str] = []
    if req.source is not None:
        transfer = list(req.attacks) or list(DEFAULT_TRANSFER)
    else:
        white += [a for a in req.attacks if a not in white]
    if not white and not transfer and not sweeping and not req.landscape:
        white = list(DEFAULT_ATTACKS)
    notes: list[str] = []
    if req.robustbench_json is not None and not any(s.split(":")[0] == "autoattack" for s in white):
        white.append("autoattack")
        notes.append("added the standard AutoAttack for --robustbench-json")
    return white, transfer, notes


# --------------------------------------------------------------------------- data


def recorded_dataset_params(meta: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """The dataset parameters the model file records (``dataset_params``), or None for older files."""
    raw = meta.get("dataset_params")
    if raw is None:
        return None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except (ValueError, RecursionError):
            raise UsageError(f"{path}: metadata field 'dataset_params' is not valid JSON") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: metadata field 'dataset_params' must be an object")
    return raw


def build_dataset(meta: dict[str, Any], data_root: str | None, path: Path) -> Any:
    """The dataset the model was trained on, rebuilt with the parameters its file records.

    ``data_root`` (when given) replaces the recorded ``root``; evaluation never downloads. A file
    without recorded parameters is accepted only for datasets whose parameters say where files
    live, not what the data are; parameters the installed dataset does not take are refused.
    """
    from fsapp.plugins import get_registry

    name = meta.get("dataset") or ""
    if not name:
        raise UsageError(f"{path} names no dataset; evaluate it from Python with fsapp.evaluate")
    component = get_registry().get("dataset", name)
    fields = [f.name for f in dataclasses.fields(component.params)]
    recorded = recorded_dataset_params(meta, path)
    if recorded is None:
        content = [f for f in fields if f not in FILE_PARAMS]
        if content:
            raise UsageError(f"{path} does not record the parameters of dataset '{name}' "
                             f"({', '.join(content)}), and they decide its test split; save the model with a "
                             "current fsapp (it records them) or evaluate it from Python with fsapp.evaluate")
        recorded = {}
    unknown = sorted(set(recorded) - set(fields))
    if unknown:
        raise UsageError(f"{path} records dataset '{name}' parameter(s) {', '.join(unknown)} that the installed "
                         f"dataset does not take (valid: {', '.join(fields) or 'none'}); cannot rebuild its data")
    params = dict(recorded)
    if "root" in fields:
        params["root"] = data_root if data_root is not None else str(recorded.get("root", "data"))
    if "download" in fields:
        params["download"] = False
    try:
        return component.build(params)
    except UsageError as exc:
        raise UsageError(f"{path}: cannot rebuild dataset '{name}' from the parameters it records: {exc}") from None


def load_test_split(meta: dict[str, Any], n: int, seed: int, data_root: str | None,
                    path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` test samples of a seeded order, from the dataset the model file records."""
    dataset = build_dataset(meta, data_root, path)
    if tuple(dataset.shape) != tuple(meta["input_shape"]):
        raise UsageError(f"dataset '{meta['dataset']}' has shape {tuple(dataset.shape)}, the model expects "
                         f"{tuple(meta['input_shape'])}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset.y_test), generator=g)[:n].sort().values
    return dataset.x_test[idx], dataset.y_test[idx]


# --------------------------------------------------------------------------- outputs


def architecture(meta: dict[str, Any]) -> str:
    """A readable architecture name from model metadata (e.g. ``WideResNet-28-10``)."""
    name = meta.get("model", "?")
    params = meta.get("model_params") or {}
    if name == "wrn":
        return f"WideResNet-{params.get('depth', '?')}-{params.get('widen', '?')}"
    if name == "preact-resnet18":
        return "PreActResNet-18"
    shown = {k: v for k, v in params.items() if k not in ("num_classes", "channels", "size", "mean", "std")}
    return name + ("(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")" if shown else "")


def robustbench_entry(data: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """A RobustBench leaderboard entry (model_info JSON) from an evaluation with AutoAttack."""
    acc = data["accuracy"]
    key = next((k for k in acc if k.split(":")[0] == "autoattack"), None)
    if key is None:
        raise UsageError("--robustbench-json needs the standard AutoAttack result (--suite autoattack)")
    threat = data["threat_model"] or {}
    return {
        "link": "",
        "name": meta.get("run") or Path(data["model"]).stem,
        "authors": "",
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": data.get("dataset") or "",
        "venue": "",
        "architecture": architecture(meta),
        "eps": eps_text(threat.get("eps")),
        "threat_model": threat.get("norm") or "Linf",
        "clean_acc": f"{100 * acc['clean']:.2f}",
        "reported": "",
        "autoattack_acc": f"{100 * acc[key]:.2f}",
        "footnote": f"evaluated with fsapp {data.get('fsapp_version', '')} on {data['n']} test samples "
                    f"(seed {data['seed']}); standard AutoAttack",
        "unreliable": any(f["id"] in ("random-forward", "black-box-beats-white-box") for f in data["flags"]),
        "n_eval": data["n"],
        "model_sha256": data.get("model_sha256"),
    }


def write_outputs(data: dict[str, Any], meta: dict[str, Any], target: Path, robustbench_json: Path | None,
                  state_file: Path) -> None:
    """The PNG curves (a failure is a note in the report), the report, the RobustBench entry; a failed
    write is one line saying what was kept."""
    from fsapp.checkpoint import atomic_write_text
    from fsapp.engine.sweep import save_png

    for sw in data["sweeps"]:
        png = target.with_name(f"{target.stem}-sweep-{sw['key']}.png")
        try:
            sw["png"] = str(save_png(sw, png, f"{Path(data['model']).name}: accuracy vs {sw['key']} (n={sw['n']})"))
        except UsageError as exc:
            data["notes"].append(str(exc))
        except OSError as exc:
            data["notes"].append(f"cannot write the curve {png}: {exc.strerror or exc}")
    try:
        atomic_write_text(target, json.dumps(data, indent=2) + "\n")
    except OSError as exc:
        raise UsageError(f"cannot write the report to {target}: {exc.strerror or exc}; every finished batch is kept "
                         f"in {state_file}: fix it and rerun the same command with --resume") from None
    if robustbench_json is not None:
        try:
            atomic_write_text(robustbench_json, json.dumps(robustbench_entry(data, meta), indent=2) + "\n")
        except OSError as exc:
            raise UsageError(f"cannot write the RobustBench entry to {robustbench_json}: {exc.strerror or exc}; "
                             f"the report was written to {target}") from None


def _state_path(target_dir: Path, settings: dict[str, Any], state: Path | None, rank: int, world: int) -> Path:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = state if state is not None else target_dir / f".state-{digest}.json"
    return path if world == 1 else path.with_name(f"{path.name}.rank{rank}of{world}")


def _remove_states(state_file: Path) -> None:
    """Delete an evaluation's state files (its sweeps' too) once the report is written."""
    if state_file.parent.is_dir():
        for path in state_file.parent.glob(glob.escape(state_file.name) + "*"):
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
