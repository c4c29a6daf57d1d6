"""Broken plugins, installed through real entry points, fail alone.

Load-time breakage (an import or a hook raising anything but KeyboardInterrupt, SystemExit
included; bad registrations; duplicate names) costs one warning line on stderr, and unrelated
commands (``fsapp plugins list --json``, ``fsapp config show``) still exit 0. A plugin
component that raises while it is built or called is one ``error:`` line naming the plugin and
the component, exit 1. Plugin text (names, descriptions, defaults) is printed literally.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fsapp.errors import PluginError

ROOT = Path(__file__).resolve().parents[1]
HEAD = "from dataclasses import dataclass, field\nfrom fsapp import hookimpl\n"


def hook(kind: str, body: str) -> str:
    return HEAD + f"\n@hookimpl\ndef register_{kind}(register):\n" + "".join(
        f"    {line}\n" for line in body.strip().splitlines())


NOOP = "(lambda model, x, y: x)"
LOAD_FAILURES = {  # kind of breakage -> (module source, text the warning must contain)
    "import-ImportError": ("raise ImportError('no such thing')", "import failed: ImportError: no such thing"),
    "import-SyntaxError": ("def broken(:\n    pass\n", "import failed: SyntaxError"),
    "import-SystemExit": ("raise SystemExit(3)", "import failed: SystemExit: 3"),
    "import-custom-BaseException": ("class Boom(BaseException):\n    pass\nraise Boom('deep')",
                                    "import failed: Boom: deep"),
    "hook-ValueError": (hook("attacks", "raise ValueError('bad value')"), "raised ValueError: bad value"),
    "hook-SystemExit": (hook("models", "raise SystemExit('bye')"), "raised SystemExit: bye"),
    "hook-GeneratorExit": (hook("solvers", "raise GeneratorExit()"), "raised GeneratorExit"),
    "hook-wrong-signature": (HEAD + "\n@hookimpl\ndef register_attacks(reg, extra):\n    pass\n",
                             "import failed"),
    "bad-name-markup": (hook("attacks", f"register('[/x]', lambda p: {NOOP})"), "invalid name '[/x]'"),
    "bad-name-separator": (hook("attacks", f"register('a:b', lambda p: {NOOP})"), "invalid name 'a:b'"),
    "bad-name-type": (hook("attacks", f"register(42, lambda p: {NOOP})"), "invalid name 42"),
    "params-not-dataclass": (hook("attacks", f"register('nodc', lambda p: {NOOP}, params=dict)"),
                             "params must be a dataclass"),
    "params-unreadable": (HEAD + "@dataclass\nclass P:\n    x: 'NoSuchType' = 1\n"
                          + hook("attacks", f"register('unread', lambda p: {NOOP}, params=P)")[len(HEAD):],
                          "params cannot be read: NameError"),
    "model-params-not-ModelParams": (HEAD + "@dataclass\nclass P:\n    width: int = 3\n"
                                     + hook("models", "register('badmodel', lambda p: None, params=P)")[len(HEAD):],
                                     "must subclass fsapp.registry.ModelParams"),
    "factory-not-callable": (hook("solvers", "register('notcallable', 42)"), "factory is not callable"),
    "description-not-text": (hook("attacks", f"register('desc', lambda p: {NOOP}, description=['x'])"),
                             "description must be a string"),
    "same-plugin-twice": (hook("attacks", f"register('twice', lambda p: {NOOP})\n"
                                          f"register('twice', lambda p: {NOOP})"), "registered attack 'twice' twice"),
}


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _unrelated_commands_work(dist: str) -> list[str]:
    """``plugins list --json`` and ``config show`` in-process; the stderr warning lines of each."""
    from fsapp.cli.main import app

    runner = CliRunner()
    listing = runner.invoke(app, ["plugins", "list", "--json"])
    assert listing.exit_code == 0, listing.output
    data = json.loads(listing.stdout)
    assert any(c["name"] == "pgd" for c in data["attack"])
    shown = runner.invoke(app, ["config", "show"])
    assert shown.exit_code == 0 and "[optim]" in shown.stdout, shown.output
    assert _lines(shown.stderr) == _lines(listing.stderr)
    assert "Traceback" not in listing.output + shown.output
    return _lines(listing.stderr)


def test_corpus_size():
    assert len(LOAD_FAILURES) >= 15


@pytest.mark.parametrize("case", list(LOAD_FAILURES))
def test_load_failure_is_one_warning_and_unrelated_commands_work(case, install_plugin, fresh_registry):
    source, reason = LOAD_FAILURES[case]
    dist = f"broken-{case.lower()}"
    install_plugin(dist, "mod_" + case.lower().replace("-", "_"), source)
    fresh_registry()
    warnings = _unrelated_commands_work(dist)
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"warning: plugin '{dist}' skipped: ") and reason in warnings[0], warnings


def _cli(args: list[str], site: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "fsapp", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def test_systemexit_and_baseexception_do_not_end_the_process(install_plugin, tmp_path):
    """In a real process: SystemExit at import and a custom BaseException from a hook."""
    install_plugin("exit-import", "exit_import_mod", "raise SystemExit(0)")
    site = install_plugin("boom-hook", "boom_hook_mod", "class Boom(BaseException):\n    pass\n"
                          + hook("perturbations", "raise Boom('no')")[len(""):])
    proc = _cli(["plugins", "list", "--json"], site)
    assert proc.returncode == 0, proc.stderr
    assert "perturbation" in json.loads(proc.stdout)
    assert sorted(_lines(proc.stderr)) == [
        "warning: plugin 'boom-hook' skipped: hook register_perturbations raised Boom: no",
        "warning: plugin 'exit-import' skipped: import failed: SystemExit: 0",
    ]
    proc = _cli(["--strict-plugins", "config", "show"], site)
    assert proc.returncode == 1 and len(_lines(proc.stderr)) == 1 and "Traceback" not in proc.stderr


DUPLICATE = hook("attacks", f"register('pgd', lambda p: {NOOP}, description='shadow')\n"
                            f"register('shared', lambda p: {NOOP})")


def test_duplicates_are_visible_and_reachable_by_qualified_name(install_plugin, tmp_path):
    install_plugin("dupe-a", "dupe_a_mod", DUPLICATE)
    site = install_plugin("dupe-b", "dupe_b_mod", hook("attacks", f"register('shared', lambda p: {NOOP})"))
    proc = _cli(["plugins", "list", "--json"], site)
    assert proc.returncode == 0, proc.stderr
    names = {c["name"]: c["plugin"] for c in json.loads(proc.stdout)["attack"]}
    assert names["pgd"] == "fsapp" and names["dupe-a/pgd"] == "dupe-a"
    assert names["dupe-a/shared"] == "dupe-a" and names["dupe-b/shared"] == "dupe-b" and "shared" not in names
    assert sorted(_lines(proc.stderr)) == [
        "warning: attack 'shared' is provided by plugins 'dupe-a' and 'dupe-b'; name one: dupe-a/shared or "
        "dupe-b/shared",
        "warning: plugin 'dupe-a' provides attack 'pgd', a built-in name: 'pgd' is the built-in, 'dupe-a/pgd' "
        "is the plugin's",
    ]
    proc = _cli(["config", "show", "--set", 'eval.attacks=["dupe-b/shared", "pgd"]'], site)
    assert proc.returncode == 0 and 'attacks = ["dupe-b/shared", "pgd"]' in proc.stdout, proc.stderr
    proc = _cli(["config", "show", "--set", 'eval.attacks=["shared"]'], site)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert _lines(proc.stderr)[-1] == ("error: preset demo: attack 'shared' is provided by more than one plugin; "
                                       "name one: dupe-a/shared or dupe-b/shared")


MARKUP = HEAD + """
@dataclass
class P:
    label: str = "[/x]"
    tags: tuple[str, ...] = ("[bold]", "[/]")

@hookimpl
def register_attacks(register):
    register("markup-attack", lambda p: (lambda model, x, y: x), params=P, description="closes [/x] and [red]")
"""


def test_markup_in_descriptions_and_defaults_is_printed_literally(install_plugin):
    site = install_plugin("markup-plugin", "markup_mod", MARKUP)
    proc = _cli(["plugins", "list"], site)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    row = next(line for line in proc.stdout.splitlines() if "markup-attack" in line)
    assert "label=[/x]" in row and "tags=([bold], [/])" in row
    proc = _cli(["plugins", "list", "--json"], site)
    entry = next(c for c in json.loads(proc.stdout)["attack"] if c["name"] == "markup-attack")
    assert entry["description"] == "closes [/x] and [red]" and entry["params"]["label"] == "[/x]"


RUNTIME = HEAD + """
def build_fails(p):
    raise TypeError("cannot build from " + repr(p))

def key_error(model, x, y):
    return {}["k"]

def index_error(cost):
    return [][3]

def attribute_error(model, x, y):
    return x.no_such_attribute

def exits(model, x, y):
    raise SystemExit(4)

def value_error(model, x, y):
    raise ValueError("needs 3 channels")

class Tagged:
    norm = "Linf"
    eps = 0.25

    def __call__(self, model, x, y):
        return x

@hookimpl
def register_attacks(register):
    register("build-fails", build_fails)
    register("key-error", lambda p: key_error)
    register("exits", lambda p: exits)
    register("value-error", lambda p: value_error)
    register("tagged", lambda p: Tagged())

@hookimpl
def register_solvers(register):
    register("index-error", lambda p: index_error)

@hookimpl
def register_perturbations(register):
    register("attribute-error", lambda p: attribute_error)
"""


def test_component_errors_name_the_plugin_and_component(install_plugin, fresh_registry):
    install_plugin("runtime-plugin", "runtime_mod", RUNTIME)
    reg = fresh_registry()
    x, y = torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    with pytest.raises(PluginError, match=r"^attack 'build-fails' from plugin 'runtime-plugin' failed to "
                                          r"build: TypeError: cannot build from NoParams\(\)$"):
        reg.create("attack", "build-fails")
    with pytest.raises(PluginError, match=r"^attack 'key-error' from plugin 'runtime-plugin' failed: "
                                          r"KeyError: 'k'$"):
        reg.create("attack", "key-error")(None, x, y)
    with pytest.raises(PluginError, match="solver 'index-error' from plugin 'runtime-plugin' failed: IndexError: list index out"):
        reg.create("solver", "index-error")(torch.rand(3, 3))
    with pytest.raises(PluginError, match="perturbation 'attribute-error' from plugin 'runtime-plugin' failed: AttributeError: "):
        reg.create("perturbation", "attribute-error")(None, x, y)
    with pytest.raises(PluginError, match="attack 'exits' from plugin 'runtime-plugin' failed: SystemExit: 4"):
        reg.create("attack", "exits")(None, x, y)
    with pytest.raises(ValueError, match="attack 'value-error' from plugin 'runtime-plugin' failed: ValueError: needs 3") as info:
        reg.create("attack", "value-error")(None, x, y)  # still a ValueError: "cannot run here"
    assert isinstance(info.value, PluginError)
    tagged = reg.create("attack", "tagged")
    assert tagged.norm == "Linf" and tagged.eps == 0.25 and type(tagged).__name__ == "GuardedCall"
    assert isinstance(tagged, sys.modules["runtime_mod"].Tagged)  # inspection sees the component
    assert tagged(None, x, y) is x
    builtin = reg.create("attack", "fgsm")
    assert type(builtin).__module__.startswith("fsapp.builtins")  # built-ins are not wrapped


def test_component_error_in_training_is_one_line_exit_1(install_plugin, tmp_path):
    site = install_plugin("runtime-plugin", "runtime_mod2", RUNTIME)
    runs = tmp_path / "runs"
    proc = _cli(["train", "--set", "method.perturbation=attribute-error", "--set", "data.train_limit=60",
                 "--set", "data.batch_size=30", "--set", "schedule.epochs=1", "--set", "eval.n=0",
                 "--set", "model.width=4", "--set", f'run.runs_dir="{runs}"'], site, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in _lines(proc.stderr) if line.startswith("error:")]
    assert errors == [errors[0]] and errors[0].startswith(
        "error: perturbation 'attribute-error' from plugin 'runtime-plugin' failed: AttributeError: "), errors


def test_component_error_in_evaluation_is_one_line_exit_1(install_plugin, fresh_registry, tmp_path):
    from fsapp.checkpoint import model_metadata, save_model
    from fsapp.cli.main import app

    install_plugin("runtime-plugin", "runtime_mod3", RUNTIME)
    reg = fresh_registry()
    params = {"num_classes": 10, "channels": 1, "size": 8, "hidden": 8, "layers": 1, "mean": (0.3,), "std": (0.3,)}
    model = reg.create("model", "mlp", **params)
    path = save_model(tmp_path / "model.safetensors", model, model_metadata("mlp", params, dataset="digits"))
    runner = CliRunner()
    result = runner.invoke(app, ["eval", str(path), "--attack", "key-error", "--n", "200"])
    assert result.exit_code == 1, result.output
    assert _lines(result.stderr)[-1] == "error: attack 'key-error' from plugin 'runtime-plugin' failed: " \
                                        "KeyError: 'k'"
    result = runner.invoke(app, ["eval", str(path), "--attack", "value-error", "--n", "200"])
    assert result.exit_code == 2 and _lines(result.stderr)[-1].endswith("failed: ValueError: needs 3 channels")
