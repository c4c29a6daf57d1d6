"""Rich tables for ``fsapp bench``."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def show_bench(console: Console, figures: dict[str, Any]) -> None:
    """Print training-step times and ratios, then the execution-option variants."""
    table = Table(title=f"training step, batch {figures['batch_size']}, {figures['device']}, "
                        f"median of {figures['repeats']}")
    cpu = any("ratio_fs_standard_cpu" in t for t in figures["train_step"].values())
    cols = ["model", "standard", "madry", "feature-scatter", "FS / standard", "(from minima)"]
    cols += ["(CPU time)"] if cpu else []
    for col in cols + ["madry / standard"]:
        table.add_column(col, justify="right" if col != "model" else "left")
    for spec, t in figures["train_step"].items():
        extra = [f"{t['ratio_fs_standard_cpu']:.2f}x"] if cpu else []
        table.add_row(spec, _ms(t["standard"]), _ms(t["madry"]), _ms(t["feature-scatter"]),
                      f"{t['ratio_fs_standard']:.2f}x", f"{t.get('ratio_fs_standard_min', float('nan')):.2f}x",
                      *extra, f"{t['ratio_madry_standard']:.2f}x")
    console.print(table)
    variants = figures.get("variants") or {}
    if any(variants.values()):
        vt = Table(title="execution options (standard and feature-scatter steps)")
        cols = ("model", "variant", "standard", "feature-scatter", "FS / standard", "images/s std",
                "images/s FS", "FS speedup vs fp32", "peak MB std", "peak MB FS")
        for col in cols:
            vt.add_column(col, justify="left" if col in ("model", "variant") else "right")
        for spec, rows in variants.items():
            for r in rows:
                vt.add_row(
                    spec, r["variant"], _ms(r["standard"]), _ms(r["feature-scatter"]),
                    f"{r['ratio_fs_standard']:.2f}x", f"{r['standard_images_per_s']:.0f}",
                    f"{r['feature-scatter_images_per_s']:.0f}",
                    f"{r.get('feature-scatter_speedup_vs_fp32', float('nan')):.2f}x",
                    f"{r['standard_peak_mb']:.0f}" if "standard_peak_mb" in r else "-",
                    f"{r['feature-scatter_peak_mb']:.0f}" if "feature-scatter_peak_mb" in r else "-",
                )
        console.print(vt)
    if "eval" in figures:
        show_eval_bench(console, figures["eval"])
    for note in figures.get("notes", []):
        console.print(f"[dim]note: {note}[/]", highlight=False)


def show_eval_bench(console: Console, ev: dict[str, Any]) -> None:
    """PGD-20 throughput and strength against torchattacks, and AutoAttack throughput."""
    table = Table(title=f"evaluation: PGD-{ev['steps']} on {ev['n']} images, eps {ev['eps']:.3g} ({ev['clock']})")
    for col in ("attack", "images/s", "robust accuracy"):
        table.add_column(col, justify="left" if col == "attack" else "right")
    pgd = ev["pgd"]
    for name in ("fsapp_pgd_attack", "fsapp_pgd_evaluate", "torchattacks_pgd"):
        if name in pgd:
            table.add_row(name, f"{pgd[name]['images_per_sec']:.0f}", f"{pgd[name]['robust_accuracy']:.1%}")
    if "autoattack" in ev:
        aa = ev["autoattack"]
        table.add_row(f"autoattack (n={aa['n']})", f"{aa['images_per_sec']:.1f}", f"{aa['robust_accuracy']:.1%}")
    console.print(table)
    if "speedup_attack" in pgd:
        console.print(f"fsapp PGD vs torchattacks: {pgd['speedup_attack']:.2f}x (attack), "
                      f"{pgd['speedup_evaluate']:.2f}x (evaluator); at least as fast: {pgd['at_least_as_fast']}, "
                      f"at least as strong: {pgd['at_least_as_strong']}", highlight=False)
    if "note" in ev:
        console.print(f"[dim]note: {ev['note']}[/]", highlight=False)
