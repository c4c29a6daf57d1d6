"""``fsapp reproduce``: the paper's grid of experiments at a chosen scale, as one command.

A *cell* is one training configuration (Standard, Madry, Feature Scattering, its ablations ...)
under each of ``seeds`` seeds (:func:`fsapp.app.seeds.seed_group_runs`); every run is an ordinary
run directory under ``<out>/runs/`` made by a ``python -m fsapp train`` process, and every
measurement an ordinary ``python -m fsapp eval`` report, so the TUI follows the grid like any
other run and a killed grid resumes: a run is done when its ``model.safetensors`` exists (an
unfinished one is resumed with ``--resume``), an evaluation when its report exists. ``jobs``
processes run at once. Then ``REPORT.md`` (with ``tables.csv`` and ``tables.json``) sets the
paper's published numbers (``fsapp/builtins/_data/published.json``, each with its source) beside
fsapp's, the AutoAttack number beside both, and draws Figure 3's curves and Figure 4's surfaces.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fsapp.app.seeds import seed_group_runs
from fsapp.config import PRESETS, to_toml
from fsapp.errors import UsageError

SCALES = ("digits", "cifar")
METRICS = ("clean", "fgsm", "pgd20", "pgd100", "cw20", "cw100", "autoattack")
METRIC_KEYS = {"clean": "clean", "fgsm": "fgsm:random_start=true", "pgd20": "pgd:steps=20",
               "pgd100": "pgd:steps=100", "cw20": "cw:steps=20", "cw100": "cw:steps=100", "autoattack": "autoattack"}
"""Column -> the key of ``fsapp eval --suite paper --suite autoattack``'s accuracy."""
BLACK_BOX_ATTACKS = ("pgd:steps=20", "pgd:steps=100", "cw:steps=20", "cw:steps=100")
TABLE_TITLES = {
    "1": "Table 1: Standard, Madry, Bilateral and Feature Scattering (CIFAR-10 in the paper)",
    "2a": "Table 2(a): SVHN",
    "2b": "Table 2(b): CIFAR-100",
    "3a": "Table 3(a): perturbation schemes (Random, Supervised, FeaScatter)",
    "3b": "Table 3(b): matching schemes (Uniform, Identity, OT)",
    "4": "Table 4: OT solvers (Sinkhorn, IPOT)",
    "bb": "Black-box attacks on Feature Scattering (Section 5.3): transfer from an Undefended and a Siamese source",
}
Log = Callable[[str], Any]


def published() -> dict[str, Any]:
    """The published numbers with their sources (one data file)."""
    text = resources.files("fsapp.builtins").joinpath("_data/published.json").read_text(encoding="utf-8")
    return json.loads(text)


# --------------------------------------------------------------------------- the plan


@dataclass
class Cell:
    """One training configuration of the grid and the table rows it fills."""

    name: str
    tables: dict[str, Any]
    rows: list[tuple[str, str, str]]  # (table, dataset, published row name)
    seeds: int = 1
    first_seed: int = 0
    cost: float = 1.0  # training cost per image relative to a clean step (for the projection)
    available: str = ""  # why the cell cannot run ("" when it can)

    def runs(self) -> list[tuple[str, dict[str, Any]]]:
        base = copy.deepcopy(self.tables)
        base.setdefault("run", {})["seed"] = self.first_seed
        return seed_group_runs(base, self.seeds, self.name)


@dataclass
class Plan:
    """The cells of a grid and how each model is measured."""

    scale: str
    out: Path
    cells: list[Cell]
    eval_n: int
    aa_n: int
    sweeps: list[str]
    sweep_attack: str
    landscape_grid: int
    quick: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def runs_dir(self) -> Path:
        return self.out / "runs"

    def cell(self, name: str) -> Cell | None:
        return next((c for c in self.cells if c.name == name and not c.available), None)


def _registered(kind: str, name: str) -> bool:
    from fsapp.plugins import get_registry

    try:
        get_registry().get(kind, name)
    except UsageError:
        return False
    return True


def _digits_base(quick: bool) -> dict[str, Any]:
    tables = copy.deepcopy(PRESETS["demo"])
    tables["data"].update({"validation": 0})  # the paper's protocol: whole training set, last epoch
    tables["run"] = {"log_every": 20}
    tables["eval"] = {**tables["eval"], "n": 0}
    if quick:
        tables["schedule"] = {"epochs": 2, "milestones": [1]}
        tables["data"]["train_limit"] = 300
    return tables


def _variant(base: dict[str, Any], **method: Any) -> dict[str, Any]:
    tables = copy.deepcopy(base)
    solver = method.pop("solver", None)
    tables["method"] = {**tables["method"], **method}
    if solver is not None:
        tables["method"]["solver"] = solver
        tables.pop("solver", None)
    return tables


def _cells_digits(quick: bool, seeds: int) -> list[Cell]:
    base = _digits_base(quick)
    eps = base["method"]["epsilon"]
    clean = {"perturbation": "none", "loss": "ce", "label_smoothing": 0.0}
    fs_rows = [("1", "cifar10", "Feature Scattering"), ("3a", "cifar10", "FeaScatter"), ("3b", "cifar10", "OT"),
               ("4", "cifar10", "Sinkhorn")]
    cells = [
        Cell("standard", _variant(base, **clean), [("1", "cifar10", "Standard")], seeds, cost=1.0),
        Cell("fs", base, fs_rows, seeds, cost=2.1),
    ]
    if quick:
        return cells
    cells += [
        Cell("madry", _variant(base, perturbation="supervised", steps=7, step_size=eps / 4, loss="ce",
                               label_smoothing=0.0), [("1", "cifar10", "Madry")], seeds, cost=8.0),
        Cell("bilateral", _variant(base, perturbation="bilateral", steps=1, step_size=eps),
             [("1", "cifar10", "Bilateral")], seeds, cost=2.0,
             available="" if _registered("perturbation", "bilateral") else "the 'bilateral' perturbation is not "
             "available in this fsapp"),
        Cell("random", _variant(base, perturbation="random"), [("3a", "cifar10", "Random")], seeds, cost=1.1),
        Cell("supervised", _variant(base, perturbation="supervised", steps=1, step_size=eps),
             [("3a", "cifar10", "Supervised")], seeds, cost=2.0),
        Cell("uniform", _variant(base, solver="uniform"), [("3b", "cifar10", "Uniform")], seeds, cost=2.1),
        Cell("identity", _variant(base, solver="identity"), [("3b", "cifar10", "Identity")], seeds, cost=2.1),
        Cell("ipot", _variant(base, solver="ipot"), [("4", "cifar10", "IPOT")], seeds, cost=2.2),
        Cell("fs-siamese", base, [], 1, first_seed=1000, cost=2.1),
    ]
    return cells


def _cifar_tables(preset: str, dataset: str | None = None) -> dict[str, Any]:
    tables = copy.deepcopy(PRESETS[preset])
    if dataset is not None and dataset != tables["data"]["name"]:
        tables["data"]["name"] = dataset
        if dataset == "svhn":
            tables["data"]["augment"] = "none"
            tables["optim"]["lr"] = 0.01
    tables["data"]["validation"] = 0  # the paper's protocol
    tables["eval"] = {**tables.get("eval", {}), "n": 1000, "every": 20}
    tables.setdefault("run", {})["log_every"] = 50
    return tables


def _data_present(dataset: str, root: str) -> bool:
    where = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "svhn": "train_32x32.mat"}
    return (Path(root) / where[dataset]).exists()


def _cells_cifar(seeds: int, data_root: str) -> list[Cell]:
    has_bilateral = "bilateral-cifar10" in PRESETS or _registered("perturbation", "bilateral")
    cells: list[Cell] = []
    for dataset, table, paper in (("cifar10", "1", "paper-cifar10"), ("svhn", "2a", "paper-svhn"),
                                  ("cifar100", "2b", "paper-cifar100")):
        suffix = "" if dataset == "cifar10" else f"-{dataset}"
        missing = "" if _data_present(dataset, data_root) else f"no {dataset} files under {data_root}"
        fs_rows = [(table, dataset, "Feature Scattering"), ("4", dataset, "Sinkhorn")]
        if dataset == "cifar10":
            fs_rows += [("3a", dataset, "FeaScatter"), ("3b", dataset, "OT")]
        cells += [
            Cell(f"standard{suffix}", _cifar_tables("standard-cifar10", dataset), [(table, dataset, "Standard")],
                 seeds, cost=1.0, available=missing),
            Cell(f"madry{suffix}", _cifar_tables("madry-cifar10", dataset), [(table, dataset, "Madry")], seeds,
                 cost=8.0, available=missing),
            Cell(f"fs{suffix}", _cifar_tables(paper), fs_rows, seeds, cost=2.1, available=missing),
            Cell(f"ipot{suffix}", _variant(_cifar_tables(paper), solver="ipot"), [("4", dataset, "IPOT")], seeds,
                 cost=2.2, available=missing),
        ]
        bil = (_cifar_tables("bilateral-cifar10", dataset) if "bilateral-cifar10" in PRESETS
               else _variant(_cifar_tables(paper), perturbation="bilateral"))
        cells.append(Cell(f"bilateral{suffix}", bil, [(table, dataset, "Bilateral")], seeds, cost=2.0,
                          available=missing or ("" if has_bilateral else "the 'bilateral' perturbation is not "
                                                "available in this fsapp")))
    base = _cifar_tables("paper-cifar10")
    missing = "" if _data_present("cifar10", data_root) else f"no cifar10 files under {data_root}"
    cells += [
        Cell("random", _variant(base, perturbation="random"), [("3a", "cifar10", "Random")], seeds, cost=1.1,
             available=missing),
        Cell("supervised", _variant(base, perturbation="supervised", steps=1), [("3a", "cifar10", "Supervised")],
             seeds, cost=2.0, available=missing),
        Cell("uniform", _variant(base, solver="uniform"), [("3b", "cifar10", "Uniform")], seeds, cost=2.1,
             available=missing),
        Cell("identity", _variant(base, solver="identity"), [("3b", "cifar10", "Identity")], seeds, cost=2.1,
             available=missing),
        Cell("fs-siamese", base, [], 1, first_seed=1000, cost=2.1, available=missing),
    ]
    for cell in cells:
        cell.tables["data"]["root"] = data_root
    return cells


def make_plan(scale: str, out: Path, seeds: int = 1, quick: bool = False, data_root: str = "data") -> Plan:
    """The grid of ``scale`` (``digits``: the embedded set on a CPU; ``cifar``: the paper's runs)."""
    if scale not in SCALES:
        raise UsageError(f"unknown scale '{scale}'; valid: {', '.join(SCALES)}")
    if not 1 <= seeds <= 100:
        raise UsageError(f"--seeds must be between 1 and 100, got {seeds}")
    if scale == "digits":
        eps = PRESETS["demo"]["method"]["epsilon"]
        plan = Plan(scale, out, _cells_digits(quick, seeds), eval_n=60 if quick else 360, aa_n=20 if quick else 360,
                    sweeps=[f"eps=0:{2 * eps:g}:{5 if quick else 9}", "steps=1,5,20" if quick else
                            "steps=1,2,5,10,20,50,100"], sweep_attack="pgd:steps=20",
                    landscape_grid=11 if quick else 41, quick=quick)
        plan.notes.append("digits scale: small-cnn on the embedded 8x8 digits (1437 train / 360 test), eps "
                          f"{eps:g}, the demo preset's 15-epoch schedule; the published numbers are the paper's "
                          "(CIFAR-10, SVHN, CIFAR-100, WRN-28-10, eps 8/255): compare orderings, not values")
        if quick:
            plan.notes.append("--quick: a reduced grid (Standard and Feature Scattering, 2 epochs on 300 images, "
                              "small evaluations) for tests; the other rows are not run")
        return plan
    if quick:
        raise UsageError("--quick is a digits-scale option (a reduced grid for tests)")
    plan = Plan(scale, out, _cells_cifar(seeds, data_root), eval_n=10000, aa_n=10000,
                sweeps=["eps=0:16/255:9", "steps=1,5,10,20,40,100"], sweep_attack="pgd:steps=20", landscape_grid=41)
    plan.notes.append("cifar scale: the paper's presets (WRN-28-10, 200 epochs, eps 8/255), trained on the whole "
                      "training set and evaluated at the last epoch on the whole test set, as the paper did "
                      "(data.validation = 0)")
    return plan


# --------------------------------------------------------------------------- tasks


@dataclass
class Task:
    """One process of the grid: a train or eval command and the file that says it is done."""

    name: str
    argv: list[str]
    done_file: Path
    log: Path
    resume_argv: list[str] | None = None  # used when ``resume_if`` exists and the task is not done
    resume_if: Path | None = None
    status: str = "pending"  # pending, skipped (done before), done, failed, not available
    seconds: float = 0.0

    def done(self) -> bool:
        return self.done_file.is_file()


def _fsapp(*args: str) -> list[str]:
    return [sys.executable, "-m", "fsapp", *args]


def _model(plan: Plan, run: str) -> Path:
    return plan.runs_dir / run / "model.safetensors"


def _report(plan: Plan, run: str, what: str) -> Path:
    return plan.runs_dir / run / "eval" / f"{what}.json"


def cell_tasks(plan: Plan, cell: Cell) -> list[list[Task]]:
    """Per run of the cell: [train, evaluate] (a chain), with its config written beside the grid."""
    chains = []
    for run, tables in cell.runs():
        run_dir = plan.runs_dir / run
        tables["run"]["runs_dir"] = str(plan.runs_dir)
        config = plan.out / "configs" / f"{run}.toml"
        train = Task(f"train {run}", _fsapp("train", str(config), "--run-dir", str(run_dir), "-q"),
                     run_dir / "model.safetensors", plan.out / "logs" / f"{run}-train.log",
                     resume_argv=_fsapp("train", "--resume", str(run_dir), "-q"), resume_if=run_dir / "config.toml")
        train.config_text = to_toml(tables)  # type: ignore[attr-defined]
        train.config_path = config  # type: ignore[attr-defined]
        measure = Task(f"eval {run}", _fsapp("eval", str(run_dir / "model.safetensors"), "--suite", "paper",
                                             "--n", str(plan.eval_n), "--out", str(_report(plan, run, "paper")),
                                             "-q"),
                       _report(plan, run, "paper"), plan.out / "logs" / f"{run}-eval.log")
        aa = Task(f"autoattack {run}", _fsapp("eval", str(run_dir / "model.safetensors"), "--suite", "autoattack",
                                              "--n", str(plan.aa_n), "--out", str(_report(plan, run, "autoattack")),
                                              "-q"),
                  _report(plan, run, "autoattack"), plan.out / "logs" / f"{run}-autoattack.log")
        chains.append([train, measure, aa])
    return chains


def derived_tasks(plan: Plan) -> list[Task]:
    """Black-box transfers, Figure 3's sweeps and Figure 4's surfaces (after the cells)."""
    tasks: list[Task] = []
    fs = plan.cell("fs")
    if fs is None:
        return tasks
    target = fs.runs()[0][0]
    attacks = [a for spec in BLACK_BOX_ATTACKS for a in ("--attack", spec)]
    for label, cell_name in (("undefended", "standard"), ("siamese", "fs-siamese")):
        source = plan.cell(cell_name)
        if source is None:
            continue
        src_run = source.runs()[0][0]
        tasks.append(Task(f"black-box {label}", _fsapp("eval", str(_model(plan, target)), "--source",
                                                       str(_model(plan, src_run)), *attacks, "--n", str(plan.eval_n),
                                                       "--out", str(_report(plan, target, f"blackbox-{label}")), "-q"),
                          _report(plan, target, f"blackbox-{label}"), plan.out / "logs" / f"blackbox-{label}.log"))
    figure_cells = [c for c in (plan.cell("standard"), plan.cell("madry"), fs) if c is not None]
    for cell in figure_cells:
        run = cell.runs()[0][0]
        for sweep in plan.sweeps:
            key = sweep.split("=")[0]
            tasks.append(Task(f"sweep {key} {run}", _fsapp("eval", str(_model(plan, run)), "--attack", plan.sweep_attack,
                                                           "--sweep", sweep, "--n", str(min(plan.eval_n, 200)),
                                                           "--out", str(_report(plan, run, f"sweep-{key}")), "-q"),
                              _report(plan, run, f"sweep-{key}"), plan.out / "logs" / f"sweep-{key}-{run}.log"))
    first, *others = [c.runs()[0][0] for c in figure_cells]
    compare = [a for run in others for a in ("--compare", str(_model(plan, run)))]
    tasks.append(Task("landscape", _fsapp("eval", str(_model(plan, first)), "--landscape", "--index", "0",
                                          "--index", "1", *compare, "--grid", str(plan.landscape_grid), "--n", "10",
                                          "--out", str(plan.out / "figures" / "figure4.json"), "-q"),
                      plan.out / "figures" / "figure4.json", plan.out / "logs" / "figure4.log"))
    return tasks


# --------------------------------------------------------------------------- running


class Runner:
    """Runs tasks as child processes, ``jobs`` at a time; finished ones are skipped."""

    def __init__(self, jobs: int, log: Log) -> None:
        if jobs < 1:
            raise UsageError(f"--jobs must be >= 1, got {jobs}")
        self.jobs = jobs
        self.log = log
        self.lock = threading.Lock()
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
        self.env = env

    def run(self, task: Task) -> bool:
        if task.done():
            task.status = "skipped"
            return True
        config = getattr(task, "config_path", None)
        argv = task.argv
        if task.resume_if is not None and task.resume_if.is_file() and task.resume_argv is not None:
            argv = task.resume_argv
        elif config is not None:
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text(task.config_text, encoding="utf-8")  # type: ignore[attr-defined]
        task.log.parent.mkdir(parents=True, exist_ok=True)
        task.done_file.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(task.log, "a", encoding="utf-8") as fh:
            fh.write(f"$ {' '.join(argv)}\n")
            fh.flush()
            proc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, env=self.env, check=False)
        task.seconds = time.perf_counter() - t0
        ok = proc.returncode == 0 and task.done()
        task.status = "done" if ok else "failed"
        with self.lock:
            self.log(f"{task.status:6} {task.name} ({task.seconds:.0f}s)" + ("" if ok else f": see {task.log}"))
        return ok

    def chain(self, tasks: list[Task]) -> None:
        for task in tasks:
            if not self.run(task):
                for rest in tasks[tasks.index(task) + 1:]:
                    rest.status = "failed"
                return

    def run_all(self, chains: list[list[Task]]) -> None:
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            list(pool.map(self.chain, chains))


def reproduce(plan: Plan, jobs: int = 1, log: Log = print) -> dict[str, Any]:
    """Run (or resume) the grid, then write the report directory; returns the tables as data."""
    plan.out.mkdir(parents=True, exist_ok=True)
    runner = Runner(jobs, log)
    t0 = time.perf_counter()
    chains = [chain for cell in plan.cells if not cell.available for chain in cell_tasks(plan, cell)]
    runner.run_all(chains)
    derived = derived_tasks(plan)
    runner.run_all([[t] for t in derived])
    tasks = [t for chain in chains for t in chain] + derived
    return write_report(plan, tasks, time.perf_counter() - t0)


# --------------------------------------------------------------------------- the report


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _measured(plan: Plan, cell: Cell) -> dict[str, list[float]]:
    """Per metric, the accuracy (%) of each seed's run that has a report."""
    out: dict[str, list[float]] = {m: [] for m in METRICS}
    for run, _ in cell.runs():
        for what in ("paper", "autoattack"):
            data = _read(_report(plan, run, what))
            if data is None:
                continue
            for metric in METRICS:
                value = data.get("accuracy", {}).get(METRIC_KEYS[metric])
                if value is not None and (what == "autoattack") == (metric == "autoattack"):
                    out[metric].append(100 * value)
    return out


def _black_box(plan: Plan) -> dict[str, dict[str, list[float]]]:
    fs = plan.cell("fs")
    out: dict[str, dict[str, list[float]]] = {}
    if fs is None:
        return out
    target = fs.runs()[0][0]
    for label, row in (("undefended", "Undefended"), ("siamese", "Siamese")):
        data = _read(_report(plan, target, f"blackbox-{label}"))
        if data is None:
            continue
        acc = data.get("accuracy", {})
        out[row] = {m: [100 * acc[f"transfer/{METRIC_KEYS[m]}"]] for m in ("pgd20", "pgd100", "cw20", "cw100")
                    if f"transfer/{METRIC_KEYS[m]}" in acc}
    return out


def _stat(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values), "values": values}


def _cell_text(paper: float | None, ours: dict[str, Any] | None) -> str:
    left = "–" if paper is None else f"{paper:.1f}"
    if ours is None:
        right = "–"
    elif ours["n"] > 1:
        right = f"{ours['mean']:.1f} ± {ours['std']:.1f}"
    else:
        right = f"{ours['mean']:.1f}"
    return f"{left} / {right}"


def build_tables(plan: Plan, tasks: list[Task]) -> list[dict[str, Any]]:
    """Every published table with its rows: the published value, fsapp's mean/std, the source."""
    pub = published()
    rows_by_key = {(r["table"], r["dataset"], r["row"]): r for r in pub["rows"]}
    fills: dict[tuple[str, str, str], tuple[Cell, dict[str, list[float]]]] = {}
    for cell in plan.cells:
        measured = _measured(plan, cell) if not cell.available else {}
        for key in cell.rows:
            fills[key] = (cell, measured)
    black = _black_box(plan)
    failed = {t.name.split(" ", 1)[1].rsplit("-s", 1)[0] for t in tasks if t.status == "failed"}
    tables = []
    for table_id, title in TABLE_TITLES.items():
        rows = []
        for (tid, dataset, row_name), row in rows_by_key.items():
            if tid != table_id:
                continue
            if table_id == "bb":
                values = black.get(row_name, {})
                status = "measured" if values else ("not run" if plan.cell("fs") is None else "missing")
                cell_name = "fs (target)"
            elif (tid, dataset, row_name) in fills:
                cell, values = fills[(tid, dataset, row_name)]
                cell_name = cell.name
                status = (f"not available: {cell.available}" if cell.available else
                          "failed" if cell.name in failed else "measured" if any(values.values()) else "missing")
            else:
                values, cell_name = {}, ""
                status = ("not run (--quick)" if plan.quick and dataset == "cifar10" else
                          f"not run at the {plan.scale} scale")
            rows.append({"row": row_name, "dataset": dataset, "source": row["source"], "cell": cell_name,
                         "status": status, "published": row["values"],
                         "fsapp": {m: _stat(values.get(m, [])) for m in METRICS}})
        tables.append({"id": table_id, "title": title, "rows": rows})
    return tables


def _md_table(table: dict[str, Any]) -> list[str]:
    metrics = [m for m in METRICS if table["id"] != "bb" or m in ("pgd20", "pgd100", "cw20", "cw100")]
    lines = [f"### {table['title']}", "",
             "| row | run | " + " | ".join(m.replace("autoattack", "AutoAttack") for m in metrics) + " | status |",
             "|---|---|" + "---:|" * len(metrics) + "---|"]
    for row in table["rows"]:
        cells = [_cell_text(row["published"].get(m), row["fsapp"][m]) for m in metrics]
        lines.append(f"| {row['row']} ({row['dataset']}) | {row['cell'] or '–'} | " + " | ".join(cells)
                     + f" | {row['status']} |")
    lines.append("")
    return lines


def _figure3(plan: Plan) -> list[str]:
    """One PNG per sweep key with a curve per model (the paper's Figure 3)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return ["Figure 3 needs matplotlib: pip install 'fsapp[plots]'"]
    from fsapp.checkpoint import atomic_write_bytes

    written = []
    for sweep in plan.sweeps:
        key = sweep.split("=")[0]
        fig = Figure(figsize=(5.5, 4.0), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        drawn = 0
        for name in ("standard", "madry", "fs"):
            cell = plan.cell(name)
            data = _read(_report(plan, cell.runs()[0][0], f"sweep-{key}")) if cell else None
            if not data or not data.get("sweeps"):
                continue
            sw = data["sweeps"][0]
            xs = [v * 255 for v in sw["values"]] if key == "eps" else sw["values"]
            ax.plot(xs, [100 * v for v in sw["worst_case"]], marker="o", label=name)
            drawn += 1
        if not drawn:
            continue
        ax.set_xlabel("eps (x 1/255)" if key == "eps" else "attack steps")
        ax.set_ylabel(f"accuracy under {plan.sweep_attack} (%)")
        ax.set_title(f"Figure 3: accuracy vs {key}")
        ax.grid(alpha=0.3)
        ax.legend()
        import io

        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        path = plan.out / "figures" / f"figure3-{key}.png"
        atomic_write_bytes(path, buffer.getvalue())
        written.append(str(path.relative_to(plan.out)))
    return written


def write_report(plan: Plan, tasks: list[Task], seconds: float) -> dict[str, Any]:
    """REPORT.md, tables.csv, tables.json and the figures in ``plan.out``."""
    from fsapp.checkpoint import atomic_write_text

    tables = build_tables(plan, tasks)
    figures = _figure3(plan)
    landscape = _read(plan.out / "figures" / "figure4.json")
    pngs = [f"figures/{Path(p).name}" for p in (landscape or {}).get("landscape", {}).get("png", [])]
    counts = {s: sum(t.status == s for t in tasks) for s in ("done", "skipped", "failed")}
    data = {"scale": plan.scale, "quick": plan.quick, "seeds": plan.cells[0].seeds if plan.cells else 0,
            "seconds": seconds, "tasks": counts, "notes": plan.notes, "tables": tables,
            "figures": {"figure3": figures, "figure4": pngs}}
    lines = [f"# Reproducing Zhang & Wang (NeurIPS 2019) with fsapp: {plan.scale} scale", "",
             f"Each cell reads `published / fsapp` (accuracy, %); fsapp's number is the mean ± std over "
             f"{data['seeds']} seed(s). The AutoAttack column sets the published AutoAttack number (where one "
             "exists: RobustBench, not the paper) beside fsapp's standard AutoAttack on the first "
             f"{plan.aa_n} test images; the other columns use {plan.eval_n} test images.", ""]
    lines += [f"- {note}" for note in plan.notes]
    lines += [f"- tasks this time: {counts['done']} run, {counts['skipped']} already done, {counts['failed']} failed;"
              f" {seconds:.0f} s", ""]
    for table in tables:
        lines += _md_table(table)
    lines += ["## Figures", ""]
    lines += [f"- Figure 3: ![{f}]({f})" if f.endswith(".png") else f"- {f}" for f in figures]
    lines += [f"- Figure 4: ![{p}]({p})" for p in pngs]
    if landscape:
        lines += [f"- Figure 4 note: {n}" for n in landscape.get("notes", []) if n.startswith("landscape")]
    lines += ["", "Every run is a directory under `runs/` (config, metrics, model, eval reports); "
              "`fsapp tui` shows them. The published numbers and their sources are in "
              "`fsapp/builtins/_data/published.json`.", ""]
    atomic_write_text(plan.out / "REPORT.md", "\n".join(lines))
    atomic_write_text(plan.out / "tables.json", json.dumps(data, indent=2) + "\n")
    atomic_write_text(plan.out / "tables.csv", _csv(tables))
    return data


def _csv(tables: list[dict[str, Any]]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["table", "row", "dataset", "metric", "published", "fsapp_mean", "fsapp_std", "seeds", "status",
                     "source"])
    for table in tables:
        for row in table["rows"]:
            for metric in METRICS:
                ours = row["fsapp"][metric]
                paper = row["published"].get(metric)
                if paper is None and ours is None:
                    continue
                writer.writerow([table["id"], row["row"], row["dataset"], metric, "" if paper is None else paper,
                                 "" if ours is None else f"{ours['mean']:.2f}",
                                 "" if ours is None else f"{ours['std']:.2f}", "" if ours is None else ours["n"],
                                 row["status"], row["source"]])
    return buffer.getvalue()


# --------------------------------------------------------------------------- the dry run


CIFAR_CLEAN_IMAGES_PER_SEC = 1500.0
"""Assumed clean WRN-28-10 training throughput (images/s, one recent data-centre GPU, fp32) for
the projection; adversarial steps cost ``Cell.cost`` times a clean step."""
DIGITS_CLEAN_IMAGES_PER_SEC = 4000.0
"""Measured order of magnitude for small-cnn on digits, one CPU core."""


def projection(plan: Plan) -> tuple[list[str], float]:
    """The plan as lines (cells, runs, commands) and the projected hours of training."""
    lines = [f"scale {plan.scale}: {len(plan.cells)} cells, out {plan.out}"]
    total = 0.0
    rate = CIFAR_CLEAN_IMAGES_PER_SEC if plan.scale == "cifar" else DIGITS_CLEAN_IMAGES_PER_SEC
    for cell in plan.cells:
        sizes = {"cifar10": 50000, "cifar100": 50000, "svhn": 73257, "digits": 1437}
        epochs = int(cell.tables["schedule"]["epochs"])
        images = sizes.get(cell.tables["data"]["name"], 50000) * epochs
        seconds = images * cell.cost / rate * cell.seeds
        rows = ", ".join(f"Table {t} {r}" + ("" if d in ("cifar10",) else f" ({d})") for t, d, r in cell.rows) or \
            "black-box source"
        total += seconds
        missing = f"  (cannot run here: {cell.available})" if cell.available else ""
        lines.append(f"  {cell.name:<18} {cell.seeds} run(s) x {epochs} epochs, ~{seconds / 3600:.1f} h  [{rows}]"
                     + missing)
        for run, _ in cell.runs():
            lines.append(f"      {run}: fsapp train {plan.out / 'configs' / (run + '.toml')} --run-dir "
                         f"{plan.runs_dir / run}; fsapp eval --suite paper --n {plan.eval_n}; --suite autoattack "
                         f"--n {plan.aa_n}")
    lines.append("  then: black-box transfers (Undefended, Siamese -> fs), Figure 3 sweeps "
                 f"({', '.join(plan.sweeps)}), Figure 4 landscape")
    hours = total / 3600
    lines.append(f"projected training time: ~{hours:.0f} h of one device (assumes {rate:.0f} clean images/s; "
                 "evaluation, above all AutoAttack on the whole test set, comes on top); with --jobs N devices "
                 f"~{hours:.0f}/N h" if plan.scale == "cifar" else
                 f"projected training time: ~{total / 60:.0f} min on one core (evaluation comes on top)")
    return lines, hours


def plan_for_dry_run(plan: Plan) -> str:
    lines, _ = projection(plan)
    return "\n".join(lines + [f"note: {n}" for n in plan.notes]) + "\n"
