"""A run's saved evaluation reports (``eval/*.json`` written by ``fsapp eval``), read for listing."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsapp.engine.rundir import EVAL_DIR

MAX_REPORT_BYTES = 64 << 20


@dataclass(frozen=True)
class SavedReport:
    """One report file, summarised: what it evaluated and its headline numbers."""

    path: Path
    kind: str
    n: int
    eps: float | None
    clean: float | None
    worst: float | None
    autoattack: float | None
    flags: tuple[str, ...]
    created: str
    split: str


def read_report(path: Path) -> dict[str, Any]:
    """A report file as a dict; ValueError (one line) when it is not a readable report."""
    try:
        if path.stat().st_size > MAX_REPORT_BYTES:
            raise ValueError(f"{path} is larger than {MAX_REPORT_BYTES >> 20} MiB; not a report")
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("accuracy"), dict):
        raise ValueError(f"{path} is not an fsapp eval report (no accuracy table)")
    return data


def report_kind(data: dict[str, Any]) -> str:
    """``suite paper``, ``autoattack``, ``sweep eps``, ``pgd:steps=20 cw:steps=20``... (+ landscape, examples)."""
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    parts: list[str] = []
    suites = [str(s) for s in settings.get("suites") or []]
    if suites:
        parts.append("suite " + ", ".join(suites))
    sweeps = data.get("sweeps") or []
    if sweeps:
        parts.append("sweep " + ", ".join(str(s.get("key", "?")) for s in sweeps if isinstance(s, dict)))
    if not parts:
        parts.append(" ".join(str(a.get("key", "?")) for a in data.get("attacks") or [] if isinstance(a, dict))
                     or "clean only")
    if settings.get("source"):
        parts.append("transfer")
    if "landscape" in data:
        parts.append("landscape")
    if isinstance(data.get("examples"), dict):
        parts.append("examples")
    return " · ".join(parts)


def autoattack_accuracy(accuracy: dict[str, Any]) -> float | None:
    """The standard AutoAttack number in an accuracy table, if it holds one."""
    key = next((k for k in accuracy if str(k).split(":")[0] == "autoattack"), None)
    value = accuracy.get(key) if key is not None else None
    return float(value) if isinstance(value, (int, float)) else None


def summarise(path: Path, data: dict[str, Any]) -> SavedReport:
    """The listing line of one report."""
    acc = data["accuracy"]
    threat = data.get("threat_model") if isinstance(data.get("threat_model"), dict) else {}
    eps = threat.get("eps") if isinstance(threat.get("eps"), (int, float)) else None

    def num(key: str) -> float | None:
        v = acc.get(key)
        return float(v) if isinstance(v, (int, float)) else None

    created = str(data.get("created") or time.strftime("%Y-%m-%dT%H:%M", time.localtime(path.stat().st_mtime)))
    flags = tuple(str(f.get("id", "?")) for f in data.get("flags") or [] if isinstance(f, dict))
    return SavedReport(path, report_kind(data), int(data.get("n") or 0), eps, num("clean"), num("worst_case"),
                       autoattack_accuracy(acc), flags, created[:16].replace("T", " "),
                       str(data.get("split", "test")))


def saved_reports(run_dir: Path) -> list[SavedReport]:
    """The run's readable reports, newest first (unreadable files are left out)."""
    folder = Path(run_dir) / EVAL_DIR
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if path.name.endswith(".state.json"):
            continue
        try:
            out.append(summarise(path, read_report(path)))
        except (ValueError, OSError):
            continue
    return sorted(out, key=lambda r: (r.created, r.path.name), reverse=True)
