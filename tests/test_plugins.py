"""Plugins arrive through real entry points; broken ones cost one warning line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fsapp.errors import PluginError, UsageError
from fsapp.plugins import HOOKS, load_registry
from fsapp.registry import KINDS

GOOD = """
from dataclasses import dataclass
from fsapp import hookimpl

@dataclass
class Params:
    eps: float = 0.1

@hookimpl
def register_attacks(register):
    register("thirdparty-noop", lambda p: (lambda model, x, y: x), params=Params, description="noop")
"""


def test_example_plugin_components_arrive_through_entry_points():
    reg = load_registry()
    expected = {"model": "example-linear", "dataset": "example-stripes", "solver": "example-softmin",
                "perturbation": "example-sign-noise", "attack": "example-noise"}
    for kind, name in expected.items():
        assert name in reg.names(kind)
        assert reg.get(kind, name).plugin == "fsapp-example"
    data = reg.create("dataset", "example-stripes:n_train=20,n_test=10")
    model = reg.create("model", "example-linear", num_classes=2, channels=1, size=8)
    x = data.x_test.float() / 255
    x_adv = reg.create("attack", "example-noise:eps=0.1,draws=2")(model, x, data.y_test)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    plan = reg.create("solver", "example-softmin")(torch.rand(5, 5))
    assert torch.allclose(plan.sum(1), torch.full((5,), 0.2))


def test_builtins_register_through_the_same_hooks():
    reg = load_registry()
    assert reg.get("attack", "pgd").plugin == "fsapp"
    assert "fsapp-example" in reg.plugins and "fsapp" in reg.plugins


def test_import_failure_costs_one_warning(install_plugin, caplog):
    install_plugin("broken-import", "broken_import_mod", "raise ImportError('no such thing')")
    install_plugin("good-plugin", "good_plugin_mod", GOOD)
    reg = load_registry()
    assert "thirdparty-noop" in reg.names("attack")
    assert [f.plugin for f in reg.failures] == ["broken-import"]
    assert "no such thing" in reg.failures[0].reason
    warnings = [r for r in caplog.records if r.name == "fsapp"]
    assert len(warnings) == 1 and "broken-import" in warnings[0].getMessage()


def test_hook_that_raises_is_isolated(install_plugin):
    install_plugin("raiser", "raiser_mod", """
from fsapp import hookimpl

@hookimpl
def register_models(register):
    raise RuntimeError("boom")
""")
    reg = load_registry()
    assert "wrn" in reg.names("model")
    assert reg.failures and "boom" in reg.failures[0].reason and reg.failures[0].plugin == "raiser"


def test_strict_mode_turns_failures_into_errors(install_plugin):
    install_plugin("broken-import", "broken_import_mod2", "raise ImportError('nope')")
    with pytest.raises(PluginError, match="broken-import"):
        load_registry(strict=True)


def test_duplicate_of_a_builtin_keeps_both_reachable(install_plugin, caplog):
    install_plugin("dupe-plugin", "dupe_mod", """
from fsapp import hookimpl

@hookimpl
def register_attacks(register):
    register("pgd", lambda p: (lambda model, x, y: x + 0.5))
""")
    reg = load_registry()
    assert reg.get("attack", "pgd").plugin == "fsapp"
    assert reg.get("attack", "fsapp/pgd").plugin == "fsapp"
    assert reg.get("attack", "dupe-plugin/pgd").plugin == "dupe-plugin"
    assert "dupe-plugin/pgd" in reg.names("attack") and "pgd" in reg.names("attack")
    x = torch.zeros(2, 1, 4, 4)
    assert reg.create("attack", "dupe-plugin/pgd")(None, x, None).max() == 0.5
    assert len(reg.warnings) == 1 and "'dupe-plugin/pgd'" in reg.warnings[0]
    assert any("dupe-plugin/pgd" in r.getMessage() for r in caplog.records if r.name == "fsapp")


def test_duplicate_between_plugins_is_ambiguous_until_qualified(install_plugin):
    for dist, mod, value in (("first-plugin", "first_mod", 1.0), ("second-plugin", "second_mod", 2.0)):
        install_plugin(dist, mod, f"""
from fsapp import hookimpl

@hookimpl
def register_attacks(register):
    register("shared", lambda p: (lambda model, x, y: x + {value}))
""")
    reg = load_registry()
    with pytest.raises(UsageError, match="name one: first-plugin/shared or second-plugin/shared"):
        reg.get("attack", "shared")
    x = torch.zeros(1)
    assert reg.create("attack", "first-plugin/shared")(None, x, None).item() == 1.0
    assert reg.create("attack", "second-plugin/shared:")(None, x, None).item() == 2.0
    assert "shared" not in reg.names("attack") and "second-plugin/shared" in reg.names("attack")
    assert len(reg.warnings) == 1 and not reg.failures


def test_duplicate_is_an_error_in_strict_mode(install_plugin):
    install_plugin("dupe-plugin", "dupe_mod_strict", """
from fsapp import hookimpl

@hookimpl
def register_attacks(register):
    register("fgsm", lambda p: (lambda model, x, y: x))
""")
    with pytest.raises(PluginError, match="dupe-plugin/fgsm"):
        load_registry(strict=True)


def test_load_plugins_env_chooses_entry_points(install_plugin, monkeypatch):
    install_plugin("good-plugin", "good_plugin_mod3", GOOD, entry="good")
    monkeypatch.setenv("FSAPP_LOAD_PLUGINS", "good")
    reg = load_registry()
    assert "thirdparty-noop" in reg.names("attack")
    assert "example-noise" not in reg.names("attack")
    monkeypatch.setenv("FSAPP_LOAD_PLUGINS", "")
    reg = load_registry()
    assert "thirdparty-noop" not in reg.names("attack") and "pgd" in reg.names("attack")


def test_factory_exception_names_the_plugin(install_plugin):
    install_plugin("bad-factory", "bad_factory_mod", """
from fsapp import hookimpl

def factory(p):
    raise RuntimeError("cannot build")

@hookimpl
def register_solvers(register):
    register("bad-solver", factory)
""")
    reg = load_registry()
    with pytest.raises(PluginError, match="solver 'bad-solver' from plugin 'bad-factory' failed to build: "
                                          "RuntimeError: cannot build"):
        reg.create("solver", "bad-solver")


def test_plugins_list_json_cli():
    out = subprocess.run([sys.executable, "-m", "fsapp", "plugins", "list", "--json"],
                         capture_output=True, text=True, check=True).stdout
    data = json.loads(out)
    assert set(data) == set(KINDS) >= {"model", "dataset", "solver", "perturbation", "attack"}
    pgd = next(c for c in data["attack"] if c["name"] == "pgd")
    assert pgd["plugin"] == "fsapp" and pgd["params"]["steps"] == 20
    wrn = next(c for c in data["model"] if c["name"] == "wrn")
    assert wrn["params"]["depth"] == 28 and wrn["params"]["widen"] == 10


def test_hook_list_is_derived_from_the_hookspecs():
    from fsapp import hookspecs

    specs = [n for n in dir(hookspecs) if getattr(getattr(hookspecs, n), "fsapp_spec", None) is not None]
    assert sorted(HOOKS.values()) == sorted(specs) and len(specs) >= 5
    assert HOOKS["attack"] == "register_attacks" and KINDS == tuple(HOOKS)
