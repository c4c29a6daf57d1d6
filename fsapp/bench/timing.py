"""The one timing helper of the benchmarks: a call's wall and CPU seconds between device syncs,
and the peak memory it allocates."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """``(wall seconds, this process's CPU seconds)`` of one call of ``run``, the device synced
    before and after."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    run()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def seconds(run: Callable[[], object], device: torch.device) -> float:
    """One call's time on the clock that is fair on ``device``: wall time between syncs on CUDA,
    this process's CPU time on the CPU (other load on a shared machine does not count)."""
    wall, cpu = measure(run, device)
    return wall if device.type == "cuda" else cpu


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ start/stop lines on file descriptor 2 (restored on exit)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(run_step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated by one call of ``run_step`` above what was allocated before it."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run_step()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run_step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        if e.device_type().name == "CPU":
            level += e.nbytes()
            peak = max(peak, level)
    return int(peak)
