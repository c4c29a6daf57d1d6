"""Import contracts of the fsapp package, checked with ``ast`` over every file in ``fsapp/``.

The rules (the project guide and issue 9):

- the core (everything but ``fsapp/cli`` and ``fsapp/tui``) never imports ``fsapp.cli``,
  ``fsapp.tui``, typer, rich or textual, at module level or inside a function;
- ``fsapp.tui`` never imports ``fsapp.cli``;
- nothing inside the package imports the package face (``import fsapp``, or ``from fsapp import
  NAME`` where NAME is not a submodule);
- every import inside a function body (a lazy import) of an fsapp module or a third-party
  package is deliberate: listed in ``LAZY_IMPORTS`` below with its reason;
- the module-level imports between fsapp modules form no cycle;
- ``pickle`` is imported only by the restricted CIFAR unpickler and ``torch.load`` is called only
  on the ``import-checkpoint --trust`` path.

Nothing is imported to check these: the files are parsed, so a broken module still gets a clear
contract failure rather than an import error.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fsapp"

UI_PACKAGES = ("typer", "rich", "textual", "click")
PICKLE_MODULES = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle", "shelve")

# Why an import sits inside a function rather than at the top of its module. Standard-library
# modules are exempt (importing them is cheap and changes no layering).
FACE = "keeps `import fsapp` light: torch, the engine and the plugin registry load on first use of the API"
CLI_FAST = "the CLI loads torch and the engine only in the command that needs them (`fsapp --help` stays fast)"
TUI_FAST = "the TUI loads torch and the engine only when a job needs them"
TEXTUAL_ON_DEMAND = "textual loads only for `fsapp tui`"
AT_RUN_TIME = ("the plugin registry is built (built-ins and entry points loaded) at run time, on first use, "
               "never as a side effect of importing this module")
BUILTIN_USES_REGISTRY = ("a built-in is itself loaded by fsapp.plugins; it reaches the registry only at call "
                         "time (feature-scatter builds its solver by name)")
HEAVY_OPTIONAL = "a heavy or optional third-party package, needed only on this path"
BENCH_ONLY = "needed only by `fsapp bench`"
APP_ON_DEMAND = ("the application layer is imported by both front ends; a job loads torch and the engine only "
                 "when it runs, so `fsapp --help` and the TUI start fast")
ENGINE_ON_DEMAND = "loaded on the path that needs it (a heavier module, or one that imports this one back)"

# (importing module, imported module) -> why it is lazy. A new lazy import fails
# test_lazy_imports_are_listed, which prints the lines to paste here.
LAZY_IMPORTS: dict[tuple[str, str], str] = {
    ("fsapp", "fsapp.checkpoint"): FACE,
    ("fsapp", "fsapp.engine.evaluate"): FACE,
    ("fsapp", "fsapp.engine.train"): FACE,
    ("fsapp", "fsapp.plugins"): FACE,
    ("fsapp.app.evaljob", "fsapp._version"): APP_ON_DEMAND,
    ("fsapp.app.evaljob", "fsapp.checkpoint"): APP_ON_DEMAND,
    ("fsapp.app.evaljob", "fsapp.engine.distributed"): APP_ON_DEMAND,
    ("fsapp.app.evaljob", "fsapp.engine.evaluate"): APP_ON_DEMAND,
    ("fsapp.app.evaljob", "fsapp.engine.landscape"): CLI_FAST + " (only --landscape needs it)",
    ("fsapp.app.evaljob", "fsapp.engine.rundir"): APP_ON_DEMAND,
    ("fsapp.app.evaljob", "fsapp.engine.sweep"): APP_ON_DEMAND,
    ("fsapp.app.evaljob", "fsapp.plugins"): AT_RUN_TIME,
    ("fsapp.app.evaljob", "fsapp.registry"): APP_ON_DEMAND,
    ("fsapp.app.examples", "fsapp.adversary"): APP_ON_DEMAND,
    ("fsapp.app.examples", "fsapp.checkpoint"): APP_ON_DEMAND,
    ("fsapp.app.examples", "fsapp.engine.checks"): APP_ON_DEMAND,
    ("fsapp.app.examples", "fsapp.plugins"): AT_RUN_TIME,
    ("fsapp.app.examples", "fsapp.registry"): APP_ON_DEMAND,
    ("fsapp.app.examples", "safetensors"): APP_ON_DEMAND,
    ("fsapp.app.examples", "safetensors.torch"): APP_ON_DEMAND,
    ("fsapp.app.jobs", "fsapp.config"): APP_ON_DEMAND,
    ("fsapp.app.reproduce", "fsapp.checkpoint"): APP_ON_DEMAND,
    ("fsapp.app.reproduce", "fsapp.plugins"): AT_RUN_TIME,
    ("fsapp.app.reproduce", "matplotlib.backends.backend_agg"): HEAVY_OPTIONAL,
    ("fsapp.app.reproduce", "matplotlib.figure"): HEAVY_OPTIONAL,
    ("fsapp.bench", "fsapp.bench.evaluation"): BENCH_ONLY,
    ("fsapp.bench", "fsapp.engine.distributed"): BENCH_ONLY,
    ("fsapp.bench.evaluation", "fsapp.data"): BENCH_ONLY,
    ("fsapp.bench.evaluation", "fsapp.engine.distributed"): BENCH_ONLY,
    ("fsapp.bench.evaluation", "fsapp.engine.evaluate"): BENCH_ONLY,
    ("fsapp.bench.evaluation", "fsapp.engine.step"): BENCH_ONLY,
    ("fsapp.bench.evaluation", "fsapp.losses"): BENCH_ONLY,
    ("fsapp.bench.evaluation", "fsapp.plugins"): AT_RUN_TIME,
    ("fsapp.bench.evaluation", "torch.nn.functional"): HEAVY_OPTIONAL + " (the benchmark's reference or profiler)",
    ("fsapp.bench.evaluation", "torchattacks"): HEAVY_OPTIONAL + " (the benchmark's reference or profiler)",
    ("fsapp.bench.timing", "torch.profiler"): HEAVY_OPTIONAL + " (the benchmark's reference or profiler)",
    ("fsapp.bench.train", "fsapp.plugins"): AT_RUN_TIME,
    ("fsapp.builtins.datasets", "scipy.io"): HEAVY_OPTIONAL + " (SVHN .mat files)",
    ("fsapp.builtins.datasets", "torchvision.datasets"): HEAVY_OPTIONAL + " (file lists and checksums of on-disk sets)",
    ("fsapp.builtins.datasets", "torchvision.datasets.utils"): HEAVY_OPTIONAL + " (checksums, downloads)",
    ("fsapp.builtins.imagefolder", "PIL"): HEAVY_OPTIONAL,
    ("fsapp.builtins.perturbations", "fsapp.plugins"): BUILTIN_USES_REGISTRY,
    ("fsapp.builtins.trackers", "torch.utils.tensorboard"): HEAVY_OPTIONAL,
    ("fsapp.checkpoint", "fsapp.plugins"): AT_RUN_TIME + " (a model file is rebuilt by name)",
    ("fsapp.cli.evalcmd", "fsapp.engine.sweep"): CLI_FAST,
    ("fsapp.cli.main", "fsapp._version"): CLI_FAST,
    ("fsapp.cli.main", "fsapp.app.evaljob"): CLI_FAST,
    ("fsapp.cli.main", "fsapp.app.trainjob"): CLI_FAST,
    ("fsapp.cli.main", "fsapp.bench"): CLI_FAST,
    ("fsapp.cli.main", "fsapp.cli.benchview"): CLI_FAST,
    ("fsapp.cli.main", "fsapp.cli.ctl"): CLI_FAST,
    ("fsapp.cli.main", "fsapp.cli.evalcmd"): CLI_FAST,
    ("fsapp.cli.main", "fsapp.cli.render"): CLI_FAST,
    ("fsapp.cli.main", "fsapp.cli.reportcmd"): CLI_FAST,
    ("fsapp.cli.main", "fsapp.cli.reproducecmd"): CLI_FAST,
    ("fsapp.cli.main", "fsapp.config"): CLI_FAST,
    ("fsapp.cli.main", "fsapp.engine.events"): CLI_FAST,
    ("fsapp.cli.main", "fsapp.engine.rundir"): CLI_FAST,
    ("fsapp.cli.main", "fsapp.importers"): CLI_FAST,
    ("fsapp.cli.main", "fsapp.plugins"): AT_RUN_TIME,
    ("fsapp.cli.main", "fsapp.registry"): CLI_FAST,
    ("fsapp.cli.main", "fsapp.tui.app"): TEXTUAL_ON_DEMAND,
    ("fsapp.config", "fsapp.plugins"): AT_RUN_TIME,
    ("fsapp.engine.distributed", "torch.nn.parallel"): "DDP is needed only to unwrap a model under torchrun",
    ("fsapp.engine.evaluate", "fsapp.engine.adaptive"): ENGINE_ON_DEMAND,
    ("fsapp.engine.evaluate", "fsapp.engine.distributed"): ENGINE_ON_DEMAND,
    ("fsapp.engine.evaluate", "fsapp.engine.flags"): ENGINE_ON_DEMAND,
    ("fsapp.engine.evaluate", "fsapp.plugins"): AT_RUN_TIME,
    ("fsapp.engine.landscape", "matplotlib.backends.backend_agg"): HEAVY_OPTIONAL + " (the landscape PNG)",
    ("fsapp.engine.landscape", "matplotlib.figure"): HEAVY_OPTIONAL + " (the landscape PNG)",
    ("fsapp.engine.landscape", "numpy"): HEAVY_OPTIONAL + " (with matplotlib, the landscape PNG)",
    ("fsapp.engine.plan", "fsapp.plugins"): AT_RUN_TIME,
    ("fsapp.engine.sweep", "fsapp.plugins"): AT_RUN_TIME,
    ("fsapp.engine.sweep", "matplotlib.backends.backend_agg"): HEAVY_OPTIONAL + " (the PNG curve)",
    ("fsapp.engine.sweep", "matplotlib.figure"): HEAVY_OPTIONAL + " (the PNG curve)",
    ("fsapp.engine.train", "fsapp.plugins"): AT_RUN_TIME,
    ("fsapp.importers", "fsapp.plugins"): AT_RUN_TIME,
    ("fsapp.registry", "fsapp.plugins"): AT_RUN_TIME,
    ("fsapp.tui.app", "fsapp.plugins"): AT_RUN_TIME,
    ("fsapp.tui.datacheck", "fsapp.plugins"): "the dataset's own loader, only when its files are missing (loads the plugins)",
    ("fsapp.tui.form", "fsapp.plugins"): AT_RUN_TIME,
    ("fsapp.tui.screens.compare", "fsapp.app.tables"): "the table exporter, only when the user exports",
    ("fsapp.tui.screens.evaluate", "fsapp.engine.evaluate"): TUI_FAST,
    ("fsapp.tui.screens.evaluate", "fsapp.engine.sweep"): TUI_FAST,
    ("fsapp.tui.screens.newrun", "fsapp.plugins"): AT_RUN_TIME,
    ("fsapp.tui.screens.plugins", "fsapp.plugins"): AT_RUN_TIME,
    ("fsapp.tui.screens.report", "fsapp.app.examples"): TUI_FAST,
}

# Where pickle may be imported, and torch.load called, with the reason.
PICKLE_ALLOWED: dict[str, str] = {
    "fsapp.builtins.datasets": "the official CIFAR batches are pickles; read by a restricted unpickler "
                               "that accepts only plain containers and numpy arrays",
}
TORCH_LOAD_ALLOWED: dict[str, str] = {
    "fsapp.importers": "fsapp import-checkpoint --trust: the user vouches for the file, opened with "
                       "torch.load(weights_only=True)",
}


@dataclass(frozen=True)
class Import:
    """One imported module, as an ``import`` or ``from ... import`` statement names it."""

    module: str   # the importing module, e.g. "fsapp.engine.train"
    target: str   # the imported module, resolved, e.g. "fsapp.engine.evaluate" or "typer"
    line: int
    lazy: bool    # inside a function body: runs when the function runs
    typing: bool  # under ``if TYPE_CHECKING:``: never runs
    face_names: tuple[str, ...] = ()  # names taken from the package face by ``from fsapp import``


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_module(name: str) -> bool:
    return name in _modules()


def _is_typing_guard(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve_from(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    is_package = _modules()[module].name == "__init__.py"
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _walk(module: str, node: ast.AST, lazy: bool, typing: bool) -> Iterator[Import]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import):
            for alias in child.names:
                yield Import(module, alias.name, child.lineno, lazy, typing)
        elif isinstance(child, ast.ImportFrom):
            base = _resolve_from(module, child)
            subs = [f"{base}.{a.name}" for a in child.names if _is_module(f"{base}.{a.name}")]
            others = tuple(a.name for a in child.names if not _is_module(f"{base}.{a.name}"))
            if others or not subs:
                yield Import(module, base, child.lineno, lazy, typing, others if base == "fsapp" else ())
            for sub in subs:
                yield Import(module, sub, child.lineno, lazy, typing)
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(module, child, True, typing)
        elif isinstance(child, ast.If) and _is_typing_guard(child):
            for stmt in child.body:
                yield from _walk(module, ast.Module(body=[stmt], type_ignores=[]), lazy, True)
            for stmt in child.orelse:
                yield from _walk(module, ast.Module(body=[stmt], type_ignores=[]), lazy, typing)
        else:
            yield from _walk(module, child, lazy, typing)


@cache
def _tree(module: str) -> ast.Module:
    path = _modules()[module]
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@cache
def all_imports() -> tuple[Import, ...]:
    """Every import statement of every module of the package."""
    return tuple(imp for module in _modules() for imp in _walk(module, _tree(module), False, False))


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _where(imp: Import) -> str:
    path = _modules()[imp.module].relative_to(ROOT)
    kind = "inside a function" if imp.lazy else ("under TYPE_CHECKING" if imp.typing else "at module level")
    return f"{path}:{imp.line} ({imp.module} imports {imp.target} {kind})"


def _is_core(module: str) -> bool:
    """Everything but the front ends (``python -m fsapp``, i.e. ``fsapp/__main__.py``, is the CLI's entry)."""
    return not (_within(module, "fsapp.cli") or _within(module, "fsapp.tui") or module == "fsapp.__main__")


# ------------------------------------------------------------------------------------- tests


def test_the_parser_sees_the_package():
    """Guard against a walker that finds nothing (every other contract would then pass)."""
    modules = _modules()
    assert {"fsapp", "fsapp.config", "fsapp.engine.train", "fsapp.cli.main", "fsapp.tui.app"} <= set(modules)
    targets = {(i.module, i.target) for i in all_imports()}
    assert ("fsapp.cli.main", "typer") in targets
    assert any(i.lazy for i in all_imports()) and any(not i.lazy for i in all_imports())


def test_the_walker_classifies_imports():
    source = (
        "import fsapp\n"
        "from fsapp import hookspecs, hookimpl\n"
        "from . import evaluate\n"
        "from ..errors import UsageError\n"
        "if TYPE_CHECKING:\n"
        "    from fsapp.tui.app import FsappApp\n"
        "def f():\n"
        "    import rich.console\n"
    )
    got = {(i.target, i.lazy, i.typing, i.face_names)
           for i in _walk("fsapp.engine.train", ast.parse(source), False, False)}
    assert got == {
        ("fsapp", False, False, ()),
        ("fsapp.hookspecs", False, False, ()),
        ("fsapp", False, False, ("hookimpl",)),
        ("fsapp.engine.evaluate", False, False, ()),
        ("fsapp.errors", False, False, ()),
        ("fsapp.tui.app", False, True, ()),
        ("rich.console", True, False, ()),
    }


def test_core_never_imports_the_front_ends_or_ui_packages():
    forbidden = ("fsapp.cli", "fsapp.tui") + UI_PACKAGES
    bad = [_where(i) for i in all_imports()
           if _is_core(i.module) and any(_within(i.target, f) for f in forbidden)]
    assert not bad, "the core must not import the CLI, the TUI or UI packages:\n  " + "\n  ".join(bad)


def test_tui_never_imports_the_cli():
    bad = [_where(i) for i in all_imports() if _within(i.module, "fsapp.tui") and _within(i.target, "fsapp.cli")]
    assert not bad, "fsapp.tui must not import fsapp.cli:\n  " + "\n  ".join(bad)


def test_nothing_inside_the_package_imports_the_package_face():
    bad = []
    for i in all_imports():
        if i.module == "fsapp" or i.typing:
            continue
        if i.target == "fsapp" and not i.face_names:
            bad.append(f"{_where(i)}: 'import fsapp'")
        elif i.face_names:
            bad.append(f"{_where(i)}: takes {', '.join(i.face_names)} from the package face; import it from "
                       "the module that defines it")
    assert not bad, "modules inside fsapp must not import the package face:\n  " + "\n  ".join(bad)


def _lazy_pairs() -> dict[tuple[str, str], list[Import]]:
    pairs: dict[tuple[str, str], list[Import]] = {}
    for i in all_imports():
        if i.lazy and not i.typing and i.target.split(".")[0] not in sys.stdlib_module_names:
            pairs.setdefault((i.module, i.target), []).append(i)
    return pairs


def test_lazy_imports_are_listed():
    pairs = _lazy_pairs()
    new = sorted(set(pairs) - set(LAZY_IMPORTS))
    lines = [f"    ({m!r}, {t!r}): \"<why>\",  # {_where(pairs[(m, t)][0])}" for m, t in new]
    assert not new, (f"{len(new)} lazy (function-level) import(s) not listed in tests/test_contracts.py "
                     "LAZY_IMPORTS; import at module level, or add each with its reason:\n" + "\n".join(lines))


def test_listed_lazy_imports_still_exist():
    gone = sorted(set(LAZY_IMPORTS) - set(_lazy_pairs()))
    assert not gone, ("LAZY_IMPORTS lists imports that are no longer lazy (or gone); remove them:\n  "
                      + "\n  ".join(f"{m} -> {t}" for m, t in gone))


def module_graph() -> dict[str, set[str]]:
    """fsapp module -> the fsapp modules it imports at module level (executed on import)."""
    graph: dict[str, set[str]] = {m: set() for m in _modules()}
    for i in all_imports():
        if not i.lazy and not i.typing and _within(i.target, "fsapp") and i.target in graph and i.target != i.module:
            graph[i.module].add(i.target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_at_module_level():
    graph = module_graph()
    cycles = find_cycles(graph)
    lines = []
    for group in cycles:
        edges = [f"{a} -> {b}" for a in group for b in sorted(graph[a]) if b in group]
        lines.append(f"{', '.join(group)}: {'; '.join(edges)}")
    assert not cycles, "module-level import cycles among fsapp modules:\n  " + "\n  ".join(lines)


def test_pickle_only_in_the_restricted_unpickler():
    bad = [_where(i) for i in all_imports()
           if any(_within(i.target, p) for p in PICKLE_MODULES) and i.module not in PICKLE_ALLOWED]
    assert not bad, "pickle is imported outside the restricted CIFAR unpickler:\n  " + "\n  ".join(bad)
    for module in PICKLE_ALLOWED:
        assert any(i.module == module and i.target == "pickle" for i in all_imports()), \
            f"PICKLE_ALLOWED lists {module}, which no longer imports pickle; remove it"


def _torch_load_calls(module: str) -> list[int]:
    """Lines where ``module`` calls or imports torch.load / torch.serialization.load."""
    lines = []
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Attribute) and node.attr == "load":
            owner = node.value
            if (isinstance(owner, ast.Name) and owner.id == "torch") or (
                    isinstance(owner, ast.Attribute) and owner.attr == "serialization"):
                lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
            lines += [node.lineno for a in node.names if a.name == "load"]
    return lines


def test_torch_load_only_on_the_trusted_import_path():
    bad = [f"{_modules()[m].relative_to(ROOT)}:{line}" for m in _modules() if m not in TORCH_LOAD_ALLOWED
           for line in _torch_load_calls(m)]
    assert not bad, "torch.load outside `fsapp import-checkpoint --trust`:\n  " + "\n  ".join(bad)
    for module in TORCH_LOAD_ALLOWED:
        assert _torch_load_calls(module), f"TORCH_LOAD_ALLOWED lists {module}, which no longer calls torch.load"
