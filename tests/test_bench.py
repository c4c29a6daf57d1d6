"""``fsapp bench`` and ``benchmarks/gpu.sh`` on tiny settings: the figures' shape, the options
table (precision, channels-last, peak memory), and a core that never imports the UI packages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from fsapp.bench import DEFAULT_VARIANTS, Variant, peak_memory, run_bench, time_attack
from fsapp.cli.benchview import show_eval_bench
from fsapp.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_variant_labels_and_parsing():
    assert [v.label for v in DEFAULT_VARIANTS] == ["fp32", "fp32+channels_last", "bf16", "bf16+channels_last"]
    assert Variant.parse("bf16+cl+compile") == Variant("bf16", True, True)
    assert Variant.parse("fp32") == Variant()
    for bad in ("", "fp8", "bf16+fast"):
        with pytest.raises(ValueError, match="bad variant"):
            Variant.parse(bad)


def test_run_bench_figures():
    figures = run_bench(models=["mlp"], repeats=1, batch_size=8, device="cpu",
                        variants=[Variant("fp32"), Variant("bf16", True)], variant_models=["mlp"],
                        evaluation=False)
    t = figures["train_step"]["mlp"]
    for key in ("standard", "madry", "feature-scatter", "ratio_fs_standard", "ratio_madry_standard",
                "ratio_fs_standard_min"):
        assert t[key] > 0, key
    rows = figures["variants"]["mlp"]
    assert [r["variant"] for r in rows] == ["fp32", "bf16+channels_last"]
    for r in rows:
        assert r["ratio_fs_standard"] == pytest.approx(r["feature-scatter"] / r["standard"])
        assert r["standard_images_per_s"] == pytest.approx(8 / r["standard"])
        assert r["feature-scatter_peak_mb"] > 0 and r["standard_peak_mb"] > 0
    assert rows[0]["feature-scatter_speedup_vs_fp32"] == 1.0
    assert figures["device"] == "cpu" and "cpu_bf16_native" in figures and figures["notes"]
    json.dumps(figures)


def test_peak_memory_counts_what_a_step_allocates():
    def step() -> None:
        a = torch.ones(1 << 20)  # 4 MiB
        b = a * 2  # another 4 MiB while a lives
        del a, b

    assert 8 * 2**20 <= peak_memory(step, torch.device("cpu")) < 9 * 2**20


def test_time_attack():
    out = time_attack("mlp", "pgd:steps=2,eps=8/255,step_size=2/255", batch_size=4, repeats=1)
    assert out["images_per_s"] > 0 and out["attack"].startswith("pgd")


@pytest.mark.slow
def test_bench_cli_json_and_table():
    """The whole bench, the reference AutoAttack on 100 images included (about 40 s)."""
    args = ["bench", "--model", "mlp", "--repeats", "1", "--batch-size", "4", "--variant", "fp32",
            "--variant-model", "mlp", "--no-memory"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    assert set(figures["variants"]) == {"mlp"} and "standard_peak_mb" not in figures["variants"]["mlp"][0]
    pgd = figures["eval"]["pgd"]  # the evaluation section: fsapp PGD against torchattacks' PGD
    assert pgd["fsapp_pgd_attack"]["images_per_sec"] > 0 and pgd["torchattacks_pgd"]["images_per_sec"] > 0
    assert pgd["at_least_as_strong"] is True
    aa = figures["eval"]["autoattack"]
    assert aa["more_robust_than_reference"] <= 1  # at least the reference's strength
    assert list(aa["stage_seconds"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert 0.9 <= aa["screen"]["agreement"] <= 1 and aa["screen"]["speedup"] > 1
    assert figures["eval"]["cw"]["at_least_as_strong"] is True
    console = Console(record=True, width=200)
    show_eval_bench(console, figures["eval"])
    text = console.export_text()
    assert "autoattack vs the reference" in text and "CW vs torchattacks" in text and "screen" in text
    result = runner.invoke(app, [*args, "--no-eval"])
    assert result.exit_code == 0, result.output
    assert "training step" in result.stdout and "execution options" in result.stdout


def test_bench_cli_rejects_a_bad_variant():
    result = runner.invoke(app, ["bench", "--variant", "fp8"])
    assert result.exit_code == 2 and "bad variant" in result.output


def test_core_imports_no_ui_package():
    code = ("import sys, fsapp.engine.train, fsapp.bench, fsapp.engine.distributed, fsapp.engine.step; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('textual', 'typer', 'rich')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.slow
def test_gpu_script_runs_tiny_on_the_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1", COMPILE_LIMIT="1")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--tiny"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for variant in ("fp32", "bf16", "bf16+channels_last"):
        assert f" {variant} " in out
    assert "PGD-20" in out and "projected paper-cifar10 wall time" in out
    assert "compile: stopped at its 1s limit" in out  # a section over its limit does not stop the rest
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["projection"]["by_variant"]) == {"fp32", "bf16", "bf16+channels_last"}
    assert summary["projection"]["steps_per_epoch"] == 834


@pytest.mark.parametrize("device", ["tpu", "mps", "cuda:x", ""])
def test_bench_refuses_a_device_this_build_cannot_run(device):
    result = CliRunner().invoke(app, ["bench", "--device", device, "--json"])
    assert result.exit_code == 2 and "valid here: auto, cpu" in result.output
    assert result.output.count("\n") == 1
