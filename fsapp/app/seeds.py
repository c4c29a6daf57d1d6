"""Seed groups: one configuration trained under several seeds, as separate runs of one group.

Runs of a group differ only in ``run.seed`` (and in their names); ``fsapp report`` recognises
them by comparing the resolved configurations without :data:`SEED_FREE_KEYS` and reports them as
one row, mean +- std over the seeds. The live evaluation subset (``eval.seed``) stays the same
for every seed, so the runs are compared on the same samples.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from typing import Any

from fsapp.config import DataSection, MethodSection
from fsapp.errors import UsageError

__all__ = ["MAX_SEEDS", "SEED_FREE_KEYS", "group_key", "seed_group_runs"]

SEED_FREE_KEYS: tuple[tuple[str, str], ...] = (("run", "seed"), ("run", "name"), ("run", "runs_dir"))
"""Keys in which the runs of one seed group may differ."""
MAX_SEEDS = 100


def group_key(tables: dict[str, Any]) -> str:
    """A canonical text of a resolved configuration without its seed-free keys: two runs belong
    to one seed group exactly when their keys are equal."""
    reduced = copy.deepcopy(tables)
    for table, key in SEED_FREE_KEYS:
        section = reduced.get(table)
        if isinstance(section, dict):
            section.pop(key, None)
    return json.dumps(reduced, sort_keys=True, default=str)


def seed_group_runs(config_tables: dict[str, Any], seeds: int | Sequence[int],
                    base_name: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """The runs of a seed group: ``(run name, config tables)`` per seed, named ``<name>-s<seed>``.

    ``seeds`` is a count N (seeds ``run.seed``, ``run.seed + 1``, ... ``run.seed + N - 1``) or
    the seeds themselves. The group's name is ``base_name``, else ``run.name``, else
    ``<time>-<perturbation>-<dataset>`` as an unnamed run would get. The tables are copies;
    only ``run.seed`` and ``run.name`` differ between them.
    """
    run = config_tables.get("run", {}) or {}
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if not 1 <= seeds <= MAX_SEEDS:
            raise UsageError(f"--seeds must be between 1 and {MAX_SEEDS}, got {seeds}")
        first = int(run.get("seed", 0) or 0)
        chosen = list(range(first, first + seeds))
    else:
        chosen = [int(s) for s in seeds]
        if not 1 <= len(chosen) <= MAX_SEEDS:
            raise UsageError(f"a seed group needs 1 to {MAX_SEEDS} seeds, got {len(chosen)}")
        if len(set(chosen)) != len(chosen):
            raise UsageError(f"the seeds of a group must differ; got {', '.join(map(str, chosen))}")
    if any(s < 0 for s in chosen):
        raise UsageError(f"seeds must be >= 0; got {', '.join(map(str, chosen))}")
    name = base_name or str(run.get("name") or "")
    if not name:
        method = config_tables.get("method", {}) or {}
        data = config_tables.get("data", {}) or {}
        name = (f"{time.strftime('%Y%m%d-%H%M%S')}-{method.get('perturbation', MethodSection.perturbation)}"
                f"-{data.get('name', DataSection.name)}")
    out: list[tuple[str, dict[str, Any]]] = []
    for seed in chosen:
        tables = copy.deepcopy(config_tables)
        tables.setdefault("run", {})
        tables["run"]["seed"] = seed
        tables["run"]["name"] = f"{name}-s{seed}"
        out.append((tables["run"]["name"], tables))
    return out
