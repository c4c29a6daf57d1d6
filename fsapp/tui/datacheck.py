"""Is the dataset a configuration names on disk? A quick look at its files, then, when some are
missing, the dataset's own loader gives the message (it stops at its file check, before reading)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fsapp.config import Config
from fsapp.errors import FsappError

# dataset -> (folder under data.root, the files torchvision's layout puts there)
FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")),
    "cifar100": ("cifar-100-python", ("train", "test", "meta")),
    "svhn": ("", ("train_32x32.mat", "test_32x32.mat")),
}


def files_present(name: str, params: dict[str, Any]) -> bool:
    """Whether the files dataset ``name`` reads exist (True for datasets without files)."""
    root = Path(os.path.expanduser(str(params.get("root", "data"))))
    if name in FILES:
        folder, files = FILES[name]
        return all((root / folder / f).is_file() for f in files)
    if name == "imagefolder":
        return (root / "train").is_dir() and (root / "test").is_dir()
    return True


def data_problem(cfg: Config) -> str | None:
    """One line saying why the configured dataset cannot be loaded, or None when its files are there
    (or it has none, or it will be downloaded)."""
    name = cfg.data.name
    params = dict(cfg.extras.get("data", {}))
    if params.get("download") or files_present(name, params):
        return None
    from fsapp.plugins import get_registry

    try:
        get_registry().get("dataset", name).build(params)
    except FsappError as exc:
        return str(exc)
    except Exception as exc:  # a plugin's loader: its failure, in one line
        return f"dataset '{name}' cannot be loaded: {exc}"
    return None
