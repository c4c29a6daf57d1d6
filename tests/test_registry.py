from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import pytest

import fsapp
from fsapp.errors import UsageError
from fsapp.registry import Component, coerce, make_params, parse_float, parse_spec


@dataclass
class P:
    eps: float = 0.1
    steps: int = 10
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    size: Optional[float] = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be >= 1")


COMP = Component("attack", "toy", lambda p: p, P, "test")


def test_parse_spec_and_fractions():
    spec = parse_spec("pgd:eps=8/255, steps=20 ,random_start=false")
    assert spec.name == "pgd"
    assert spec.params == {"eps": "8/255", "steps": "20", "random_start": "false"}
    assert parse_float("8/255") == pytest.approx(8 / 255)
    assert parse_float("1e-3") == 0.001
    assert str(parse_spec("fgsm")) == "fgsm"


@pytest.mark.parametrize("bad", ["", ":eps=1", "pgd:eps", "pgd:=3", "pgd:steps=1,steps=2"])
def test_bad_specs_are_one_line_usage_errors(bad):
    with pytest.raises(UsageError) as info:
        parse_spec(bad)
    assert "\n" not in str(info.value)


def test_make_params_coerces_and_names_valid_keys():
    p = make_params(COMP, {"eps": "8/255", "steps": "3", "flag": "true", "mode": "b", "size": "none"})
    assert (p.eps, p.steps, p.flag, p.mode, p.size) == (pytest.approx(8 / 255), 3, True, "b", None)
    with pytest.raises(UsageError, match="unknown parameter 'epz'.*valid: eps, steps, flag, mode, size"):
        make_params(COMP, {"epz": 1})
    with pytest.raises(UsageError, match="parameter 'steps'.*integer"):
        make_params(COMP, {"steps": "1.5"})
    with pytest.raises(UsageError, match="one of a, b"):
        make_params(COMP, {"mode": "c"})
    with pytest.raises(UsageError, match="steps must be >= 1"):
        make_params(COMP, {"steps": 0})


def test_coerce_rejects_non_finite_and_bool_for_numbers():
    with pytest.raises(ValueError):
        coerce("nan", float)
    with pytest.raises(ValueError):
        coerce(True, int)
    assert coerce("60,90", tuple[int, ...]) == (60, 90)
    assert coerce(["a", "b"], tuple[str, ...]) == ("a", "b")


def test_public_api_available_and_create():
    for kind in ("model", "dataset", "solver", "perturbation", "attack"):
        assert fsapp.available(kind)
    assert {"wrn", "preact-resnet18", "small-cnn", "mlp"} <= set(fsapp.available("model"))
    assert {"digits", "cifar10", "cifar100", "svhn", "synthetic"} <= set(fsapp.available("dataset"))
    assert {"sinkhorn", "ipot", "uniform", "identity"} <= set(fsapp.available("solver"))
    assert {"feature-scatter", "supervised", "random", "none"} <= set(fsapp.available("perturbation"))
    assert {"fgsm", "pgd", "cw"} <= set(fsapp.available("attack"))
    a = fsapp.create("attack", "pgd:eps=8/255,steps=2")
    b = fsapp.create("attack", "pgd", eps=8 / 255, steps=2)
    assert callable(a) and callable(b)
    with pytest.raises(UsageError, match="unknown attack 'pgdd'; available: .*pgd"):
        fsapp.create("attack", "pgdd")
    with pytest.raises(UsageError, match="unknown component kind"):
        fsapp.available("optimizer")
