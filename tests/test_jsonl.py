"""torchpeer/jsonl.py on a committed run's metrics.jsonl.xz: the same records and skipped line numbers
as the plain file, the plain file first when both are there, and a damaged .xz is one clear error."""

import json
import lzma

import pytest

from torchpeer.jsonl import DamagedFile, read_json_lines, run_metrics_path

# a damaged middle line (2), a line that is not an object (4) and a cut last line (6), as a kill leaves
TEXT = (
    json.dumps({"step": 1, "loss": 4.0})
    + '\n{"step": 2, "lo\n'
    + json.dumps({"step": 3, "loss": 3.5})
    + "\n[1, 2]\n\n"
    + '{"step": 6, "loss": 3.'
)


def test_an_xz_file_reads_as_the_plain_one(tmp_path):
    plain, packed = tmp_path / "metrics.jsonl", tmp_path / "metrics.jsonl.xz"
    plain.write_text(TEXT)
    packed.write_bytes(lzma.compress(TEXT.encode()))
    a, b = read_json_lines(str(plain)), read_json_lines(str(packed))
    assert a.records == b.records == [{"step": 1, "loss": 4.0}, {"step": 3, "loss": 3.5}]
    assert a.bad == b.bad == [2, 4, 6] and a.last == b.last == 6 and b.damaged() == [2, 4]
    # undecodable bytes are replaced in both forms: their line is skipped, not fatal
    raw = b'{"step": 1}\n\xff\xfe\n'
    packed.write_bytes(lzma.compress(raw))
    assert read_json_lines(str(packed)).bad == [2]


def test_run_metrics_path_prefers_the_plain_file(tmp_path):
    assert run_metrics_path(str(tmp_path)) is None
    (tmp_path / "metrics.jsonl.xz").write_bytes(lzma.compress(b"{}\n"))
    assert run_metrics_path(str(tmp_path)) == str(tmp_path / "metrics.jsonl.xz")
    (tmp_path / "metrics.jsonl").write_text("{}\n")  # the one a run appends to: the newer
    assert run_metrics_path(str(tmp_path)) == str(tmp_path / "metrics.jsonl")
    assert run_metrics_path(str(tmp_path / "nothing")) is None


@pytest.mark.parametrize("damage", ["truncated", "not xz"])
def test_a_damaged_xz_file_is_a_value_error_that_names_it(tmp_path, damage):
    path = tmp_path / "metrics.jsonl.xz"
    packed = lzma.compress((json.dumps({"step": 1, "loss": 4.0}) + "\n").encode() * 200)
    path.write_bytes(packed[: len(packed) // 2] if damage == "truncated" else b"not an xz stream\n")
    with pytest.raises(ValueError) as e:
        read_json_lines(str(path))
    assert isinstance(e.value, DamagedFile)
    assert str(e.value).startswith(f"{path} is a damaged xz file (") and f"git checkout -- {path}" in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no lzma traceback chained to it
