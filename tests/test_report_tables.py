"""``fsapp report``: golden tables in every format (a seed group, a report, a run with its own eval
report), notes on differing settings, errors; and a real three-seed group trained end to end.

The golden inputs are real run directories and report files with fixed numbers (written with the
engine's own writers); ``FSAPP_UPDATE_GOLDEN=1`` rewrites tests/golden/report.* from them.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fsapp import config as cfgmod
from fsapp.app.seeds import group_key, seed_group_runs
from fsapp.app.tables import FORMATS, build_table, render, tex_escape
from fsapp.cli.main import app
from fsapp.engine import events as ev
from fsapp.engine.rundir import RunLog
from fsapp.errors import UsageError

GOLDEN = Path(__file__).parent / "golden"
EPS = 8 / 255


def write_run(folder: Path, seed: int, evals: list[dict[str, float]], lr: float = 0.1, n: int = 200,
              gap: float | None = None) -> Path:
    """A finished run directory: resolved config.toml, metrics.jsonl with live evaluations, a model file."""
    folder.mkdir(parents=True)
    cfg = cfgmod.load(None, [f"run.seed={seed}", f"run.name={folder.name}", "run.runs_dir=runs", f"optim.lr={lr}",
                             f"eval.n={n}", "eval.attacks=['pgd:steps=20', 'cw:steps=20']"])
    tables = cfgmod.resolved_tables(cfg)
    (folder / "config.toml").write_text(cfgmod.to_toml(tables))
    log = RunLog(folder / "metrics.jsonl")
    log.write(ev.RunStarted(str(folder), "cpu", len(evals), 10, 0, 0, False, tables))
    for epoch, accuracy in enumerate(evals):
        log.write(ev.EpochEnd(epoch, 1.0, 0.5, lr, 1.0))
        log.write(ev.EvalResult(epoch, n, accuracy, gap, [], 1.0, 10 * (epoch + 1)))
    log.write(ev.Finished(str(folder / "model.safetensors"), str(folder), 3.0))
    log.close()
    (folder / "model.safetensors").write_bytes(f"weights of {folder.name}".encode())
    return folder


def report_json(model: str, sha: str, accuracy: dict[str, float], n: int, attacks: list[str],
                gap: float | None = None, eps: float = EPS) -> dict:
    return {"fsapp_version": "0.1.0", "model": model, "model_sha256": sha, "n": n, "seed": 0,
            "settings": {"attacks": attacks, "eps": eps}, "threat_model": {"norm": "Linf", "eps": eps},
            "accuracy": accuracy, "robust_count": {k: round(v * n) for k, v in accuracy.items()},
            "attacks": [{"key": k, "accuracy": accuracy[k]} for k in attacks], "flags": [],
            "gap_ce_minus_margin": gap}


def acc(clean: float, pgd: float, cw: float) -> dict[str, float]:
    return {"clean": clean, "pgd:steps=20": pgd, "cw:steps=20": cw, "worst_case": min(pgd, cw)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """runs/: a seed group exp-s0..s2 (a first epoch, then the final numbers), a run with another lr
    and its own eval report, an unevaluated run; reports/: one stand-alone report with AutoAttack."""
    base = tmp_path_factory.mktemp("tables")
    runs = base / "runs"
    early = acc(0.5, 0.2, 0.2)
    write_run(runs / "exp-s0", 0, [early, acc(0.8125, 0.5, 0.4875)], gap=0.01)
    write_run(runs / "exp-s1", 1, [early, acc(0.8250, 0.5125, 0.5)], gap=0.02)
    write_run(runs / "exp-s2", 2, [early, acc(0.8375, 0.55, 0.5125)], gap=0.03)
    lr = write_run(runs / "lr_0.05", 0, [acc(0.79, 0.49, 0.48)], lr=0.05)
    sha = hashlib.sha256((lr / "model.safetensors").read_bytes()).hexdigest()
    (lr / "eval").mkdir()
    full = report_json("runs/lr_0.05/model.safetensors", sha, acc(0.801, 0.503, 0.497), 1000,
                       ["pgd:steps=20", "cw:steps=20"], gap=-0.004)
    (lr / "eval" / "20260101-120000.json").write_text(json.dumps(full))
    (lr / "eval" / "robustbench.json").write_text(json.dumps({"clean_acc": "80.10"}))  # not a report: ignored
    (runs / "fresh").mkdir()
    (runs / "fresh" / "config.toml").write_text((runs / "exp-s0" / "config.toml").read_text())
    reports = base / "reports"
    reports.mkdir()
    wrn = dict(acc(0.8512, 0.5503, 0.5401), autoattack=0.4975)
    wrn["worst_case"] = 0.4975
    (reports / "wrn-28-10.json").write_text(json.dumps(report_json(
        "models/wrn-28-10.safetensors", "0" * 64, wrn, 1000, ["pgd:steps=20", "cw:steps=20", "autoattack"],
        gap=0.0123)))
    return base


@pytest.fixture
def in_inputs(inputs, monkeypatch):
    monkeypatch.chdir(inputs)
    return inputs


@pytest.mark.parametrize("fmt", FORMATS)
def test_golden_tables(in_inputs, fmt):
    table = build_table(["runs", "reports/wrn-28-10.json"])
    text = render(table, fmt)
    golden = GOLDEN / f"report.{fmt}"
    if os.environ.get("FSAPP_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text(), f"{fmt} table changed; FSAPP_UPDATE_GOLDEN=1 rewrites tests/golden/"


def test_seed_group_is_one_row_of_mean_and_sample_std(in_inputs):
    table = build_table(["runs"])
    assert [r.label for r in table.rows] == ["exp", "lr_0.05"] and table.first_title == "run"
    group = table.rows[0]
    assert group.group and [m.seed for m in group.members] == [0, 1, 2]
    cell = group.cell("clean")
    assert cell.values == (0.8125, 0.825, 0.8375)  # the last live evaluation of each seed
    assert cell.mean == pytest.approx(statistics.mean(cell.values))
    assert cell.std == pytest.approx(statistics.stdev(cell.values)) and cell.count == 3
    md = render(table, "md")
    assert "| exp | 82.50 ± 1.25 (n=3) |" in md
    single = table.rows[1]
    assert single.members[0].kind == "report" and single.members[0].n == 1000  # its eval report wins
    assert single.cell("gap").mean == -0.004
    assert "fresh has no evaluation yet" in " ".join(table.notes)
    assert any("different numbers of test samples: n=200 for exp; n=1000 for lr_0.05" in n for n in table.notes)


def test_notes_name_differing_budgets_and_attacks(in_inputs, tmp_path):
    other = report_json("m/other.safetensors", "1" * 64, {"clean": 0.9, "fgsm": 0.3, "worst_case": 0.3},
                        1000, ["fgsm"], eps=0.1)
    (tmp_path / "other.json").write_text(json.dumps(other))
    table = build_table(["reports/wrn-28-10.json", tmp_path / "other.json"])
    notes = " | ".join(table.notes)
    assert "different budgets: eps=8/255 for wrn-28-10; eps=0.1 for other" in notes
    assert "different attacks" in notes and "fgsm for other" in notes
    assert "numbers of test samples" not in notes
    assert [c.title for c in table.columns] == ["clean", "pgd:steps=20", "cw:steps=20", "fgsm", "worst case",
                                                "AutoAttack", "gap"]
    assert "| other | 90.00 | - | - | 30.00 | 30.00 | - | - |" in render(table, "md")


def test_a_report_made_on_another_model_file_is_not_used(in_inputs, tmp_path):
    run = tmp_path / "r"
    write_run(run, 0, [acc(0.7, 0.4, 0.3)])
    (run / "eval").mkdir()
    (run / "eval" / "old.json").write_text(json.dumps(report_json("r/model.safetensors", "f" * 64,
                                                                  acc(0.99, 0.9, 0.9), 500, ["pgd:steps=20"])))
    table = build_table([run])
    assert table.rows[0].members[0].kind == "live" and table.rows[0].cell("clean").mean == 0.7
    assert any("old.json was made on another model.safetensors" in n for n in table.notes)


def test_tex_escapes_labels_and_titles():
    assert tex_escape("lr_0.05 & 50% #1 {x} ~ ^ \\") == (
        r"lr\_0.05 \& 50\% \#1 \{x\} \textasciitilde{} \textasciicircum{} \textbackslash{}")


@pytest.mark.parametrize("args, message", [
    (["missing"], "missing does not exist"),
    (["runs/exp-s0/config.toml"], "is neither a run directory nor an eval report"),
    (["runs/fresh"], "nothing to tabulate"),
    (["empty"], "empty holds no run directories or eval reports"),
    (["runs", "--format", "xlsx"], "unknown --format 'xlsx'; valid: md, tex, csv, json"),
])
def test_bad_inputs_are_one_line_and_exit_2(in_inputs, args, message):
    (in_inputs / "empty").mkdir(exist_ok=True)
    result = CliRunner().invoke(app, ["report", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_report_json_is_one_line(tmp_path):
    (tmp_path / "bad.json").write_text("{" * 100_000)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="bad.json is not valid JSON"):
        build_table([tmp_path / "bad.json"])
    with pytest.raises(UsageError, match="list.json is not an fsapp eval report"):
        build_table([tmp_path / "list.json"])


def test_out_file_gets_the_table_and_stdout_its_path(in_inputs, tmp_path):
    out = tmp_path / "t.tex"
    result = CliRunner().invoke(app, ["report", "runs", "--format", "tex", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"table: {out}\n"
    assert out.read_text() == render(build_table(["runs"]), "tex")
    assert out.read_text().startswith("\\begin{tabular}{lrrrrr}\n\\toprule\n")
    assert not list(tmp_path.glob(".*.tmp"))


def test_seed_group_runs_names_and_configs():
    tables = {"run": {"name": "exp", "seed": 5}, "optim": {"lr": 0.1}}
    runs = seed_group_runs(tables, 3)
    assert [name for name, _ in runs] == ["exp-s5", "exp-s6", "exp-s7"]
    assert [t["run"]["seed"] for _, t in runs] == [5, 6, 7]
    assert len({group_key(t) for _, t in runs}) == 1 and tables["run"] == {"name": "exp", "seed": 5}
    assert [n for n, _ in seed_group_runs(tables, [0, 10], base_name="g")] == ["g-s0", "g-s10"]
    unnamed = seed_group_runs({"method": {"perturbation": "madry"}, "data": {"name": "svhn"}}, 1)
    assert unnamed[0][0].endswith("-madry-svhn-s0")
    with pytest.raises(UsageError, match="--seeds must be between 1 and 100"):
        seed_group_runs(tables, 0)
    with pytest.raises(UsageError, match="must differ"):
        seed_group_runs(tables, [1, 1])


def test_three_real_seeds_trained_then_reported_as_one_group(tmp_path, one_thread):
    from fsapp.engine.train import train

    tables = {"run": {"runs_dir": str(tmp_path / "grid"), "name": "tiny"},
              "data": {"name": "digits", "batch_size": 30, "train_limit": 60},
              "model": {"name": "mlp", "hidden": 16},
              "schedule": {"epochs": 1},
              "eval": {"n": 20, "eps": 0.2, "step_size": 0.05, "attacks": ["pgd:steps=2"]}}
    results = []
    for _, run_tables in seed_group_runs(tables, 3):
        results.append([e for e in train(run_tables) if isinstance(e, ev.EvalResult)][-1])
    env = dict(os.environ, COLUMNS="60")
    proc = subprocess.run([sys.executable, "-m", "fsapp", "report", str(tmp_path / "grid"), "--format", "json"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [r["label"] for r in data["rows"]] == ["tiny"] and data["rows"][0]["group"] is True
    values = data["rows"][0]["values"]
    for key in ("clean", "pgd:steps=2", "worst_case"):
        got = values[key]
        assert got["values"] == [r.accuracy[key] for r in results]
        assert got["mean"] == pytest.approx(statistics.mean(got["values"]))
        assert got["count"] == 3
    assert proc.stderr == ""  # same n, eps and attacks: no notes


def test_the_newest_matching_report_of_a_run_is_used(tmp_path):
    run = write_run(tmp_path / "r", 0, [acc(0.7, 0.4, 0.3)])
    sha = hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
    (run / "eval").mkdir()
    for name, clean, when in (("b-old.json", 0.61, 1_000_000), ("a-new.json", 0.62, 2_000_000)):
        path = run / "eval" / name
        path.write_text(json.dumps(report_json("r/model.safetensors", sha, acc(clean, 0.3, 0.3), 100,
                                               ["pgd:steps=20", "cw:steps=20"])))
        os.utime(path, (when, when))
    row = build_table([run]).rows[0]
    assert row.members[0].source.endswith("a-new.json") and row.cell("clean").mean == 0.62


def test_replicas_with_the_same_seed_are_rows_not_a_seed_group(tmp_path):
    write_run(tmp_path / "a", 3, [acc(0.9, 0.5, 0.4)])
    write_run(tmp_path / "b", 3, [acc(0.8, 0.3, 0.2)])
    table = build_table([tmp_path / "a", tmp_path / "b"])
    assert [row.label for row in table.rows] == ["a", "b"]
    assert any("share their configuration and seed" in note for note in table.notes)
    assert "±" not in render(table, "md")
