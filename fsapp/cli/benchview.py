"""Rich tables for ``fsapp bench``."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def show_bench(console: Console, figures: dict[str, Any]) -> None:
    """Print training-step times and ratios."""
    table = Table(title=f"training step, batch {figures['batch_size']}, {figures['device']}, "
                        f"median of {figures['repeats']}")
    for col in ("model", "standard", "madry", "feature-scatter", "FS / standard", "madry / standard"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for spec, t in figures["train_step"].items():
        table.add_row(spec, f"{t['standard'] * 1e3:.1f} ms", f"{t['madry'] * 1e3:.1f} ms",
                      f"{t['feature-scatter'] * 1e3:.1f} ms", f"{t['ratio_fs_standard']:.2f}x",
                      f"{t['ratio_madry_standard']:.2f}x")
    console.print(table)
