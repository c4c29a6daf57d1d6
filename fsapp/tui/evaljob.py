"""Evaluate a model file as ``fsapp eval`` does, reporting progress per attack as it goes.

One :func:`fsapp.engine.evaluate.evaluate` call per threat model (several eps values make a
sweep); its ``on_batch`` progress carries each attack's running robust count, so a table can fill
in attack by attack. Reports are written to ``eval/`` next to the model file, like the CLI's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsapp.errors import UsageError

DEFAULT_ATTACKS = ("pgd:steps=20", "cw:steps=20")
Progress = Callable[[float, str, int, int, int], None]
"""(eps, attack key, samples done, total, still robust among done)."""


@dataclass
class EvalRequest:
    """What to evaluate: a model file, attack specs, and the CLI's options."""

    model: Path
    attacks: list[str]
    n: int = 1000
    batch_size: int = 250
    seed: int = 0
    device: str = "auto"
    eps: list[str] | None = None  # several values: a sweep
    data_root: str = "data"


def suites() -> dict[str, tuple[str, ...]]:
    """The evaluation suites the engine defines (``paper``, ``autoattack``...), if any."""
    from fsapp.engine import evaluate

    return dict(getattr(evaluate, "SUITES", {}))


def expand_specs(tokens: list[str]) -> list[str]:
    """Attack specs from the words typed: suite names expand to their attacks, in order, once each."""
    named = suites()
    specs: list[str] = []
    for token in tokens or list(DEFAULT_ATTACKS):
        specs += [s for s in named.get(token, (token,)) if s not in specs]
    return specs


def run(request: EvalRequest, on_progress: Progress) -> list[dict[str, Any]]:
    """Evaluate; one JSON report per eps value (also written to ``eval/`` next to the model)."""
    from fsapp.checkpoint import atomic_write_text, file_sha256, load_model_file
    from fsapp.cli.evalcmd import load_test_split
    from fsapp.engine.evaluate import evaluate
    from fsapp.engine.train import pick_device
    from fsapp.registry import parse_float

    if request.n < 1:
        raise UsageError(f"n must be >= 1, got {request.n}")
    if request.batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {request.batch_size}")
    if not request.model.is_file():
        raise UsageError(f"model file not found: {request.model}")
    try:
        given = [parse_float(e) for e in request.eps or []]
    except ValueError as exc:
        raise UsageError(f"bad eps: {exc}") from None
    dev = pick_device(request.device)
    model, meta = load_model_file(request.model, dev)
    specs = expand_specs(request.attacks)
    x, y = load_test_split(meta, request.n, request.seed, request.data_root)
    sha = file_sha256(request.model)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    reports = []
    for i, eps in enumerate(given or [float(meta.get("eval_eps", 8 / 255))]):
        step_size = eps / 4 if given else float(meta.get("eval_step_size", eps / 4))

        def on_batch(p: Any, eps: float = eps) -> None:
            if not p.stage:
                on_progress(eps, p.key, p.done, p.total, p.robust)

        report = evaluate(model, x, y, specs, batch_size=request.batch_size, device=dev, seed=request.seed,
                          on_batch=on_batch, defaults={"eps": eps, "step_size": step_size})
        data = {
            "model": str(request.model),
            "model_sha256": sha,
            "dataset": meta.get("dataset"),
            "device": str(dev),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **report.to_dict(),
        }
        if not data.get("threat_model"):
            data["threat_model"] = {"norm": "Linf", "eps": eps}
        name = stamp + (f"-eps{i + 1}" if len(given) > 1 else "") + ".json"
        target = request.model.parent / "eval" / name
        try:
            atomic_write_text(target, json.dumps(data, indent=2) + "\n")
        except OSError as exc:
            raise UsageError(f"cannot write the report to {target}: {exc.strerror}") from None
        data["path"], data["eps"] = str(target), eps
        reports.append(data)
    return reports
