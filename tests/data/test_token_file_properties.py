"""Property tests of the token-file reader: a real token file (.bin + .json header) with random edits to
its header or its tokens opens as a valid file (every id inside the vocabulary) or raises one
ValueError/TypeError with a message, never another exception (nor an index error later, in training)."""

import json
import os
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from torchpeer.data import DataConfig, TokenFile, prepare_split, sequential_windows

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> str:
    """A byte-tokenised split (vocab 257, uint16): the base path of its .bin/.json."""
    root = tmp_path_factory.mktemp("tokens")
    (root / "t.txt").write_text("the cat sat on the mat. naïve café 🙂\n" * 40, encoding="utf-8")
    tf = prepare_split(DataConfig(train=str(root / "t.txt"), cache_dir=str(root / "c")), str(root / "t.txt"), "t")
    return os.path.splitext(tf.path)[0]


def _copy(base: str, folder: str) -> str:
    out = os.path.join(folder, "split")
    shutil.copyfile(base + ".bin", out + ".bin")
    shutil.copyfile(base + ".json", out + ".json")
    return out


def _open_and_read(base: str) -> None:
    """Open the file and read every window, as evaluation would; check what a valid file promises."""
    try:
        tf = TokenFile.open(base)
    except Exception as e:  # noqa: BLE001 - the property: nothing but a ValueError/TypeError with a message
        assert isinstance(e, (ValueError, TypeError)) and str(e).strip(), f"{type(e).__name__}: {e}"
        return
    assert len(tf) == tf.header["n_tokens"]
    if len(tf) >= 2:
        top = max(int(y.max()) for _, y in sequential_windows(tf, 4, 16))
        assert top < tf.vocab_size


@SETTINGS
@given(st.data())
def test_a_mutated_header_opens_or_is_one_clear_error(token_file, data):
    header = json.load(open(token_file + ".json"))
    how = data.draw(st.sampled_from(["set", "delete", "replace", "text"]))
    if how == "set":
        header[data.draw(st.sampled_from([*header, "extra"]))] = data.draw(JSONISH)
    elif how == "delete":
        header.pop(data.draw(st.sampled_from(sorted(header))))
    elif how == "replace":
        header = data.draw(JSONISH)
    with tempfile.TemporaryDirectory() as folder:
        base = _copy(token_file, folder)
        with open(base + ".json", "w", encoding="utf-8") as fh:
            if how == "text":
                fh.write(data.draw(st.text(max_size=60)))
            else:
                json.dump(header, fh)
        _open_and_read(base)


@SETTINGS
@given(st.data())
def test_mutated_tokens_open_as_valid_ids_or_are_one_clear_error(token_file, data):
    tokens = bytearray(open(token_file + ".bin", "rb").read())
    for _ in range(data.draw(st.integers(1, 4))):
        how = data.draw(st.sampled_from(["flip", "byte", "truncate", "append"]))
        i = data.draw(st.integers(0, max(0, len(tokens) - 1)))
        if how == "flip" and tokens:
            tokens[i] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "byte" and tokens:
            tokens[i] = data.draw(st.integers(0, 255))
        elif how == "truncate":
            tokens = tokens[:i]
        elif how == "append":
            tokens += bytes(data.draw(st.integers(1, 3)))
    with tempfile.TemporaryDirectory() as folder:
        base = _copy(token_file, folder)
        with open(base + ".bin", "wb") as fh:
            fh.write(bytes(tokens))
        _open_and_read(base)


def test_an_id_outside_the_vocabulary_is_named(token_file, tmp_path):
    """Control: a flipped high bit gives an id past the 257 byte ids, reported with its position."""
    base = _copy(token_file, str(tmp_path))
    ids = np.fromfile(base + ".bin", dtype=np.uint16)
    ids[5] = 300
    ids.tofile(base + ".bin")
    with pytest.raises(ValueError, match=r"token id 300 at position 5 is outside the vocabulary \(257 ids\)"):
        TokenFile.open(base)
