"""Property-based: random configs, spec strings and --set values never give a traceback."""

from __future__ import annotations

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import fsapp
from fsapp.cli.main import app
from fsapp.config import ALL_TABLES, SECTIONS, to_toml
from fsapp.errors import FsappError

runner = CliRunner()
KEYS = [f"{t}.{f}" for t, cls in SECTIONS.items() for f in cls.__dataclass_fields__] + [
    "model.depth", "model.widen", "model.width", "data.root", "data.n_train", "solver.reg", "solver.mode",
    "perturbation.clamp_start", "method.perturbation", "method.solver", "model.name", "data.name",
]
TEXT = st.text(alphabet=string.printable, max_size=20)
VALUES = st.one_of(
    TEXT,
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["8/255", "1/0", "true", "nan", "-1", "0", "[1, 2]", "[]", '"x"', "wrn", "pgd:steps=2",
                     "sinkhorn", "none", "cuda:7", "bf16", "1e400", "inf", "{a=1}"]),
)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _no_traceback(result) -> None:
    assert result.exit_code in (0, 2), (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


@SETTINGS
@given(st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), TEXT), VALUES), max_size=4))
def test_random_set_values(pairs):
    args = ["config", "show"]
    for key, value in pairs:
        args += ["--set", f"{key}={value}"]
    _no_traceback(runner.invoke(app, args))


@SETTINGS
@given(st.one_of(TEXT, st.builds(lambda n, kv: n + ":" + ",".join(f"{k}={v}" for k, v in kv),
                                  st.sampled_from(["pgd", "cw", "fgsm", "sinkhorn", "x", ""]),
                                  st.lists(st.tuples(st.sampled_from(["eps", "steps", "step_size", "keep",
                                                                      "random_start", "zz", ""]), VALUES),
                                           max_size=3))))
def test_random_spec_strings(spec):
    for kind in ("attack", "solver"):
        try:
            fsapp.create(kind, spec)
        except FsappError as exc:
            assert "\n" not in str(exc)


SCALARS = st.one_of(st.integers(-5, 10**4), st.floats(allow_nan=False, width=32), st.booleans(), TEXT,
                    st.lists(st.integers(0, 300), max_size=3))


@SETTINGS
@given(st.dictionaries(st.one_of(st.sampled_from(ALL_TABLES), TEXT.filter(lambda s: s.isidentifier())),
                       st.dictionaries(st.sampled_from([k.split(".")[1] for k in KEYS]) | TEXT.filter(str.isidentifier),
                                       SCALARS, max_size=4), max_size=4))
def test_random_toml_configs(tmp_path_factory, tables):
    path = tmp_path_factory.mktemp("cfg") / "run.toml"
    try:
        path.write_text(to_toml(tables))
    except TypeError:
        return
    _no_traceback(runner.invoke(app, ["config", "show", str(path)]))
