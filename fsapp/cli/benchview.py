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
    """PGD-20 and CW-20 against torchattacks' loops; AutoAttack and screen against the reference."""
    table = Table(title=f"evaluation: {ev['steps']} steps on {ev['n']} images, eps {ev['eps']:.3g} ({ev['clock']})")
    for col in ("attack", "images/s", "robust accuracy"):
        table.add_column(col, justify="left" if col == "attack" else "right")
    for family in ("pgd", "cw"):
        figures = ev.get(family, {})
        for name in (f"fsapp_{family}_attack", f"fsapp_{family}_evaluate", f"torchattacks_{family}"):
            if name in figures:
                table.add_row(name, f"{figures[name]['images_per_sec']:.0f}", f"{figures[name]['robust_accuracy']:.1%}")
    aa = ev.get("autoattack")
    if aa:
        table.add_row(f"autoattack (n={aa['n']})", f"{aa['images_per_sec']:.1f}", f"{aa['robust_accuracy']:.1%}")
        if "reference" in aa:
            ref = aa["reference"]
            table.add_row("reference AutoAttack", f"{ref['images_per_sec']:.1f}", f"{ref['robust_accuracy']:.1%}")
        sc = aa["screen"]
        table.add_row("screen", f"{aa['n'] / sc['seconds']:.1f}", f"{sc['robust_accuracy']:.1%}")
    console.print(table)
    for family in ("pgd", "cw"):
        figures = ev.get(family, {})
        if "speedup_attack" in figures:
            console.print(f"fsapp {family.upper()} vs torchattacks: {figures['speedup_attack']:.2f}x (attack), "
                          f"{figures['speedup_evaluate']:.2f}x (evaluator); at least as strong: "
                          f"{figures['at_least_as_strong']}", highlight=False)
    if aa:
        if "speedup" in aa:
            console.print(f"autoattack vs the reference: {aa['speedup']:.2f}x; samples more robust than the "
                          f"reference: {aa['more_robust_than_reference']}, less robust: "
                          f"{aa['less_robust_than_reference']}", highlight=False)
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in aa.get("stage_seconds", {}).items())
        console.print(f"autoattack stages: {stages}; screen: {aa['screen']['speedup']:.1f}x faster, "
                      f"agrees on {aa['screen']['agreement']:.1%} of samples", highlight=False)
    if "load_average" in ev:
        console.print("load average: " + " ".join(f"{v:.2f}" for v in ev["load_average"]), highlight=False)
    if "note" in ev:
        console.print(f"[dim]note: {ev['note']}[/]", highlight=False)
