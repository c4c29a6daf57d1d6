"""``fsapp reproduce``: the published numbers file, the plan, the dry run, and a reduced digits grid
end to end in a subprocess, then again to show that finished cells are skipped."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from PIL import Image

from fsapp.app.reproduce import METRICS, TABLE_TITLES, make_plan, published
from fsapp.errors import UsageError
from fsapp.plugins import get_registry


def test_published_numbers_have_a_source_and_match_the_paper():
    rows = published()["rows"]
    assert {r["table"] for r in rows} == set(TABLE_TITLES)
    for row in rows:
        assert row["source"] and set(row["values"]) <= set(METRICS)
    fs = next(r for r in rows if r["table"] == "1" and r["row"] == "Feature Scattering")
    assert fs["values"]["pgd20"] == 70.5 and fs["values"]["cw100"] == 60.6 and fs["values"]["autoattack"] == 36.64
    madry = next(r for r in rows if r["table"] == "1" and r["row"] == "Madry")
    assert [madry["values"][m] for m in ("clean", "fgsm", "pgd20", "pgd100", "cw20", "cw100")] == \
        [85.7, 54.9, 44.9, 44.8, 45.7, 45.4]


def test_digits_plan_marks_bilateral_by_the_registry(tmp_path):
    plan = make_plan("digits", tmp_path)
    names = [c.name for c in plan.cells]
    assert names[:3] == ["standard", "fs", "madry"] and "ipot" in names and "fs-siamese" in names
    bilateral = next(c for c in plan.cells if c.name == "bilateral")
    try:
        get_registry().get("perturbation", "bilateral")
        assert bilateral.available == ""
    except UsageError:
        assert "not available" in bilateral.available
    runs = make_plan("digits", tmp_path, seeds=3).cells[0].runs()
    assert [name for name, _ in runs] == ["standard-s0", "standard-s1", "standard-s2"]
    assert all(t["data"]["validation"] == 0 for _, t in runs)  # the paper's protocol: last epoch, whole train set
    with pytest.raises(UsageError, match="unknown scale"):
        make_plan("imagenet", tmp_path)
    with pytest.raises(UsageError, match="--quick"):
        make_plan("cifar", tmp_path, quick=True)


def _fsapp(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "fsapp", *args], capture_output=True, text=True, timeout=timeout)


def test_dry_run_cifar_prints_the_plan_without_training(tmp_path):
    out = tmp_path / "grid"
    proc = _fsapp("reproduce", "--scale", "cifar", "--dry-run", "--out", str(out), "--data-root", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "fs-svhn" in proc.stdout and "madry-cifar100" in proc.stdout and "projected training time" in proc.stdout
    assert "200 epochs" in proc.stdout and "cannot run here: no cifar10 files" in proc.stdout
    assert not out.exists()


@pytest.mark.slow
def test_quick_digits_grid_end_to_end_then_resumes(tmp_path):
    out = tmp_path / "grid"
    t0 = time.perf_counter()
    proc = _fsapp("reproduce", "--scale", "digits", "--quick", "--seeds", "1", "--jobs", "2", "--out", str(out),
                  timeout=300)
    first = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = (out / "REPORT.md").read_text()
    assert "Table 1" in report and "Table 4" in report and "Black-box" in report
    data = json.loads((out / "tables.json").read_text())
    table1 = next(t for t in data["tables"] if t["id"] == "1")
    fs = next(r for r in table1["rows"] if r["row"] == "Feature Scattering")
    assert fs["status"] == "measured" and fs["published"]["pgd20"] == 70.5
    assert 0 <= fs["fsapp"]["pgd20"]["mean"] <= 100 and fs["fsapp"]["autoattack"] is not None
    assert next(r for r in table1["rows"] if r["row"] == "Madry")["status"] == "not run (--quick)"
    bb = next(t for t in data["tables"] if t["id"] == "bb")
    assert next(r for r in bb["rows"] if r["row"] == "Undefended")["status"] == "measured"
    assert "pgd20" in (out / "tables.csv").read_text()
    for png in data["figures"]["figure3"] + data["figures"]["figure4"]:
        with Image.open(out / png) as img:
            assert img.size[0] > 300
    assert len(data["figures"]["figure4"]) == 2
    # Every cell is an ordinary run directory.
    assert (out / "runs" / "fs-s0" / "metrics.jsonl").is_file() and (out / "runs" / "fs-s0" / "config.toml").is_file()

    # Again: nothing is redone. Then one lost report is remade and nothing else.
    proc = _fsapp("reproduce", "--scale", "digits", "--quick", "--out", str(out), timeout=120)
    assert proc.returncode == 0 and json.loads((out / "tables.json").read_text())["tasks"] == \
        {"done": 0, "skipped": 12, "failed": 0}
    (out / "runs" / "standard-s0" / "eval" / "paper.json").unlink()
    proc = _fsapp("reproduce", "--scale", "digits", "--quick", "--out", str(out), timeout=120)
    assert proc.returncode == 0 and json.loads((out / "tables.json").read_text())["tasks"] == \
        {"done": 1, "skipped": 11, "failed": 0}
    assert first < 150
