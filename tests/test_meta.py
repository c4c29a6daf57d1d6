"""Meta-tests in datasette's style: the code, the docs, the tests and the example plugin agree.

- every flag id has a section in docs/EVALUATION.md and a test that asserts it is raised, and
  every flag message ends with where to read about it;
- every fixed config key is in the README;
- every hook of fsapp/hookspecs.py is implemented, usably, by plugins/fsapp-example;
- every document (and anchor) a docstring, message or doc cites exists.

Each failure names exactly what is missing, so that it can be fixed without reading this file.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import unicodedata
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pluggy
import pytest
import torch

from fsapp import hookspecs
from fsapp.config import describe_keys
from fsapp.engine import flags as flag_module
from fsapp.registry import ModelParams

ROOT = Path(__file__).resolve().parents[1]
EVALUATION = ROOT / "docs" / "EVALUATION.md"
README = ROOT / "README.md"
EXAMPLE = ROOT / "plugins" / "fsapp-example" / "fsapp_example.py"
FLAG_HEADING = re.compile(r"^##\s+([a-z0-9]+(?:-[a-z0-9]+)+)\s*$", re.M)


# ------------------------------------------------------------------------------ markdown helpers


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*|_(?=\W)|(?<=\W)_", "", heading.strip().lower())
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file (duplicates get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def test_slug_follows_github():
    assert slug("ce-margin-gap") == "ce-margin-gap"
    assert slug("`fsapp bench`") == "fsapp-bench"
    assert slug("Mixed precision, layout, compilation") == "mixed-precision-layout-compilation"
    assert slug("AutoAttack, the standard version") == "autoattack-the-standard-version"
    assert slug("What fsapp does differently, and the options") == "what-fsapp-does-differently-and-the-options"


# ------------------------------------------------------------------------------------ flags


@cache
def flag_ids() -> tuple[str, ...]:
    """FLAG_IDS plus every id a flag is built with anywhere in the package (curve flags included)."""
    ids = list(flag_module.FLAG_IDS)
    for path in sorted((ROOT / "fsapp").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "_flag" \
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                ids.append(node.args[0].value)
    return tuple(dict.fromkeys(ids))


def test_flag_ids_are_found():
    ids = flag_ids()
    assert "ce-margin-gap" in ids and "accuracy-rises-with-eps" in ids and len(ids) >= 11, ids


@pytest.mark.parametrize("flag_id", flag_ids())
def test_every_flag_has_a_section_in_evaluation_md(flag_id):
    text = EVALUATION.read_text(encoding="utf-8")
    assert re.search(rf"^## {re.escape(flag_id)}\s*$", text, re.M), (
        f"docs/EVALUATION.md has no section '## {flag_id}' (anchor #{flag_id}); add one with 'Raised if' and "
        "'What to do'")
    section = text.split(f"## {flag_id}", 1)[1].split("\n## ", 1)[0]
    for part in ("**Raised if**", "**What to do.**"):
        assert part in section, f"docs/EVALUATION.md#{flag_id} lacks its {part} paragraph"


def test_every_flag_section_is_a_flag():
    documented = set(FLAG_HEADING.findall(EVALUATION.read_text(encoding="utf-8")))
    unknown = sorted(documented - set(flag_ids()))
    assert not unknown, (f"docs/EVALUATION.md documents flags that fsapp never raises: {', '.join(unknown)}; "
                         "remove the sections or add the flags to fsapp/engine/flags.py")


def _asserted_flags(path: Path) -> set[str]:
    """Flag ids a test file asserts as raised: a string literal inside an ``assert`` that is not
    only on the left of a ``not in``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assert):
            continue
        negated = {id(c.left) for c in ast.walk(node.test)
                   if isinstance(c, ast.Compare) and all(isinstance(op, ast.NotIn) for op in c.ops)}
        for const in ast.walk(node.test):
            if isinstance(const, ast.Constant) and isinstance(const.value, str) and id(const) not in negated:
                found.add(const.value)
    return found


@cache
def asserted_flags() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        if path.name == Path(__file__).name:
            continue
        for value in _asserted_flags(path):
            out.setdefault(value, []).append(path.name)
    return out


@pytest.mark.parametrize("flag_id", flag_ids())
def test_every_flag_has_a_test_that_raises_it(flag_id):
    assert flag_id in asserted_flags(), (
        f"no test asserts that flag '{flag_id}' is raised: add a test in tests/ with a deliberately broken toy "
        f"model and an assertion such as `assert \"{flag_id}\" in ids(report)`")


def _report_raising_every_flag():
    """A hand-made report whose numbers trigger every flag compute_flags knows (no model needed)."""
    from fsapp.adversary import ThreatModel
    from fsapp.engine.report import AttackRun, Report

    one = torch.ones(1, dtype=torch.bool)
    linf = ThreatModel("Linf", 0.1)

    def run(spec, name, params, acc, **kw):
        kw.setdefault("threat", linf)
        return AttackRun(spec, name, params, one, 0.0, **kw), acc

    runs = [
        run("fgsm", "fgsm", {"eps": 0.1}, 0.10, loss="ce"),
        run("pgd:steps=10", "pgd", {"eps": 0.1, "steps": 10}, 0.50, loss="ce"),
        run("pgd:steps=20", "pgd", {"eps": 0.1, "steps": 20}, 0.60, loss="ce", invalid=1, no_gradient=1),
        run("cw:steps=20", "cw", {"eps": 0.1, "steps": 20}, 0.02, loss="margin"),
        run("pgd:eps=0.4", "pgd", {"eps": 0.4, "steps": 5}, 0.50, loss="ce", threat=ThreatModel("Linf", 0.4),
            in_worst_case=False),
        run("unbounded", "unbounded", {}, 0.30, threat=ThreatModel("unbounded", None), in_worst_case=False),
        run("square", "square", {"eps": 0.1}, 0.0, access="score", loss="margin"),
    ]
    accuracy = {"clean": 1.0, **{r.key: acc for r, acc in runs}, "worst_case": 0.0}
    report = Report(1, accuracy, one, one, [r for r, _ in runs])
    report.checks["non_finite"] = 1  # one clean output row held NaN
    return report


def test_every_flag_message_ends_with_where_to_read_more():
    raised = flag_module.compute_flags(_report_raising_every_flag())
    raised += flag_module.check_flags({"checked": 2, "checked_correct": 2, "random_forward": 1,
                                       "probability_rows": 2, "zero_gradient": 1})
    raised += flag_module.curve_flags("eps", [0.0, 0.1, 0.3], {"pgd": [0.5, 0.6, 0.6]})
    raised += flag_module.curve_flags("steps", [1, 10], {"pgd": [0.2, 0.3]})
    missing = sorted(set(flag_module.FLAG_IDS) - {f["id"] for f in raised})
    assert not missing, f"the hand-made inputs no longer raise {missing}; update this test's report"
    wrong = sorted({f"{f['id']}: ...{f['message'][-60:]!r}" for f in raised
                    if not f["message"].endswith(f" (docs/EVALUATION.md#{f['id']})")})
    assert not wrong, ("flag messages must end with ' (docs/EVALUATION.md#<flag-id>)'; these do not:\n  "
                       + "\n  ".join(wrong))


# ------------------------------------------------------------------------------ config keys


def config_keys() -> list[str]:
    return [f"{section}.{key}" for section, keys in describe_keys().items() for key in keys]


def test_config_keys_are_found():
    keys = config_keys()
    assert "run.seed" in keys and "eval.autoattack_n" in keys and len(keys) > 30, keys


@pytest.mark.parametrize("key", config_keys())
def test_every_config_key_is_in_the_readme(key):
    documented = f"`{key}`" in README.read_text(encoding="utf-8")
    assert documented, (
        f"README.md does not document the config key `{key}`; add a line for it to the Configuration section")


# --------------------------------------------------------------------------- example plugin


def hook_names() -> list[str]:
    return sorted(n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, "fsapp_spec"))


@cache
def example_module():
    spec = importlib.util.spec_from_file_location("fsapp_example_meta", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@dataclass
class Registered:
    name: str
    factory: object
    params: type


def _registrations(hook: str) -> list[Registered]:
    pm = pluggy.PluginManager("fsapp")
    pm.add_hookspecs(hookspecs)
    pm.register(example_module(), name="fsapp-example")  # checks the hookimpls' signatures
    got: list[Registered] = []

    def register(name, factory, params=None, description=""):
        got.append(Registered(name, factory, params))

    getattr(pm.hook, hook)(register=register)
    return got


def test_hook_names_are_found():
    assert {"register_models", "register_attacks"} <= set(hook_names())


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_is_implemented_by_the_example_plugin(hook):
    impl = getattr(example_module(), hook, None)
    assert impl is not None and hasattr(impl, "fsapp_impl"), (
        f"plugins/fsapp-example/fsapp_example.py does not implement the hook '{hook}' of fsapp/hookspecs.py; "
        "add one component of that kind, marked @hookimpl")
    assert _registrations(hook), f"the example plugin's {hook} registers nothing"


def _exercise(kind: str, item: Registered) -> None:
    """Build the component with its default parameters and use it once, as fsapp would."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1])
    if kind == "models":
        assert issubclass(item.params, ModelParams), f"{item.name}: model params must subclass ModelParams"
        net = item.factory(item.params(num_classes=2, channels=1, size=8))
        assert net(x).shape == (4, 2)
    elif kind == "datasets":
        data = item.factory(item.params())
        assert data.x_train.dtype == torch.uint8 and len(data.x_train) == len(data.y_train) > 0
    elif kind == "solvers":
        plan = item.factory(item.params())(torch.rand(4, 4))
        assert plan.shape == (4, 4) and torch.allclose(plan.sum(), torch.tensor(1.0))
    elif kind in ("perturbations", "attacks"):
        x_adv = item.factory(item.params())(model, x, y)
        assert x_adv.shape == x.shape and 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1
    else:
        assert callable(item.factory), f"{item.name}: factory is not callable"


@pytest.mark.parametrize("hook", hook_names())
def test_the_example_plugins_components_work(hook):
    kind = hook.removeprefix("register_")
    for item in _registrations(hook) if hasattr(example_module(), hook) else []:
        _exercise(kind, item)


def test_the_example_readme_lists_every_component():
    text = (EXAMPLE.parent / "README.md").read_text(encoding="utf-8")
    names = [item.name for hook in hook_names() if hasattr(example_module(), hook) for item in _registrations(hook)]
    missing = [n for n in names if f"`{n}`" not in text]
    assert names and not missing, f"plugins/fsapp-example/README.md does not list {missing}"


# ------------------------------------------------------------------------------- citations

WRITTEN_FILES = {"REPORT.md"}
"""``*.md`` names of files fsapp writes (``fsapp reproduce``'s report), not documents it cites."""
CITATION = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.md)(?!\w)(#[\w-]+)?")
IN_PAGE = re.compile(r"\]\((#[\w-]+)\)")


def cited_documents() -> list[tuple[str, Path, str, str]]:
    """(where, file that cites, cited path, anchor) for every ``*.md`` named in the package's
    Python files, the README, docs/, the changelog and the plugins."""
    sources = sorted((ROOT / "fsapp").rglob("*.py")) + sorted((ROOT / "plugins").rglob("*.py"))
    sources += [README, ROOT / "CHANGELOG.md"] + sorted((ROOT / "docs").glob("*.md"))
    sources += sorted((ROOT / "plugins").rglob("*.md"))
    out = []
    for path in sources:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{number}"
            for match in CITATION.finditer(line):
                if Path(match.group(1)).name in WRITTEN_FILES:
                    continue
                out.append((where, path, match.group(1), (match.group(2) or "")[1:]))
            if path.suffix == ".md":
                for match in IN_PAGE.finditer(line):
                    out.append((where, path, path.name, match.group(1)[1:]))
    return out


def resolve(citing: Path, cited: str) -> Path | None:
    """The cited file: beside the citing file, from the repository root, or in docs/."""
    if cited == citing.name and citing.suffix == ".md":
        return citing
    for base in (citing.parent, ROOT, ROOT / "docs"):
        if (base / cited).is_file():
            return base / cited
    return None


def test_citations_are_found():
    cited = {c for _, _, c, _ in cited_documents()}
    assert "docs/benchmarks.md" in cited and "hashlib.md" not in cited, cited


def test_every_cited_document_exists():
    problems = []
    for where, citing, cited, anchor in cited_documents():
        target = resolve(citing, cited)
        if target is None:
            problems.append(f"{where} cites {cited}, which does not exist (looked beside the file, at the "
                            "repository root and in docs/)")
        elif anchor and anchor not in anchors(target):
            problems.append(f"{where} cites {cited}#{anchor}, but {target.relative_to(ROOT)} has no heading "
                            f"with that anchor")
    assert not problems, "cited documents or anchors that do not exist:\n  " + "\n  ".join(problems)
