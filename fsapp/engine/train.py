"""The training loop: Feature Scattering and its baselines, one epoch after another.

Reads top to bottom: set up (config, device, data, model, adversary, optimiser, run directory,
resume), then for each epoch and batch: augment on the device, perturb, update; at the end of
each epoch evaluate on a fixed held-out subset and checkpoint. It yields events and never prints.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterator
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
from fsapp.config import Config, from_tables, load, resolved_tables, to_toml
from fsapp.data import (
    augment_crop_flip,
    batch_generator,
    epoch_order,
    iterate_batches,
    steps_per_epoch,
    to_unit,
)
from fsapp.engine import distributed as ddp
from fsapp.engine import events as ev
from fsapp.engine.evaluate import evaluate
from fsapp.engine.guard import GuardedPerturbation
from fsapp.engine.rundir import (
    CHECKPOINT,
    METRICS,
    MODEL,
    Control,
    ControlChannel,
    NullLog,
    RunLock,
    RunLog,
    new_run_dir,
)
from fsapp.engine.step import training_step
from fsapp.errors import TrainingAborted, UsageError
from fsapp.plugins import BUILTIN_PLUGIN, get_registry


def pick_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cuda:N`` is checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device '{name}' asked for, but no CUDA device is available; use auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device '{name}' does not exist ({torch.cuda.device_count()} CUDA devices)")
    return device


def as_config(config: Config | dict[str, Any] | str | Path | None) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, dict):
        return from_tables(config)
    return load(config)


def lr_at(cfg: Config, epoch: int) -> float:
    """Piecewise-constant learning rate: ``lr * gamma ** (milestones passed)``."""
    passed = sum(1 for m in cfg.schedule.milestones if epoch >= m)
    return cfg.optim.lr * cfg.schedule.gamma ** passed


def train(
    config: Config | dict[str, Any] | str | Path | None = None,
    run_dir: str | Path | None = None,
    resume: str | Path | None = None,
    control: Control | None = None,
) -> Iterator[ev.Event]:
    """Train as configured; yields events. ``resume`` continues a run directory's checkpoint."""
    control = control or Control.new()
    # -- configuration and run directory -------------------------------------------------
    if resume is not None:
        run_path = Path(resume)
        if not (run_path / "config.toml").is_file():
            raise UsageError(f"cannot resume {run_path}: no config.toml there (not a run directory)")
        cfg = load(run_path / "config.toml")
    else:
        cfg = as_config(config)
        run_path = Path(run_dir) if run_dir is not None else new_run_dir(
            cfg.run.runs_dir, cfg.run.name, cfg.method.perturbation, cfg.data.name)
    device = pick_device(cfg.run.device)
    dd = ddp.setup(device)  # torchrun: join the group, take cuda:LOCAL_RANK (identity in one process)
    device = dd.device
    run_path = Path(ddp.broadcast_text(str(run_path), dd))  # rank 0's (timestamped) name
    registry = get_registry()

    torch.manual_seed(cfg.run.seed)
    dataset = registry.create("dataset", cfg.data.name, **cfg.dataset_params())
    dataset = dataset.limit_train(cfg.data.train_limit)
    channels, height, width = dataset.shape
    model_params = dict(cfg.model_params(), num_classes=dataset.num_classes, channels=channels,
                        size=height, mean=tuple(dataset.mean), std=tuple(dataset.std))
    model = registry.create("model", cfg.model.name, **model_params).to(device)
    if cfg.run.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.run.sync_bn and dd.active:
        if device.type != "cuda":
            raise UsageError("run.sync_bn needs CUDA devices (torch's SyncBatchNorm); drop it on the CPU")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if dd.rank > 0:  # each rank's share of the batch gets its own random starts
        torch.manual_seed(cfg.run.seed + 7919 * dd.rank)
    net = torch.compile(model) if cfg.run.compile else model
    net = ddp.wrap(net, dd)  # the training forward goes through DDP; attacks use ddp.unwrap(net)
    perturb = registry.create("perturbation", cfg.method.perturbation, **cfg.perturbation_params())
    pert_plugin = registry.get("perturbation", cfg.method.perturbation).plugin
    if pert_plugin != BUILTIN_PLUGIN:
        eps = cfg.perturbation_params().get("epsilon")
        perturb = GuardedPerturbation(perturb, eps, cfg.method.perturbation, pert_plugin)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.run.precision == "fp16")

    try:
        run_path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create run directory {run_path}: {exc.strerror}") from None
    lock = RunLock.acquire(run_path) if dd.is_main else None  # rank 0 writes the run directory
    channel = ControlChannel(run_path) if dd.is_main else None  # requests from other processes
    if channel is not None:
        channel.discard_stale()
    for stale in run_path.glob(".*.tmp") if dd.is_main else ():  # temp files of a killed writer
        stale.unlink(missing_ok=True)
    try:
        events = _train(cfg, run_path, resume is not None, control, device, dataset, model, net, perturb,
                        optimizer, scaler, model_params, dd, channel)
        if dd.is_main:
            yield from events
        else:  # other ranks train silently (the CLI of every rank would print the same lines)
            for _ in events:
                pass
    finally:
        if lock is not None:
            lock.release()
        ddp.shutdown(dd)


def _train(cfg: Config, run_path: Path, resuming: bool, control: Control, device: torch.device, dataset: Any,
           model: torch.nn.Module, net: Any, perturb: Any, optimizer: torch.optim.Optimizer,
           scaler: torch.amp.GradScaler, model_params: dict[str, Any],
           dd: ddp.Dist | None = None, channel: ControlChannel | None = None) -> Iterator[ev.Event]:
    """The loop proper, run while holding the run directory's lock."""
    registry = get_registry()
    dd = dd or ddp.Dist(device=device)
    inner = ddp.unwrap(net)  # attacks and evaluation call the local module, never the DDP wrapper

    def attack(_net: Any, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return perturb(inner, xb, yb)
    smoothing = cfg.method.label_smoothing if cfg.method.loss == "soft-ce" else 0.0
    augment = cfg.data.augment if cfg.data.augment != "auto" else dataset.augment
    if not resuming and ((run_path / CHECKPOINT).exists() or (run_path / "config.toml").exists()):
        raise UsageError(f"{run_path} already holds a run; resume it with --resume {run_path}")
    ddp.barrier(dd)  # every rank has looked before rank 0 writes
    start_epoch, start_step, global_step = 0, 0, 0
    resumed = resuming and (run_path / CHECKPOINT).exists()
    if resumed:
        state = restore_checkpoint(run_path / CHECKPOINT, model, optimizer)
        start_epoch, start_step, global_step = state["epoch"], state["step"], state["global_step"]
        if state.get("world_size", 1) != dd.world_size:
            raise UsageError(f"{run_path} was trained by {state.get('world_size', 1)} process(es); resume it "
                             f"with the same number (this is {dd.world_size})")
        ddp.restore_rng(state.get("_extra", {}), dd)
    elif dd.is_main:
        tables = resolved_tables(cfg)
        atomic_write_text(run_path / "config.toml", to_toml(tables))
        manifest = {
            "fsapp_version": __version__,
            "plugins": dict(registry.plugins),
            "torch_version": torch.__version__,
            "python": platform.python_version(),
            "device": str(device),
            "seed": cfg.run.seed,
            "world_size": dd.world_size,
            "data_fingerprint": dataset.fingerprint(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_text(run_path / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    log = RunLog(run_path / METRICS) if dd.is_main else NullLog()

    # the uint8 set on the device (augmented there), or in host memory, one batch moved per step
    on_device = cfg.data.on_device
    x_train = dataset.x_train.to(device) if on_device else dataset.x_train
    y_train = dataset.y_train.to(device)
    g = torch.Generator().manual_seed(cfg.eval.seed)
    eval_idx = torch.randperm(len(dataset.y_test), generator=g)[: cfg.eval.n].sort().values
    x_eval, y_eval = to_unit(dataset.x_test[eval_idx]).to(device), dataset.y_test[eval_idx].to(device)
    n_train, batch_size = len(y_train), cfg.data.batch_size
    per_epoch = steps_per_epoch(n_train, batch_size)
    total_steps = per_epoch * cfg.schedule.epochs
    meta = model_metadata(cfg.model.name, model_params, dataset=cfg.data.name,
                          method=f"{cfg.method.perturbation}+{cfg.method.loss}",
                          plugin=registry.get("model", cfg.model.name).plugin,
                          extra={"epsilon": cfg.method.epsilon, "eval_eps": cfg.eval.eps,
                                 "eval_step_size": cfg.eval.step_size, "run": run_path.name})

    def checkpoint(epoch: int, step: int) -> ev.Event:
        state = {"epoch": epoch, "step": step, "global_step": global_step, "bad_steps": bad_total,
                 "world_size": dd.world_size}
        extra = ddp.rng_state_tensors(dd)  # every rank's RNG state (a collective: all ranks call it)
        try:
            path = save_checkpoint(run_path / CHECKPOINT, model, optimizer, state, extra) if dd.is_main \
                else run_path / CHECKPOINT
        except OSError as exc:
            raise TrainingAborted(
                f"could not write the checkpoint in {run_path} ({exc.strerror or exc}); the previous "
                "checkpoint is intact: free space and resume with --resume"
            ) from None
        return log.write(ev.CheckpointSaved(str(path), epoch, step, global_step))

    def live_eval(epoch: int) -> ev.Event:
        # the same evaluator as ``fsapp eval`` (it seeds each batch from eval.seed and leaves the
        # training RNG untouched); standard AutoAttack on the first eval.autoattack_n samples
        t0 = time.perf_counter()
        defaults = {"eps": cfg.eval.eps, "step_size": cfg.eval.step_size}
        report = evaluate(inner, x_eval, y_eval, list(cfg.eval.attacks), batch_size=cfg.eval.batch_size,
                          defaults=defaults, seed=cfg.eval.seed, shard=dd.active)
        accuracy, flags = dict(report.accuracy), list(report.flags)
        if cfg.eval.autoattack_n > 0:
            k = min(cfg.eval.autoattack_n, len(y_eval))
            aa = evaluate(inner, x_eval[:k], y_eval[:k], ["autoattack"], batch_size=cfg.eval.batch_size,
                          defaults=defaults, seed=cfg.eval.seed, checks=False, shard=dd.active)
            accuracy["autoattack"] = aa.accuracy["autoattack"]
            flags += [f for f in aa.flags if f not in flags]
        return log.write(ev.EvalResult(epoch, report.n, accuracy, report.gap, flags, time.perf_counter() - t0,
                                       global_step))

    bad_total = 0
    # A non-finite loss is read on the host after every step on the CPU (free there); on a GPU the
    # skip happens on the device and skipped batches are counted at log points (no sync per step).
    sync_each_step = cfg.run.host_checks == "every-step" or (cfg.run.host_checks == "auto" and device.type == "cpu")
    yield log.write(ev.RunStarted(str(run_path), str(device), cfg.schedule.epochs, per_epoch,
                                  start_epoch, start_step, resumed, resolved_tables(cfg)))
    t_start = time.perf_counter()
    steps_done_here = 0
    stopped = False
    try:
        for epoch in range(start_epoch, cfg.schedule.epochs):
            lr = lr_at(cfg, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            order_host = epoch_order(n_train, cfg.run.seed, epoch)
            order = order_host.to(device)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = torch.zeros((), device=device, dtype=torch.long)
            pending_bad = torch.zeros((), device=device, dtype=torch.long)
            bad_epoch = 0
            window_t, window_n = time.perf_counter(), 0
            t_epoch = time.perf_counter()
            for step, idx in iterate_batches(order, batch_size, start_step):
                # -- one training step --------------------------------------------------
                if on_device:
                    xb = x_train[idx]
                else:
                    xb = x_train[order_host[step * batch_size:(step + 1) * batch_size]]
                    xb = xb.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else xb
                yb = y_train[idx]
                if augment == "crop-flip":
                    xb = augment_crop_flip(xb, batch_generator(cfg.run.seed, epoch, step, device))
                xb = to_unit(xb)
                if cfg.run.channels_last:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                if dd.active:  # this rank's share of the global batch, rank 0's BatchNorm statistics
                    xb, yb = ddp.shard_rows(xb, dd), ddp.shard_rows(yb, dd)
                    ddp.broadcast_buffers(inner, dd)
                loss, logits, applied = training_step(net, attack if dd.active else perturb, optimizer, scaler,
                                                      xb, yb, smoothing, cfg.run.precision, sync=sync_each_step)
                ok = applied if isinstance(applied, torch.Tensor) else torch.tensor(applied, device=device)
                loss_sum += torch.where(ok, loss * len(yb), 0.0)
                correct += torch.where(ok, (logits.argmax(1) == yb).sum(), 0)
                seen += torch.where(ok, len(yb), 0)
                pending_bad += (~ok).long()
                global_step += 1
                steps_done_here += 1
                window_n += len(idx)
                last = step == per_epoch - 1
                # -- skipped (non-finite) batches: read now, or at log points on the GPU ---------
                if sync_each_step or global_step % cfg.run.log_every == 0 or last:
                    n_bad = int(pending_bad)
                    if n_bad:
                        pending_bad.zero_()
                        bad_epoch += n_bad
                        bad_total += n_bad
                        where = f"at epoch {epoch + 1} step {step + 1}" if sync_each_step else \
                            f"by epoch {epoch + 1} step {step + 1}"
                        yield log.write(ev.Warning(
                            f"non-finite loss {where}: {n_bad} batch{'es' if n_bad > 1 else ''} skipped "
                            f"({bad_total} so far)", global_step))
                        if bad_total > cfg.run.max_bad_steps:
                            raise TrainingAborted(
                                f"{bad_total} non-finite steps (limit run.max_bad_steps="
                                f"{cfg.run.max_bad_steps}): lower optim.lr or method.epsilon, or use "
                                f"run.precision=fp32; the last good checkpoint is in {run_path}"
                            )
                # -- reporting, checkpoints and requests, every few steps ---------------
                if global_step % cfg.run.log_every == 0 or last:
                    now = time.perf_counter()
                    rate = window_n / max(now - window_t, 1e-9)
                    per_step = (now - t_start) / steps_done_here
                    yield log.write(ev.StepEnd(
                        epoch, step, global_step, total_steps, float(loss),
                        float(correct) / max(int(seen), 1), lr, rate, per_step * (total_steps - global_step)))
                    window_t, window_n = now, 0
                    if isinstance(perturb, GuardedPerturbation) and (n_bad := perturb.take_violations()):
                        yield log.write(ev.Warning(
                            f"perturbation '{perturb.name}' from plugin '{perturb.plugin}' returned {n_bad} "
                            "examples outside the eps-ball, [0, 1] or non-finite; they were projected",
                            global_step))
                if channel is not None:
                    for action in channel.apply_to(control):
                        yield log.write(ev.ControlApplied(action, global_step))
                asks = [control.checkpoint_now.is_set(), control.evaluate_now.is_set(), control.stop.is_set()]
                if dd.active:  # the ranks act on requests together, at log points
                    asks = ddp.agree(asks, dd) if global_step % cfg.run.log_every == 0 or last else [False] * 3
                ask_checkpoint, ask_eval, ask_stop = asks
                if (cfg.run.checkpoint_every and global_step % cfg.run.checkpoint_every == 0 and not last) \
                        or ask_checkpoint:
                    control.checkpoint_now.clear()
                    yield checkpoint(epoch, step + 1) if not last else checkpoint(epoch + 1, 0)
                if ask_eval:
                    control.evaluate_now.clear()
                    yield live_eval(epoch)
                while control.pause.is_set() and not control.stop.is_set():
                    time.sleep(0.05)  # paused: requests are still served (one process only)
                    if channel is not None:
                        for action in channel.apply_to(control):
                            yield log.write(ev.ControlApplied(action, global_step))
                    if not dd.active and control.checkpoint_now.is_set():
                        control.checkpoint_now.clear()
                        yield checkpoint(epoch, step + 1) if not last else checkpoint(epoch + 1, 0)
                    if not dd.active and control.evaluate_now.is_set():
                        control.evaluate_now.clear()
                        yield live_eval(epoch)
                if not dd.active:
                    ask_stop = control.stop.is_set()
                if ask_stop and not last:
                    yield checkpoint(epoch, step + 1)
                    stopped = True
                    break
            if stopped:
                break
            start_step = 0
            if dd.active:  # the epoch's loss and accuracy over every rank's share
                totals = ddp.all_reduce_sum(torch.stack([loss_sum.double(), correct.double(), seen.double()]))
                loss_sum, correct, seen = totals[0], totals[1], totals[2]
            seen_n = max(int(seen), 1)
            yield log.write(ev.EpochEnd(epoch, float(loss_sum) / seen_n, float(correct) / seen_n,
                                        lr, time.perf_counter() - t_epoch, bad_epoch))
            if cfg.eval.n > 0 and ((epoch + 1) % cfg.eval.every == 0
                                                            or epoch + 1 == cfg.schedule.epochs):
                yield live_eval(epoch)
            yield checkpoint(epoch + 1, 0)
            if ddp.agree([control.stop.is_set()], dd)[0]:
                stopped = epoch + 1 < cfg.schedule.epochs
                break
        if dd.active:  # every rank must end with rank 0's weights: compare digests of the state
            ddp.broadcast_buffers(inner, dd)
            digests = ddp.state_digests(model, dd)
            if dd.is_main:
                atomic_write_text(run_path / "ddp.json", json.dumps(
                    {"world_size": dd.world_size, "backend": dd.backend, "state_digests": digests,
                     "in_sync": len(set(digests)) == 1}, indent=2) + "\n")
            if len(set(digests)) != 1:
                yield log.write(ev.Warning(f"the ranks hold different weights: digests {digests}", global_step))
        model_path = save_model(run_path / MODEL, model, meta) if dd.is_main else run_path / MODEL
        yield log.write(ev.Finished(str(model_path), str(run_path), time.perf_counter() - t_start, stopped))
    finally:
        log.close()
