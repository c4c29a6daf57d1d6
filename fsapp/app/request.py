"""What an evaluation is asked: one request type for the eval job, the CLI and the TUI.

Kept apart from :mod:`fsapp.app.evaljob` (which loads torch) so that a front end can build a
request, and the ``fsapp eval`` command line it stands for, without importing the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class EvalRequest:
    """What to evaluate and how; the defaults are ``fsapp eval``'s.

    ``eps`` is text (``8/255``; None: the model file's eval eps); ``data_root`` None: the root the
    model file records, else ``data``; ``state`` None: a hidden file beside the report.
    """

    model: Path
    attacks: list[str] = field(default_factory=list)
    suites: list[str] = field(default_factory=list)
    sweeps: list[str] = field(default_factory=list)
    source: Path | None = None
    n: int = 1000
    batch_size: int = 250
    seed: int = 0
    device: str = "auto"
    eps: str | None = None
    data_root: str | None = None
    out: Path | None = None
    robustbench_json: Path | None = None
    resume: bool = False
    state: Path | None = None
    events: Path | None = None
    landscape: bool = False  # also the loss surfaces of Figure 4 (clean accuracy only unless attacks are named)
    landscape_index: list[int] = field(default_factory=lambda: [0])
    landscape_direction: str = "grad"  # grad: sign of the CE input gradient; pgd: of the PGD-20 perturbation
    grid: int = 41
    clip: bool = True
    compare: list[Path] = field(default_factory=list)  # more model files: one panel each, shared z-scale

    def args(self) -> list[str]:
        """The ``fsapp eval`` command line a user would type for this request (the arguments after
        ``fsapp``; a front end that runs it as a process adds ``--out`` and ``--events``)."""
        out = ["eval", str(self.model)]
        for suite in self.suites:
            out += ["--suite", suite]
        for spec in self.attacks:
            out += ["--attack", spec]
        for sweep in self.sweeps:
            out += ["--sweep", sweep]
        if self.source is not None:
            out += ["--source", str(self.source)]
        out += ["--n", str(self.n), "--seed", str(self.seed), "--batch-size", str(self.batch_size)]
        if self.eps:
            out += ["--eps", self.eps]
        if self.device != "auto":
            out += ["--device", self.device]
        if self.robustbench_json is not None:
            out += ["--robustbench-json", str(self.robustbench_json)]
        return out
