"""Property tests of the config readers: random and mutated command-line overrides and TOML files give a
config or one ValueError/TypeError with a one-line message, never another exception; a bad override
given to `train --resume` leaves the run folder as it was."""

import dataclasses
import hashlib
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchpeer.cli import main
from torchpeer.lm.config import RunConfig, from_dict
from torchpeer.lm.config_io import CONFIG_DIR, apply_overrides, load_config, split_overrides

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SHIPPED = open(os.path.join(CONFIG_DIR, "ptb-tiny.toml"), encoding="utf-8").read()


def _field_names(obj, prefix="") -> list[str]:
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        name = prefix + f.name
        out += _field_names(value, name + ".") if dataclasses.is_dataclass(value) else [name]
    return out


FIELDS = _field_names(RunConfig())
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
VALUES = st.one_of(
    TEXT,
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["none", "true", "false", "[1, 2]", "3,7", "{}", '{"a": 1}', "1e999", "-0", "", " ", "[", "0x10"]),
)


@st.composite
def mutated_key(draw) -> str:
    """A real field name, kept or mutated (a character dropped, doubled or replaced; a part cut off)."""
    key = draw(st.sampled_from(FIELDS + ["data.valid.extra", "model", "train", "model.peer"]))
    how = draw(st.sampled_from(["keep", "drop", "double", "replace", "cut", "random"]))
    i = draw(st.integers(0, len(key) - 1))
    if how == "drop":
        key = key[:i] + key[i + 1 :]
    elif how == "double":
        key = key[:i] + key[i] + key[i:]
    elif how == "replace":
        key = key[:i] + draw(st.characters(codec="ascii")) + key[i + 1 :]
    elif how == "cut":
        key = key.rpartition(".")[0] or key
    elif how == "random":
        key = draw(TEXT)
    return key


def _is_one_error(e: BaseException) -> bool:
    msg = str(e).strip()
    return isinstance(e, (ValueError, TypeError)) and bool(msg)


@SETTINGS
@given(st.lists(st.one_of(TEXT, mutated_key().map(lambda k: "--" + k), st.sampled_from(["--", "-", "=", "--a.b="]))))
def test_split_overrides_returns_or_raises_one_value_error(argv):
    try:
        rest, pairs = split_overrides(argv)
    except ValueError as e:
        assert str(e).strip()
        return
    assert len(rest) + 2 * len(pairs) >= len(argv)  # every argument is kept (a pair may come from one --k=v)
    assert all("." in key for key, _ in pairs)


@SETTINGS
@given(st.lists(st.tuples(mutated_key(), VALUES), min_size=1, max_size=3))
def test_random_overrides_give_a_config_or_one_clear_error(pairs):
    cfg = RunConfig()
    try:
        apply_overrides(cfg, pairs)
        cfg.validate()
    except Exception as e:  # noqa: BLE001 - the property: nothing but a ValueError/TypeError with a message
        assert _is_one_error(e), f"{type(e).__name__}: {e}"


@st.composite
def mutated_toml(draw) -> str:
    """The shipped ptb-tiny config with a few random edits: cut, insert, or replace a value."""
    text = SHIPPED
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["cut", "insert", "value", "key"]))
        i = draw(st.integers(0, len(text)))
        if how == "cut":
            text = text[:i] + text[i + draw(st.integers(1, 40)) :]
        elif how == "insert":
            text = (
                text[:i] + draw(st.sampled_from(["\n[train]\n", "\n[model.peer]\n", " = ", "\n", '"', "["])) + text[i:]
            )
        elif how == "value":
            lines = text.splitlines()
            j = draw(st.integers(0, len(lines) - 1))
            if " = " in lines[j]:
                key = lines[j].split(" = ")[0]
                lines[j] = f"{key} = " + draw(
                    st.one_of(
                        st.integers(-(10**20), 10**20).map(str),
                        st.sampled_from(
                            ["inf", "nan", "-1", "0", "true", '"x"', "[]", "{}", "1.5", '"peer"', "[1, 2]"]
                        ),
                    )
                )
            text = "\n".join(lines)
        else:
            text = text[:i] + draw(mutated_key()).rpartition(".")[2] + " = 1\n" + text[i:]
    return text


@SETTINGS
@given(mutated_toml())
def test_mutated_toml_files_give_a_config_or_one_clear_error(text):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "mutated.toml")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        try:
            cfg = load_config(path)
        except Exception as e:  # noqa: BLE001
            assert _is_one_error(e), f"{type(e).__name__}: {e}"
            return
        assert isinstance(cfg, RunConfig)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)


@SETTINGS
@given(st.dictionaries(st.sampled_from(["name", "model", "train", "data", "extra"]), JSONISH, max_size=4))
def test_random_config_tables_give_a_config_or_one_clear_error(table):
    """What tomllib may hand over (tables of any shape and value types) -> a config or one error."""
    try:
        from_dict(RunConfig, table).validate()
    except Exception as e:  # noqa: BLE001
        assert _is_one_error(e), f"{type(e).__name__}: {e}"


def _digest(folder) -> dict:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(dirpath, f)
            out[os.path.relpath(path, folder)] = (
                hashlib.sha256(open(path, "rb").read()).hexdigest(),
                os.stat(path).st_mtime_ns,
            )
    return out


@pytest.fixture(scope="module")
def finished_run(trained, tmp_path_factory):
    run = str(tmp_path_factory.mktemp("props") / "run")
    shutil.copytree(trained[2], run)
    return trained[1], run, _digest(run)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(mutated_key(), VALUES), min_size=1, max_size=2))
def test_bad_overrides_on_resume_are_one_error_line_and_write_nothing(finished_run, capsys, pairs):
    """Overrides that fail (parse, validation, another model) stop `train --resume` with exit 2 and one
    line, before anything is written. (Valid ones would train, so they are not sent.)"""
    from torchpeer.lm.checkpoint import check_same_model, read_checkpoint_config, resolve_checkpoint

    cfg_path, run, before = finished_run
    saved = read_checkpoint_config(resolve_checkpoint(run))
    try:
        changed = apply_overrides(read_checkpoint_config(resolve_checkpoint(run)), pairs)
        changed.validate()
        check_same_model(saved, changed, run)
        return  # a valid change: the run would go on
    except Exception as e:  # noqa: BLE001
        assert _is_one_error(e), f"{type(e).__name__}: {e}"
    argv = ["train", cfg_path, "--run-dir", run, "--resume"] + [f"--{k}={v}" for k, v in pairs]
    try:
        status = main(argv)
    except SystemExit as e:  # argparse: an override that does not look like one (e.g. "--" + "x=")
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert _digest(run) == before
