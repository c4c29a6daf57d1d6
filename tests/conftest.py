"""Shared fixtures: installable fake plugins (real entry points), tiny models, a fresh registry."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh_registry():
    """Reload plugins before and after a test that changes what is installed."""
    from fsapp.plugins import reset_registry

    yield reset_registry
    reset_registry()


@pytest.fixture
def install_plugin(tmp_path, fresh_registry, monkeypatch):  # order: the registry resets after sys.path
    """Install a one-module plugin distribution (dist-info with an ``fsapp`` entry point)."""

    def install(dist: str, module: str, source: str, entry: str | None = None) -> Path:
        site = tmp_path / "site"
        site.mkdir(exist_ok=True)
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[fsapp]\n{entry or module} = {module}\n")
        monkeypatch.syspath_prepend(str(site))
        sys.modules.pop(module, None)
        return site

    return install


@pytest.fixture
def tiny_digits_config():
    """Tables for a seconds-long Feature Scattering run on digits."""

    def make(tmp: Path, **over) -> dict:
        tables = {
            "run": {"runs_dir": str(tmp / "runs"), "seed": 1, "log_every": 2},
            "data": {"name": "digits", "batch_size": 30, "train_limit": 180},
            "model": {"name": "small-cnn"},
            "method": {"perturbation": "feature-scatter", "epsilon": 0.2, "step_size": 0.2},
            "schedule": {"epochs": 2, "milestones": [1]},
            "eval": {"n": 40, "eps": 0.2, "step_size": 0.05, "attacks": ["pgd:steps=3", "cw:steps=3"]},
        }
        for key, value in over.items():
            section, _, name = key.partition("__")
            tables.setdefault(section, {})[name] = value
        return tables

    return make


@pytest.fixture
def one_thread():
    """Tiny-tensor tests run faster on one thread (no OpenMP hand-offs on a busy machine)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
