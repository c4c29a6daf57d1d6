"""Resumable evaluation state: per-sample results of every finished batch, saved atomically.

The state file is JSON: a fingerprint of what is evaluated (model weights, data, attack specs,
seed, batch size, shard) and, per attack and batch, the robust mask (a string of 0/1), each
stage's mask, the number of invalid examples and the seconds spent. Every batch's results are
written with :func:`fsapp.checkpoint.atomic_write_text` as soon as the batch finishes, so an
evaluation killed at any moment resumes without re-attacking a finished batch. Because every
batch is seeded from (seed, batch index, attack name), a resumed run ends with the same report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fsapp.checkpoint import atomic_write_text
from fsapp.errors import UsageError

STATE_FORMAT = "fsapp-eval-state"
STATE_VERSION = 1


def mask_to_str(mask: Tensor) -> str:
    """A bool tensor as a string of 0 and 1."""
    return "".join("1" if v else "0" for v in mask.to("cpu", torch.bool).tolist())


def str_to_mask(text: str, device: torch.device | str = "cpu") -> Tensor:
    """The inverse of :func:`mask_to_str`."""
    return torch.tensor([c == "1" for c in text], dtype=torch.bool, device=device)


class EvalState:
    """Finished batches of one evaluation, kept in memory and mirrored to ``path`` (if any)."""

    def __init__(self, path: str | Path | None, fingerprint: dict[str, Any]) -> None:
        self.path = Path(path) if path is not None else None
        self.fingerprint = fingerprint
        self.records: dict[str, dict[str, dict[str, Any]]] = {}
        self.resumed_batches = 0

    @classmethod
    def open(cls, path: str | Path | None, fingerprint: dict[str, Any], resume: bool) -> "EvalState":
        """A fresh state, or (``resume``) the one saved at ``path`` if it matches ``fingerprint``."""
        state = cls(path, fingerprint)
        if not resume:
            return state
        if state.path is None:
            raise UsageError("resuming an evaluation needs a state file")
        try:
            data = json.loads(state.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"no interrupted evaluation to resume: {state.path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read the evaluation state {state.path}: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != STATE_FORMAT or data.get("version") != STATE_VERSION:
            raise UsageError(f"{state.path} is not an fsapp evaluation state file")
        saved = data.get("fingerprint", {})
        if saved != json.loads(json.dumps(fingerprint)):
            diff = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
            raise UsageError(
                f"{state.path} belongs to a different evaluation (differs in: {', '.join(diff)}); "
                "run without --resume to start over"
            )
        state.records = data.get("records", {})
        state.resumed_batches = sum(len(v) for v in state.records.values())
        return state

    def get(self, key: str, batch: int) -> dict[str, Any] | None:
        """The saved record of ``key`` on ``batch``, if that batch finished."""
        return self.records.get(key, {}).get(str(batch))

    def put(self, key: str, batch: int, record: dict[str, Any]) -> None:
        """Record a finished batch and save the whole state atomically."""
        self.records.setdefault(key, {})[str(batch)] = record
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        data = {"format": STATE_FORMAT, "version": STATE_VERSION, "fingerprint": self.fingerprint,
                "records": self.records}
        try:
            atomic_write_text(self.path, json.dumps(data, separators=(",", ":")) + "\n")
        except OSError as exc:
            kept = ("the batches saved before are intact there: free space or fix the permissions, then run the "
                    "same command with --resume") if self.path.exists() else "no batch was saved yet"
            raise UsageError(f"cannot save the evaluation state to {self.path}: {exc.strerror or exc}; {kept}") from None
