"""The training loop: Feature Scattering and its baselines, one epoch after another.

Reads top to bottom: open the run (config, run directory, resume checks), resolve the config
once into a plan (:mod:`fsapp.engine.plan`), build the job (device, data, model, adversary,
optimiser), restore or record, then for each epoch and batch: augment on the device, perturb,
update; serve requests from the control channel at step boundaries; at the end of each epoch
evaluate on a fixed held-out subset and checkpoint; finally write the model. It yields events
and never prints. The job's randomness is its own (:mod:`fsapp.engine.randomness`).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fsapp._version import __version__
from fsapp.checkpoint import (
    atomic_write_text,
    model_metadata,
    restore_checkpoint,
    save_checkpoint,
    save_model,
)
from fsapp.config import Config, from_tables, load, load_tables, to_toml
from fsapp.data import (
    TrainValidationSplit,
    augment_crop_flip,
    batch_generator,
    epoch_order,
    iterate_batches,
    split_train_validation,
    steps_per_epoch,
    to_unit,
)
from fsapp.engine import distributed as ddp
from fsapp.engine import events as ev
from fsapp.engine.distributed import pick_device
from fsapp.engine.evaluate import evaluate
from fsapp.engine.guard import GuardedPerturbation
from fsapp.engine.plan import RunPlan, lr_at, plan_run
from fsapp.engine.randomness import owning_randomness
from fsapp.engine.resume import check_config, check_extension, checkpoint_state, refuse_finished
from fsapp.engine.rundir import (
    BEST,
    CHECKPOINT,
    CONFIG,
    MANIFEST,
    METRICS,
    MODEL,
    Control,
    ControlChannel,
    NullLog,
    RunLock,
    RunLog,
    new_run_dir,
)
from fsapp.engine.runfiles import DDP_INFO, refuse_foreign, remove_own_temp_files, write_failed
from fsapp.engine.step import training_step
from fsapp.errors import TrainingAborted, UsageError
from fsapp.plugins import BUILTIN_PLUGIN

__all__ = ["as_config", "lr_at", "pick_device", "train"]


def as_config(config: Config | dict[str, Any] | str | Path | None) -> Config:
    """A Config from a Config, a dict of sections, a preset name or a TOML file (None: demo)."""
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return from_tables(config)
    return load(config)


def train(
    config: Config | dict[str, Any] | str | Path | None = None,
    run_dir: str | Path | None = None,
    resume: str | Path | None = None,
    control: Control | None = None,
    *,
    extend_epochs: int | None = None,
) -> Iterator[ev.Event]:
    """Train as configured; yields events. ``resume`` continues a run directory's checkpoint;
    ``extend_epochs`` (with ``resume``) trains it on to that many epochs in all."""
    return owning_randomness(_run(config, run_dir, resume, control or Control.new(), extend_epochs))


# -- the job and where it is -------------------------------------------------------------------


@dataclass
class Job:
    """What the loop runs on, fixed once set up."""

    plan: RunPlan
    run_path: Path
    dd: ddp.Dist
    control: Control
    dataset: Any
    model: torch.nn.Module  # the module whose weights are trained, checkpointed and saved
    net: torch.nn.Module  # what the training forward runs through (DDP, torch.compile)
    perturb: Any
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    model_params: dict[str, Any]
    channel: ControlChannel | None = None
    log: RunLog = field(default_factory=NullLog)
    data: dict[str, torch.Tensor] = field(default_factory=dict)
    split: TrainValidationSplit | None = None  # training images held out for live evaluation
    x_validation: torch.Tensor | None = None  # uint8, on the host
    y_validation: torch.Tensor | None = None
    best: float | None = None  # the best eval.select value so far (best.safetensors holds it)

    @property
    def eval_split(self) -> str:
        """Where live evaluation runs: ``validation`` (held out of the training split) or ``test``."""
        return "validation" if self.split is not None and len(self.split.validation) else "test"

    @property
    def cfg(self) -> Config:
        return self.plan.cfg

    @property
    def device(self) -> torch.device:
        return self.dd.device

    @property
    def inner(self) -> torch.nn.Module:
        """The local module attacks and evaluation call (never the DDP wrapper)."""
        return ddp.unwrap(self.net)

    @property
    def per_epoch(self) -> int:
        return steps_per_epoch(len(self.data["y_train"]), self.cfg.data.batch_size)

    @property
    def sync_each_step(self) -> bool:
        """A skipped batch is read on the host after every step on the CPU (free there); on a GPU
        the skip happens on the device and skipped batches are counted at log points."""
        checks = self.cfg.run.host_checks
        return checks == "every-step" or (checks == "auto" and self.device.type == "cpu")

    def emit(self, event: ev.Event, kept: str) -> ev.Event:
        """Append ``event`` to metrics.jsonl; a failed write is one line saying what was kept."""
        try:
            return self.log.write(event)
        except OSError as exc:
            raise TrainingAborted(write_failed(self.run_path / METRICS, exc, kept)) from None


@dataclass
class Progress:
    """Where the loop is; changes every step."""

    epoch: int = 0
    start_step: int = 0
    global_step: int = 0
    bad_total: int = 0
    steps_here: int = 0
    stopped: bool = False
    t_start: float = field(default_factory=time.perf_counter)
    kept: str = "nothing was trained yet"  # what a failed write leaves behind


@dataclass
class Tally:
    """One epoch's running sums, kept on the device (read at log points)."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: torch.Tensor
    pending_bad: torch.Tensor
    last_loss: torch.Tensor | None = None
    bad_epoch: int = 0
    window_n: int = 0
    window_t: float = field(default_factory=time.perf_counter)
    t_epoch: float = field(default_factory=time.perf_counter)

    @classmethod
    def zeros(cls, device: torch.device) -> "Tally":
        long = {"device": device, "dtype": torch.long}
        return cls(torch.zeros((), device=device), torch.zeros((), **long), torch.zeros((), **long),
                   torch.zeros((), **long))


# -- the run, top to bottom ----------------------------------------------------------------------


@dataclass
class Opening:
    """A run opened for training: its plan and directory and, when resuming from a checkpoint,
    the state the checkpoint records (read from its header)."""

    plan: RunPlan
    run_path: Path
    state: dict[str, Any] | None = None
    extended_from: int | None = None  # the epochs before ``--set schedule.epochs=N`` on resume
    notes: list[str] = field(default_factory=list)  # warnings for the event log


def _run(config: Any, run_dir: Any, resume: Any, control: Control, extend_epochs: int | None) -> Iterator[ev.Event]:
    opening = _open(config, run_dir, resume, extend_epochs)
    job = _build(opening.plan, opening.run_path, control)
    lock = _take_run_dir(job)
    try:
        prog = Progress()
        _restore_or_record(job, prog, opening, resuming=resume is not None)
        events = _loop(job, prog, opening)
        if job.dd.is_main:
            yield from events
        else:  # other ranks train silently (the CLI of every rank would print the same lines)
            for _ in events:
                pass
    finally:
        if lock is not None:
            lock.release()
        ddp.shutdown(job.dd)


def _open(config: Any, run_dir: Any, resume: Any, extend_epochs: int | None) -> Opening:
    """Refuse before anything is written: a foreign directory, a finished run, a config.toml that
    no longer matches its checkpoint, fewer epochs."""
    if resume is None:
        cfg = as_config(config)
        run_path = Path(run_dir) if run_dir is not None else new_run_dir(
            cfg.run.runs_dir, cfg.run.name, cfg.method.perturbation, cfg.data.name)
        refuse_foreign(run_path)
        return Opening(plan_run(cfg), run_path)
    run_path = Path(resume)
    if not (run_path / CONFIG).is_file():
        raise UsageError(f"cannot resume {run_path}: no config.toml there (not a run directory)")
    state = checkpoint_state(run_path / CHECKPOINT) if (run_path / CHECKPOINT).exists() else None
    checked = state is not None and check_config(run_path, state, run_path / CONFIG)  # before validation
    cfg = load(run_path / CONFIG, _older_split(run_path / CONFIG))
    extend = extend_epochs is not None and extend_epochs != cfg.schedule.epochs
    if not extend:
        refuse_finished(run_path, cfg.schedule.epochs)
    opening = Opening(plan_run(cfg), run_path, state)
    if state is not None and not checked:
        opening.notes.append(f"{CHECKPOINT} records no configuration (written by an older fsapp): "
                             f"{CONFIG} was not checked against it")
    if extend:
        check_extension(cfg.schedule.epochs, extend_epochs)
        longer = dataclasses.replace(cfg.schedule, epochs=extend_epochs)
        opening.plan = plan_run(dataclasses.replace(cfg, schedule=longer))
        opening.extended_from = cfg.schedule.epochs
    return opening


def _older_split(config_file: Path) -> list[str]:
    """A run written before ``data.validation`` existed trained on its whole training split and
    evaluated on the test split: resume it that way."""
    tables, _ = load_tables(config_file)
    data = tables.get("data")
    return ["data.validation=0"] if isinstance(data, dict) and "validation" not in data else []


def _build(plan: RunPlan, run_path: Path, control: Control) -> Job:
    """Device, process group, data, model, adversary and optimiser, in the order that fixes the
    random draws (seed, dataset, model initialisation)."""
    cfg = plan.cfg
    dd = ddp.setup(pick_device(cfg.run.device))  # torchrun: join the group, take cuda:LOCAL_RANK
    run_path = Path(ddp.broadcast_text(str(run_path), dd))  # rank 0's (timestamped) name
    torch.manual_seed(cfg.run.seed)
    full = plan.dataset.build()
    split = split_train_validation(len(full.y_train), cfg.data.validation, cfg.data.validation_seed,
                                   cfg.data.train_limit)
    dataset = full.select_train(split.train)
    model_part = plan.model_for(dataset)
    model = model_part.build().to(dd.device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.run.sync_bn and dd.active:
        if dd.device.type != "cuda":
            raise UsageError("run.sync_bn needs CUDA devices (torch's SyncBatchNorm); drop it on the CPU")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if dd.rank > 0:  # each rank's share of the batch gets its own random starts
        torch.manual_seed(cfg.run.seed + 7919 * dd.rank)
    net = ddp.wrap(torch.compile(model) if cfg.run.compile else model, dd)
    optimizer = plan.optimizer_for(model)
    scaler = torch.amp.GradScaler(dd.device.type, enabled=cfg.run.precision == "fp16")
    perturb = _perturbation(plan, dataset.num_classes)
    job = Job(plan, run_path, dd, control, dataset, model, net, perturb, optimizer, scaler, model_part.given,
              split=split)
    job.x_validation, job.y_validation = full.x_train[split.validation], full.y_train[split.validation]
    return job


def _perturbation(plan: RunPlan, num_classes: int) -> Any:
    """The training perturbation; a plugin's is guarded (eps-ball, [0, 1], finite; soft-label
    targets [B, num_classes], finite, rows summing to 1)."""
    part = plan.perturbation
    perturb = part.build()
    if part.plugin != BUILTIN_PLUGIN:
        perturb = GuardedPerturbation(perturb, part.given.get("epsilon"), part.name, part.plugin, num_classes)
    return perturb


def _take_run_dir(job: Job) -> RunLock | None:
    """Create the run directory, take its lock (rank 0 writes it), listen for requests and remove
    a killed writer's temp files (fsapp's own names only)."""
    try:
        job.run_path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create run directory {job.run_path}: {exc.strerror}") from None
    if not job.dd.is_main:
        return None
    lock = RunLock.acquire(job.run_path)
    try:
        job.channel = ControlChannel(job.run_path)  # requests from other processes
        job.channel.discard_stale()
        remove_own_temp_files(job.run_path)
    except OSError as exc:
        lock.release()
        raise TrainingAborted(write_failed(job.run_path, exc, "nothing was trained")) from None
    return lock


def _restore_or_record(job: Job, prog: Progress, opening: Opening, resuming: bool) -> None:
    """Resuming: the checkpoint's weights, optimiser, RNG and counters. Otherwise: config.toml
    and manifest.json. Then the event log and the data on the device."""
    run_path, dd = job.run_path, job.dd
    if not resuming and ((run_path / CHECKPOINT).exists() or (run_path / CONFIG).exists()):
        raise UsageError(f"{run_path} already holds a run; resume it with --resume {run_path}")
    ddp.barrier(dd)  # every rank has looked before rank 0 writes
    if opening.state is not None:
        _restore(job, prog)
    elif dd.is_main:
        _write(run_path / CONFIG, to_toml(job.plan.tables), "nothing was trained")
        _write(run_path / MANIFEST, json.dumps(_manifest(job), indent=2) + "\n", "nothing was trained")
    if opening.extended_from is not None and dd.is_main:
        _record_extension(job, prog, opening.extended_from)
    try:
        job.log = RunLog(run_path / METRICS) if dd.is_main else NullLog()
    except OSError as exc:
        raise TrainingAborted(write_failed(run_path / METRICS, exc, prog.kept)) from None
    _place_data(job)


def _restore(job: Job, prog: Progress) -> None:
    saved = restore_checkpoint(job.run_path / CHECKPOINT, job.model, job.optimizer)
    if saved.get("world_size", 1) != job.dd.world_size:
        raise UsageError(f"{job.run_path} was trained by {saved.get('world_size', 1)} process(es); resume it "
                         f"with the same number (this is {job.dd.world_size})")
    extra = saved.get("_extra", {})
    ddp.restore_rng(extra, job.dd)
    if not job.dd.active:
        ddp.restore_cuda_rng(extra)  # by device index (a string sort puts rng.cuda.10 before rng.cuda.2)
    prog.epoch, prog.start_step, prog.global_step = saved["epoch"], saved["step"], saved["global_step"]
    prog.bad_total = int(saved.get("bad_steps", 0))
    job.best = saved.get("best_select")
    prog.kept = _kept(job, saved["epoch"], saved["step"])


def _record_extension(job: Job, prog: Progress, from_epochs: int) -> None:
    """Train longer: note it in manifest.json, then write the new epochs into config.toml."""
    path = job.run_path / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    manifest = manifest if isinstance(manifest, dict) else {}
    manifest.setdefault("extended", []).append({
        "from_epochs": from_epochs, "to_epochs": job.cfg.schedule.epochs, "at_global_step": prog.global_step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    _write(path, json.dumps(manifest, indent=2) + "\n", prog.kept)
    _write(job.run_path / CONFIG, to_toml(job.plan.tables), prog.kept)


def _manifest(job: Job) -> dict[str, Any]:
    from fsapp.plugins import get_registry

    return {
        "fsapp_version": __version__,
        "plugins": dict(get_registry().plugins),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "device": str(job.device),
        "seed": job.cfg.run.seed,
        "world_size": job.dd.world_size,
        "data_fingerprint": job.dataset.fingerprint(),
        "live_eval": _split_record(job),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _split_record(job: Job) -> dict[str, Any]:
    """What the manifest says about the split: where live evaluation runs, the sizes, the digest of
    the training and validation indices (a function of the config alone)."""
    cfg, split = job.cfg, job.split
    return {"split": job.eval_split, "train_images": int(len(job.dataset.y_train)),
            "validation_images": int(len(split.validation)) if split is not None else 0,
            "validation": cfg.data.validation, "validation_seed": cfg.data.validation_seed,
            "indices_sha256": split.digest() if split is not None else None,
            "select": cfg.eval.select if job.eval_split == "validation" else None}


def _write(path: Path, text: str, kept: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as exc:
        raise TrainingAborted(write_failed(path, exc, kept)) from None


def _kept(job: Job, epoch: int, step: int) -> str:
    return (f"the last checkpoint (epoch {epoch}, step {step}) in {job.run_path} is intact: free space and "
            f"resume with --resume {job.run_path}")


def _place_data(job: Job) -> None:
    """The uint8 training set on the device (augmented there) or in host memory (one batch moved
    per step), and the fixed evaluation subset."""
    cfg, dataset, device = job.cfg, job.dataset, job.device
    job.data["x_train"] = dataset.x_train.to(device) if cfg.data.on_device else dataset.x_train
    job.data["y_train"] = dataset.y_train.to(device)
    x_pool, y_pool = dataset.x_test, dataset.y_test
    if job.eval_split == "validation":
        x_pool, y_pool = job.x_validation, job.y_validation
    g = torch.Generator().manual_seed(cfg.eval.seed)
    eval_idx = torch.randperm(len(y_pool), generator=g)[: cfg.eval.n].sort().values
    job.data["x_eval"] = to_unit(x_pool[eval_idx]).to(device)
    job.data["y_eval"] = y_pool[eval_idx].to(device)


def _loop(job: Job, prog: Progress, opening: Opening) -> Iterator[ev.Event]:
    """Every epoch, then the model file; the event log is closed however it ends."""
    cfg = job.cfg
    try:
        yield job.emit(ev.RunStarted(str(job.run_path), str(job.device), cfg.schedule.epochs, job.per_epoch,
                                     prog.epoch, prog.start_step, opening.state is not None, job.plan.tables),
                       prog.kept)
        for note in opening.notes:
            yield job.emit(ev.Warning(note, prog.global_step), prog.kept)
        prog.t_start = time.perf_counter()
        for epoch in range(prog.epoch, cfg.schedule.epochs):
            yield from _epoch(job, prog, epoch)
            if prog.stopped:
                break
            yield from _end_epoch(job, prog, epoch)
            if ddp.agree([job.control.stop.is_set()], job.dd)[0]:
                prog.stopped = epoch + 1 < cfg.schedule.epochs
                break
        yield from _finish(job, prog)
    finally:
        job.log.close()


def _epoch(job: Job, prog: Progress, epoch: int) -> Iterator[ev.Event]:
    """One epoch's steps, with reports, skipped-batch counts and requests between them."""
    lr = lr_at(job.cfg, epoch)
    for group in job.optimizer.param_groups:
        group["lr"] = lr
    order_host = epoch_order(len(job.data["y_train"]), job.cfg.run.seed, epoch)
    order = order_host.to(job.device)
    tally = Tally.zeros(job.device)
    for step, idx in iterate_batches(order, job.cfg.data.batch_size, prog.start_step):
        _train_step(job, prog, tally, epoch, step, idx, order_host)
        last = step == job.per_epoch - 1
        log_point = prog.global_step % job.cfg.run.log_every == 0 or last
        if job.sync_each_step or log_point:
            yield from _count_skipped(job, prog, tally, epoch, step)
        if log_point:
            yield from _report(job, prog, tally, epoch, step, lr)
        yield from _serve_requests(job, prog, epoch, step, last, log_point)
        if prog.stopped:
            return
    prog.start_step = 0
    yield from _epoch_summary(job, prog, tally, epoch, lr)


def _batch(job: Job, epoch: int, step: int, idx: torch.Tensor, order_host: torch.Tensor) -> tuple[Any, Any]:
    """This step's images in [0, 1] (augmented on the device) and labels; this rank's share."""
    cfg, device = job.cfg, job.device
    if cfg.data.on_device:
        xb = job.data["x_train"][idx]
    else:
        xb = job.data["x_train"][order_host[step * cfg.data.batch_size:(step + 1) * cfg.data.batch_size]]
        xb = xb.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else xb
    yb = job.data["y_train"][idx]
    if job.plan.augment_for(job.dataset) == "crop-flip":
        xb = augment_crop_flip(xb, batch_generator(cfg.run.seed, epoch, step, device))
    xb = to_unit(xb)
    if cfg.run.channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    if job.dd.active:  # this rank's share of the global batch, rank 0's BatchNorm statistics
        xb, yb = ddp.shard_rows(xb, job.dd), ddp.shard_rows(yb, job.dd)
        ddp.broadcast_buffers(job.inner, job.dd)
    return xb, yb


def _train_step(job: Job, prog: Progress, tally: Tally, epoch: int, step: int, idx: torch.Tensor,
                order_host: torch.Tensor) -> None:
    """One step: perturb, update (or skip a non-finite one), add to the epoch's sums."""
    xb, yb = _batch(job, epoch, step, idx, order_host)
    inner = job.inner

    def local_perturb(_net: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return job.perturb(inner, x, y)  # attacks run on the local module, never through DDP

    loss, logits, applied = training_step(job.net, local_perturb if job.dd.active else job.perturb,
                                          job.optimizer, job.scaler, xb, yb, job.plan.loss,
                                          job.cfg.run.precision, sync=job.sync_each_step)
    ok = applied if isinstance(applied, torch.Tensor) else torch.tensor(applied, device=job.device)
    tally.loss_sum += torch.where(ok, loss * len(yb), 0.0)
    tally.correct += torch.where(ok, (logits.argmax(1) == yb).sum(), 0)
    tally.seen += torch.where(ok, len(yb), 0)
    tally.pending_bad += (~ok).long()
    tally.last_loss = loss
    tally.window_n += len(idx)
    prog.global_step += 1
    prog.steps_here += 1


def _count_skipped(job: Job, prog: Progress, tally: Tally, epoch: int, step: int) -> Iterator[ev.Event]:
    """Skipped batches (non-finite loss or update), read now or at log points on a GPU."""
    n_bad = int(tally.pending_bad)
    if not n_bad:
        return
    tally.pending_bad.zero_()
    tally.bad_epoch += n_bad
    prog.bad_total += n_bad
    where = f"{'at' if job.sync_each_step else 'by'} epoch {epoch + 1} step {step + 1}"
    yield job.emit(ev.Warning(f"non-finite loss or update {where}: {n_bad} batch{'es' if n_bad > 1 else ''} "
                              f"skipped ({prog.bad_total} so far)", prog.global_step), prog.kept)
    if prog.bad_total > job.cfg.run.max_bad_steps:
        raise TrainingAborted(
            f"{prog.bad_total} non-finite steps (limit run.max_bad_steps={job.cfg.run.max_bad_steps}): lower "
            f"optim.lr or method.epsilon, or use run.precision=fp32; {prog.kept}")


def _report(job: Job, prog: Progress, tally: Tally, epoch: int, step: int, lr: float) -> Iterator[ev.Event]:
    """A StepEnd event (loss, accuracy, speed, time left) and a guarded plugin's violations."""
    now = time.perf_counter()
    rate = tally.window_n / max(now - tally.window_t, 1e-9)
    per_step = (now - prog.t_start) / prog.steps_here
    total = job.per_epoch * job.cfg.schedule.epochs
    yield job.emit(ev.StepEnd(epoch, step, prog.global_step, total, float(tally.last_loss),
                              float(tally.correct) / max(int(tally.seen), 1), lr, rate,
                              per_step * (total - prog.global_step)), prog.kept)
    tally.window_t, tally.window_n = now, 0
    perturb = job.perturb
    if isinstance(perturb, GuardedPerturbation) and (n_bad := perturb.take_violations()):
        yield job.emit(ev.Warning(
            f"perturbation '{perturb.name}' from plugin '{perturb.plugin}' returned {n_bad} examples outside "
            "the eps-ball, [0, 1] or non-finite, or with invalid soft labels; they were projected (the labels "
            "replaced by one-hot ones)", prog.global_step), prog.kept)


def _serve_requests(job: Job, prog: Progress, epoch: int, step: int, last: bool, log_point: bool) -> Iterator[ev.Event]:
    """Requests at a step boundary: checkpoint now, evaluate now, pause (serving requests while
    paused, in one process), stop with a checkpoint. Under torchrun the ranks act together, at
    log points."""
    control, dd = job.control, job.dd
    yield from _channel_events(job, prog)
    asks = [control.checkpoint_now.is_set(), control.evaluate_now.is_set(), control.stop.is_set()]
    if dd.active:
        asks = ddp.agree(asks, dd) if log_point else [False] * 3
    ask_checkpoint, ask_eval, ask_stop = asks
    every = job.cfg.run.checkpoint_every
    if (every and prog.global_step % every == 0 and not last) or ask_checkpoint:
        control.checkpoint_now.clear()
        yield _checkpoint(job, prog, *((epoch, step + 1) if not last else (epoch + 1, 0)))
    if ask_eval:
        control.evaluate_now.clear()
        yield _live_eval(job, prog, epoch)
    while control.pause.is_set() and not control.stop.is_set():
        time.sleep(0.05)
        yield from _channel_events(job, prog)
        if not dd.active and control.checkpoint_now.is_set():
            control.checkpoint_now.clear()
            yield _checkpoint(job, prog, *((epoch, step + 1) if not last else (epoch + 1, 0)))
        if not dd.active and control.evaluate_now.is_set():
            control.evaluate_now.clear()
            yield _live_eval(job, prog, epoch)
    if not dd.active:
        ask_stop = control.stop.is_set()
    if ask_stop and not last:
        yield _checkpoint(job, prog, epoch, step + 1)
        prog.stopped = True


def _channel_events(job: Job, prog: Progress) -> Iterator[ev.Event]:
    if job.channel is not None:
        for action in job.channel.apply_to(job.control):
            yield job.emit(ev.ControlApplied(action, prog.global_step), prog.kept)


def _epoch_summary(job: Job, prog: Progress, tally: Tally, epoch: int, lr: float) -> Iterator[ev.Event]:
    """The epoch's loss and accuracy over every rank's share."""
    loss_sum, correct, seen = tally.loss_sum, tally.correct, tally.seen
    if job.dd.active:
        totals = ddp.all_reduce_sum(torch.stack([loss_sum.double(), correct.double(), seen.double()]))
        loss_sum, correct, seen = totals[0], totals[1], totals[2]
    seen_n = max(int(seen), 1)
    yield job.emit(ev.EpochEnd(epoch, float(loss_sum) / seen_n, float(correct) / seen_n, lr,
                               time.perf_counter() - tally.t_epoch, tally.bad_epoch), prog.kept)


def _end_epoch(job: Job, prog: Progress, epoch: int) -> Iterator[ev.Event]:
    """After an epoch: the skipped-steps check, the live evaluation when due, the checkpoint."""
    cfg = job.cfg
    limit = cfg.run.max_bad_fraction
    if prog.global_step and prog.bad_total / prog.global_step > limit:
        raise TrainingAborted(
            f"{prog.bad_total} of {prog.global_step} steps were skipped as non-finite (more than "
            f"run.max_bad_fraction={limit:g}): lower optim.lr or method.epsilon, or use run.precision=fp32; "
            f"{prog.kept}")
    if cfg.eval.n > 0 and ((epoch + 1) % cfg.eval.every == 0 or epoch + 1 == cfg.schedule.epochs):
        yield _live_eval(job, prog, epoch)
    yield _checkpoint(job, prog, epoch + 1, 0)


def _checkpoint(job: Job, prog: Progress, epoch: int, step: int) -> ev.Event:
    """Save weights, optimiser, RNG states and counters (rank 0 writes; all ranks gather RNG),
    with the resolved configuration and its digest; never a non-finite one."""
    dd, path = job.dd, job.run_path / CHECKPOINT
    state = {"epoch": epoch, "step": step, "global_step": prog.global_step, "bad_steps": prog.bad_total,
             "world_size": dd.world_size, "config_digest": job.plan.digest, "config": job.plan.tables,
             "best_select": job.best}
    extra = ddp.rng_state_tensors(dd)  # every rank's RNG state (a collective: all ranks call it)
    if not dd.active:
        extra.update(ddp.cuda_rng_tensors())  # restored by device index
    bad = _non_finite(job.model, job.optimizer)
    if ddp.agree([bool(bad)], dd)[0]:
        raise TrainingAborted(f"the training state holds non-finite values ({', '.join(bad[:3]) or 'another rank'}); "
                              f"no checkpoint was written; {prog.kept}")
    if dd.is_main:
        try:
            save_checkpoint(path, job.model, job.optimizer, state, extra)
        except OSError as exc:
            raise TrainingAborted(
                f"could not write the checkpoint in {job.run_path} ({exc.strerror or exc}); the previous "
                "checkpoint is intact: free space and resume with --resume") from None
    prog.kept = _kept(job, epoch, step)
    return job.emit(ev.CheckpointSaved(str(path), epoch, step, prog.global_step), prog.kept)


def _non_finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Names of the weights, buffers and optimiser state tensors holding a NaN or an infinity."""
    names = [name for name, t in model.state_dict().items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if optimizer is not None:
        for i, (_, entry) in enumerate(optimizer.state.items()):
            names += [f"optimizer state {i}.{k}" for k, v in entry.items()
                      if torch.is_tensor(v) and v.is_floating_point() and not bool(v.isfinite().all())]
    return names


def _live_eval(job: Job, prog: Progress, epoch: int) -> ev.Event:
    """The same evaluator as ``fsapp eval`` (it seeds each batch from eval.seed and leaves the
    training RNG untouched); standard AutoAttack on the first eval.autoattack_n samples."""
    cfg, x, y = job.cfg, job.data["x_eval"], job.data["y_eval"]
    t0 = time.perf_counter()
    defaults = {"eps": cfg.eval.eps, "step_size": cfg.eval.step_size}
    report = evaluate(job.inner, x, y, list(cfg.eval.attacks), batch_size=cfg.eval.batch_size,
                      defaults=defaults, seed=cfg.eval.seed, shard=job.dd.active)
    accuracy, flags = dict(report.accuracy), list(report.flags)
    if cfg.eval.autoattack_n > 0:
        k = min(cfg.eval.autoattack_n, len(y))
        aa = evaluate(job.inner, x[:k], y[:k], ["autoattack"], batch_size=cfg.eval.batch_size,
                      defaults=defaults, seed=cfg.eval.seed, checks=False, shard=job.dd.active)
        accuracy["autoattack"] = aa.accuracy["autoattack"]
        flags += [f for f in aa.flags if f not in flags]
    if job.eval_split == "validation":
        _keep_best(job, prog, accuracy.get(cfg.eval.select))
    return job.emit(ev.EvalResult(epoch, report.n, accuracy, report.gap, flags, time.perf_counter() - t0,
                                  prog.global_step, job.eval_split), prog.kept)


def _keep_best(job: Job, prog: Progress, value: float | None) -> None:
    """Write best.safetensors (atomically) when the validation ``eval.select`` value improves on the
    best so far; never on test data (a run without a validation split keeps no best model)."""
    if value is None or (job.best is not None and value <= job.best):
        return
    job.best = value
    if job.dd.is_main and not _non_finite(job.model):
        path = job.run_path / BEST
        try:
            save_model(path, job.model, {**_model_meta(job), "selected_by": job.cfg.eval.select,
                                         "selected_value": value, "selected_split": "validation",
                                         "selected_global_step": prog.global_step})
        except OSError as exc:
            raise TrainingAborted(write_failed(path, exc, prog.kept)) from None


def _finish(job: Job, prog: Progress) -> Iterator[ev.Event]:
    """Every rank ends with rank 0's weights (digests compared under torchrun); the model file is
    written unless it holds a non-finite value."""
    dd, run_path = job.dd, job.run_path
    if dd.active:
        ddp.broadcast_buffers(job.inner, dd)
        digests = ddp.state_digests(job.model, dd)
        if dd.is_main:
            _write(run_path / DDP_INFO, json.dumps({"world_size": dd.world_size, "backend": dd.backend,
                                                    "state_digests": digests, "in_sync": len(set(digests)) == 1},
                                                   indent=2) + "\n", prog.kept)
        if len(set(digests)) != 1:
            yield job.emit(ev.Warning(f"the ranks hold different weights: digests {digests}", prog.global_step),
                           prog.kept)
    model_path = run_path / MODEL
    if dd.is_main:
        if bad := _non_finite(job.model):
            raise TrainingAborted(f"the trained weights hold non-finite values ({', '.join(bad[:3])}); {MODEL} "
                                  f"was not written; {prog.kept}")
        try:
            save_model(model_path, job.model, _model_meta(job))
        except OSError as exc:
            raise TrainingAborted(write_failed(model_path, exc, prog.kept)) from None
    yield job.emit(ev.Finished(str(model_path), str(run_path), time.perf_counter() - prog.t_start, prog.stopped),
                   prog.kept)


def _model_meta(job: Job) -> dict[str, Any]:
    cfg = job.cfg
    return model_metadata(cfg.model.name, job.model_params, dataset=cfg.data.name,
                          method=f"{cfg.method.perturbation}+{cfg.method.loss}", plugin=job.plan.model.plugin,
                          extra={"epsilon": cfg.method.epsilon, "eval_eps": cfg.eval.eps,
                                 "eval_step_size": cfg.eval.step_size, "run": job.run_path.name,
                                 "dataset_params": dataclasses.asdict(job.plan.dataset.params)})
