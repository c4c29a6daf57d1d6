"""Result tables: eval reports and run directories turned into one table (Markdown, LaTeX, CSV, JSON).

Inputs (:func:`build_table`):

- an eval report (the JSON ``fsapp eval`` writes);
- a run directory: its newest ``eval/*.json`` report made on the run's current
  ``model.safetensors``, else the last live evaluation (``EvalResult``) in ``metrics.jsonl``;
- a folder of those (searched a few levels deep, e.g. a grid of runs).

Rows are models or runs; columns are clean accuracy, each attack, the worst case, AutoAttack
and the CE-minus-margin gap, where present. Runs whose resolved configurations differ only in
their seed (see :mod:`fsapp.app.seeds`) form one row: mean +- sample standard deviation over the
seeds, with their number. :func:`render` writes the table; ``Table.notes`` says what a reader
must know (rows evaluated on different samples, budgets or attacks; inputs skipped).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsapp.app.seeds import group_key
from fsapp.engine import rundir
from fsapp.errors import UsageError

__all__ = ["FORMATS", "Cell", "Column", "Entry", "Row", "Table", "build_table", "render"]

FORMATS = ("md", "tex", "csv", "json")
MAX_REPORT_BYTES = 64 << 20
MAX_DEPTH = 4
"""How many folder levels below a given folder are searched for runs and reports."""


@dataclass(frozen=True)
class Entry:
    """One evaluation of one model: what a table row is made of."""

    label: str
    source: str  # the file the numbers come from (a report, or a run's metrics.jsonl)
    kind: str  # "report" or "live"
    accuracy: dict[str, float]
    gap: float | None
    n: int
    eps: float | None
    attacks: tuple[str, ...]
    seed: int | None = None


@dataclass(frozen=True)
class Column:
    """A column: the accuracy key it shows and its title."""

    key: str
    title: str


@dataclass(frozen=True)
class Cell:
    """A column's value in one row: the mean over the row's members, their sample std, and how
    many members have the value."""

    mean: float | None
    std: float | None
    count: int
    values: tuple[float, ...]


@dataclass
class Row:
    """A table row: one evaluation, or a seed group of runs."""

    label: str
    members: list[Entry]
    group: bool = False

    def cell(self, key: str) -> Cell:
        values = tuple(v for v in (_value(e, key) for e in self.members) if v is not None)
        if not values:
            return Cell(None, None, 0, ())
        mean = math.fsum(values) / len(values)
        std = None
        if len(values) > 1:
            std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))
        return Cell(mean, std, len(values), values)


@dataclass
class Table:
    """Rows, columns and the notes a reader needs."""

    columns: list[Column]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    first_title: str = "model"


def _value(entry: Entry, key: str) -> float | None:
    return entry.gap if key == "gap" else entry.accuracy.get(key)


# --------------------------------------------------------------------------- reading


def _is_run_dir(path: Path) -> bool:
    return (path / rundir.CONFIG).is_file() or (path / rundir.METRICS).is_file()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _load_report(path: Path) -> dict[str, Any]:
    """A report's JSON, checked for the fields a table needs; UsageError otherwise."""
    try:
        size = path.stat().st_size
        if size > MAX_REPORT_BYTES:
            raise UsageError(f"{path} is {size:,} bytes, too large for an eval report")
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"{path} is not valid JSON ({' '.join(str(exc).split())[:120]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("accuracy"), dict):
        raise UsageError(f"{path} is not an fsapp eval report (no 'accuracy' table)")
    acc = data["accuracy"]
    if not _number(acc.get("clean")) or not all(isinstance(k, str) and _number(v) for k, v in acc.items()):
        raise UsageError(f"{path} is not an fsapp eval report ('accuracy' must map names to numbers, with 'clean')")
    if not isinstance(data.get("n"), int) or isinstance(data.get("n"), bool) or data["n"] < 1:
        raise UsageError(f"{path} is not an fsapp eval report (no sample count 'n')")
    return data


def _report_label(data: dict[str, Any], path: Path) -> str:
    model = data.get("model")
    if isinstance(model, str) and model:
        model_path = Path(model)
        if model_path.name == rundir.MODEL and model_path.parent.name:
            return model_path.parent.name
        return model_path.stem
    return path.stem


def _report_entry(data: dict[str, Any], path: Path, label: str, seed: int | None = None) -> Entry:
    threat = data.get("threat_model") if isinstance(data.get("threat_model"), dict) else {}
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    eps = threat.get("eps", settings.get("eps"))
    runs = data.get("attacks") if isinstance(data.get("attacks"), list) else []
    attacks = tuple(str(a["key"]) for a in runs if isinstance(a, dict) and "key" in a)
    if not attacks:
        attacks = tuple(k for k in data["accuracy"] if k not in ("clean", "worst_case"))
    gap = data.get("gap_ce_minus_margin")
    return Entry(label, str(path), "report", {k: float(v) for k, v in data["accuracy"].items()},
                 float(gap) if _number(gap) else None, int(data["n"]), float(eps) if _number(eps) else None,
                 attacks, seed)


def _sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def _age(path: Path) -> tuple[float, str]:
    """Sort key: modification time, then name (report names are timestamps)."""
    try:
        mtime = path.stat().st_mtime
    except OSError:
        mtime = 0.0
    return (mtime, path.name)


@dataclass
class _Run:
    """What a run directory offers: its live evaluation and its newest matching report."""

    path: Path
    config: dict[str, Any]
    live: Entry | None
    report: Entry | None

    @property
    def best(self) -> Entry | None:
        return self.report or self.live


def _read_run(path: Path, shown: str, notes: list[str]) -> _Run:
    config = rundir.read_config(path)
    run = config.get("run", {}) if isinstance(config.get("run"), dict) else {}
    seed = run.get("seed") if isinstance(run.get("seed"), int) else None
    label = path.resolve().name or shown
    state = rundir.load_state(path)
    live = None
    last = state.last_eval
    if last is not None:
        eval_table = config.get("eval", {}) if isinstance(config.get("eval"), dict) else {}
        eps = eval_table.get("eps")
        attacks = tuple(k for k in last.accuracy if k not in ("clean", "worst_case", "autoattack"))
        if "autoattack" in last.accuracy:
            attacks += ("autoattack",)
        live = Entry(label, str(Path(shown) / rundir.METRICS), "live", dict(last.accuracy), last.gap, last.n,
                     float(eps) if _number(eps) else None, attacks, seed)
    report = None
    folder = path / rundir.EVAL_DIR
    candidates = sorted(folder.glob("*.json"), key=_age, reverse=True) if folder.is_dir() else []
    model_sha: str | None = None
    for candidate in candidates:
        try:
            data = _load_report(candidate)
        except UsageError:
            continue  # a RobustBench entry or another JSON file beside the reports
        if model_sha is None:
            model_sha = _sha256(path / rundir.MODEL) or ""
        if data.get("model_sha256") and model_sha and data["model_sha256"] != model_sha:
            notes.append(f"{Path(shown) / rundir.EVAL_DIR / candidate.name} was made on another "
                         f"{rundir.MODEL} than the run's current one; not used")
            continue
        report = _report_entry(data, Path(shown) / rundir.EVAL_DIR / candidate.name, label, seed)
        break
    return _Run(path, config, live, report)


def _shown(path: Path, base: Path, given: str) -> str:
    """``path`` as the user would write it: below the path they gave."""
    try:
        return str(Path(given) / path.relative_to(base)) if path != base else given
    except ValueError:
        return str(path)


def _collect(paths: Sequence[str | Path], notes: list[str]) -> list[tuple[str, Any]]:
    """Inputs in order as ``("run", _Run)`` or ``("report", Entry)``; bad paths raise a UsageError."""
    items: list[tuple[str, Any]] = []
    seen: set[Path] = set()

    def add_run(path: Path, shown: str) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            items.append(("run", _read_run(path, shown, notes)))

    def add_report(path: Path, shown: str, strict: bool) -> None:
        key = path.resolve()
        if key in seen:
            return
        try:
            data = _load_report(path)
        except UsageError as exc:
            if strict:
                raise
            notes.append(f"skipped {shown}: {str(exc).replace(str(path), '').strip()}")
            return
        seen.add(key)
        items.append(("report", _report_entry(data, Path(shown), _report_label(data, Path(shown)))))

    def walk(folder: Path, base: Path, given: str, depth: int) -> int:
        found = 0
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise UsageError(f"cannot list {_shown(folder, base, given)}: {exc.strerror or exc}") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            shown = _shown(path, base, given)
            if entry.is_dir():
                if _is_run_dir(path):
                    add_run(path, shown)
                    found += 1
                elif depth < MAX_DEPTH:
                    found += walk(path, base, given, depth + 1)
            elif entry.name.endswith(".json") and entry.is_file():
                before = len(items)
                add_report(path, shown, strict=False)
                found += len(items) - before
        return found

    for given in paths:
        text = str(given)
        path = Path(os.path.expanduser(text))
        if not path.exists():
            raise UsageError(f"{text} does not exist; give eval reports (.json), run directories or folders of them")
        if path.is_dir():
            if _is_run_dir(path):
                add_run(path, text)
            elif walk(path, path, text, 1) == 0:
                raise UsageError(f"{text} holds no run directories or eval reports")
        elif path.suffix.lower() == ".json":
            add_report(path, text, strict=True)
        else:
            raise UsageError(f"{text} is neither a run directory nor an eval report (.json)")
    return items


# --------------------------------------------------------------------------- grouping


def _group_label(runs: list[_Run]) -> str:
    names = [r.path.resolve().name for r in runs]
    stems = [re.sub(r"-s\d+$", "", name) for name in names]
    if len(set(stems)) == 1 and stems[0]:
        return stems[0]
    prefix = os.path.commonprefix(names).rstrip("-_. ")
    return prefix or stems[0]


def _rows(items: list[tuple[str, Any]], notes: list[str]) -> list[Row]:
    groups: dict[str, list[_Run]] = {}
    for kind, item in items:
        if kind == "run" and item.config and item.best is not None:
            groups.setdefault(group_key(item.config), []).append(item)
    for key, members in list(groups.items()):
        seeds = [(m.config.get("run") or {}).get("seed") for m in members]
        if len(members) > 1 and len(set(map(str, seeds))) < len(seeds):  # replicas, not a seed group
            notes.append(f"{', '.join(m.path.resolve().name for m in members)} share their configuration and "
                         "seed: shown as separate rows, not as a seed group")
            del groups[key]
    rows: list[Row] = []
    placed: set[str] = set()
    for kind, item in items:
        if kind == "report":
            rows.append(Row(item.label, [item]))
            continue
        run: _Run = item
        if run.best is None:
            notes.append(f"{run.path.resolve().name} has no evaluation yet (no live evaluation in {rundir.METRICS}, "
                         f"no {rundir.EVAL_DIR}/*.json report); skipped")
            continue
        key = group_key(run.config) if run.config else None
        members = groups.get(key, [run]) if key is not None else [run]
        if len(members) < 2:
            rows.append(Row(run.best.label, [run.best]))
            continue
        if key in placed:
            continue
        placed.add(key)
        label = _group_label(members)
        if all(m.report is not None for m in members):
            entries = [m.report for m in members]
        else:
            entries = [m.live or m.best for m in members]
            if any(m.report is not None for m in members):
                notes.append(f"{label}: not every seed has an eval report, so the group uses the live "
                             "evaluations of all its runs")
        rows.append(Row(label, [e for e in entries if e is not None], group=True))
    return rows


def _unique_labels(rows: list[Row]) -> None:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.label] = counts.get(row.label, 0) + 1
    for row in rows:
        if counts[row.label] > 1 and not row.group:
            entry = row.members[0]
            row.label = f"{row.label} ({'live' if entry.kind == 'live' else Path(entry.source).name})"
    seen: dict[str, int] = {}
    for row in rows:
        seen[row.label] = seen.get(row.label, 0) + 1
        if seen[row.label] > 1:
            row.label = f"{row.label} #{seen[row.label]}"


def _columns(rows: list[Row]) -> list[Column]:
    attacks: list[str] = []
    auto: list[str] = []
    for row in rows:
        for entry in row.members:
            for key in list(entry.attacks) + list(entry.accuracy):
                if key in ("clean", "worst_case") or key not in entry.accuracy:
                    continue
                bucket = auto if key.split(":")[0] == "autoattack" else attacks
                if key not in bucket:
                    bucket.append(key)
    columns = [Column("clean", "clean")] + [Column(k, k) for k in attacks]
    if any("worst_case" in e.accuracy for r in rows for e in r.members):
        columns.append(Column("worst_case", "worst case"))
    columns += [Column(k, "AutoAttack" if k == "autoattack" else k) for k in auto]
    if any(e.gap is not None for r in rows for e in r.members):
        columns.append(Column("gap", "gap"))
    return columns


def eps_text(eps: float | None) -> str:
    """``8/255`` for a whole number of 1/255 steps, else the number; ``?`` when unknown."""
    if eps is None:
        return "?"
    k = eps * 255
    if abs(k - round(k)) < 1e-6 and abs(round(eps, 4) - eps) > 1e-12:
        return f"{round(k)}/255"
    return f"{eps:.6g}"


def _settings_notes(rows: list[Row]) -> list[str]:
    """A note for each setting (samples, budget, attacks) that differs between rows or seeds."""
    notes: list[str] = []

    def differ(what: str, value: Any) -> None:
        by_value: dict[str, list[str]] = {}
        for row in rows:
            texts = [value(e) for e in row.members]
            if len(set(texts)) == 1:
                by_value.setdefault(texts[0], []).append(row.label)
            else:
                for e, text in zip(row.members, texts, strict=True):
                    by_value.setdefault(text, []).append(f"{row.label} (seed {e.seed})")
        if len(by_value) > 1:
            notes.append(f"rows were evaluated {what}: "
                         + "; ".join(f"{v} for {', '.join(labels)}" for v, labels in by_value.items()))

    differ("on different numbers of test samples", lambda e: f"n={e.n}")
    differ("at different budgets", lambda e: f"eps={eps_text(e.eps)}")
    differ("with different attacks (an empty cell: not run)", lambda e: ", ".join(e.attacks) or "no attack")
    return notes


def build_table(paths: Iterable[str | Path]) -> Table:
    """One table from eval reports, run directories and folders of them (UsageError for a bad path,
    or when none of them holds an evaluation)."""
    given = list(paths)
    if not given:
        raise UsageError("give at least one eval report, run directory or folder")
    notes: list[str] = []
    items = _collect(given, notes)
    rows = _rows(items, notes)
    if not rows:
        raise UsageError("nothing to tabulate: none of " + ", ".join(map(str, given)) + " holds an evaluation")
    _unique_labels(rows)
    notes += _settings_notes(rows)
    every_run = all(kind == "run" for kind, _ in items)
    return Table(_columns(rows), rows, notes, "run" if every_run else "model")


# --------------------------------------------------------------------------- rendering


def _pct(value: float, signed: bool) -> str:
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def _display(row: Row, column: Column, pm: str, count: str) -> str:
    cell = row.cell(column.key)
    if cell.mean is None:
        return "-"
    signed = column.key == "gap"
    if not row.group:
        return _pct(cell.mean, signed)
    std = _pct(cell.std, False) if cell.std is not None else "0.00"
    return f"{_pct(cell.mean, signed)}{pm}{std}{count.format(n=cell.count)}"


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def render_md(table: Table) -> str:
    """A GitHub Markdown table, accuracies in percent; seed groups as ``mean ± std (n=K)``."""
    head = [table.first_title] + [c.title for c in table.columns]
    lines = ["| " + " | ".join(_md_escape(h) for h in head) + " |",
             "|" + "---|" + "---:|" * len(table.columns)]
    for row in table.rows:
        cells = [_md_escape(row.label)] + [_display(row, c, " ± ", " (n={n})") for c in table.columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def tex_escape(text: str) -> str:
    """Text safe inside a LaTeX table cell."""
    return "".join(_TEX.get(ch, ch) for ch in " ".join(text.split()))


def render_tex(table: Table) -> str:
    """A booktabs ``tabular``, accuracies in percent; seed groups as ``mean $\\pm$ std ($n=K$)``."""
    lines = [r"\begin{tabular}{l" + "r" * len(table.columns) + "}", r"\toprule",
             " & ".join(tex_escape(t) for t in [table.first_title] + [c.title for c in table.columns]) + r" \\",
             r"\midrule"]
    for row in table.rows:
        cells = [tex_escape(row.label)] + [_display(row, c, r" $\pm$ ", r" ($n={n}$)") for c in table.columns]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _num(value: float | None) -> str:
    return "" if value is None else repr(value)


def render_csv(table: Table) -> str:
    """One line per row: accuracies as fractions (mean, and std for seed groups), the number of
    runs, their seeds, samples and eps (as numbers), and the source files."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    head = [table.first_title, "runs", "seeds", "samples", "eps"]
    for c in table.columns:
        head += [c.key, f"{c.key} std"]
    writer.writerow(head + ["sources"])
    for row in table.rows:
        members = row.members
        line = [row.label, str(len(members)),
                ";".join(str(e.seed) for e in members if e.seed is not None) if row.group else "",
                ";".join(sorted({str(e.n) for e in members})),
                ";".join(sorted({_num(e.eps) for e in members}))]
        for c in table.columns:
            cell = row.cell(c.key)
            line += [_num(cell.mean), _num(cell.std)]
        writer.writerow(line + [";".join(e.source for e in members)])
    return buffer.getvalue()


def table_dict(table: Table) -> dict[str, Any]:
    """The table as plain data (what ``--format json`` prints)."""
    rows = []
    for row in table.rows:
        values = {}
        for c in table.columns:
            cell = row.cell(c.key)
            values[c.key] = {"mean": cell.mean, "std": cell.std, "count": cell.count, "values": list(cell.values)}
        rows.append({
            "label": row.label,
            "group": row.group,
            "members": [{"source": e.source, "kind": e.kind, "seed": e.seed, "n": e.n, "eps": e.eps,
                         "attacks": list(e.attacks)} for e in row.members],
            "values": values,
        })
    return {"columns": [{"key": c.key, "title": c.title} for c in table.columns], "first": table.first_title,
            "rows": rows, "notes": list(table.notes)}


def render_json(table: Table) -> str:
    """:func:`table_dict` as indented JSON (accuracies as fractions)."""
    return json.dumps(table_dict(table), indent=2) + "\n"


_RENDERERS = {"md": render_md, "tex": render_tex, "csv": render_csv, "json": render_json}


def render(table: Table, fmt: str) -> str:
    """The table as ``md``, ``tex``, ``csv`` or ``json`` text."""
    if fmt not in _RENDERERS:
        raise UsageError(f"unknown table format '{fmt}'; valid: {', '.join(FORMATS)}")
    return _RENDERERS[fmt](table)
