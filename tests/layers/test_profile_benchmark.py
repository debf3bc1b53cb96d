"""benchmarks/profile_layer.py --quick runs on the CPU, counts host scalar reads (the syncs of a
CUDA step) and writes its JSON and markdown; bad arguments get one clear error."""

import json

import pytest

from tests.references import import_benchmark


@pytest.fixture(scope="module")
def profile_layer():
    return import_benchmark("profile_layer")


def test_quick_profile_counts_scalar_reads_and_writes_its_tables(profile_layer, tmp_path):
    result = profile_layer.main(["--quick", "--impl", "torch,dense4d", "--steps", "2", "--warmup", "1",
                                 "--out-dir", str(tmp_path), "--commit", "abc123"])  # fmt: skip
    saved = json.loads(next(tmp_path.glob("profile_layer_*.json")).read_text())
    assert saved["rows"] == result["rows"] and saved["commit"] == "abc123"
    torch_row, dense_row = saved["rows"]
    # the torch PEER path checks its indices' range on the CPU with two scalar reads per forward
    # (ops/expert_mixing/checks.py): exactly what the profile must count as syncs
    assert torch_row["sync_kinds"].get("aten::_local_scalar_dense") == 2.0
    assert dense_row["syncs"] == 0.0
    for row in saved["rows"]:
        assert row["wall_ms"] > 0 and row["gpu_ms"] is None and row["busy"] is None  # no GPU here
        assert row["top_host"] and all(e["ms"] >= 0 and e["calls"] > 0 for e in row["top_host"])
    assert any(e["name"] == "aten::addmm" for e in dense_row["top_host"])
    md = next(tmp_path.glob("profile_layer_*.md")).read_text()
    assert "| torch | 32 | 64 |" in md and "commit abc123" in md


@pytest.mark.parametrize(
    "argv, message",
    [(["--impl", "nope"], "unknown --impl"), (["--tokens", "4k"], "--tokens must be"), (["--steps", "0"], "--steps")],
)
def test_bad_arguments_say_what_to_fix(profile_layer, argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        profile_layer.main([*argv, "--out-dir", str(tmp_path)])
    assert message in capsys.readouterr().err


def test_profile_one_runs_the_layer_in_the_inputs_dtype(profile_layer):
    """The GPU default is bf16 inputs: the layer is cast to them (a PEER layer refuses inputs of
    another dtype than its parameters; an H200 run of 2026-12-05 stopped there)."""
    import torch

    cfg = {"n_experts": 8**2, "heads": 2, "top_k": 2, "d_key": 8}
    row = profile_layer.profile_one("torch", 16, 8, cfg, torch.device("cpu"), torch.bfloat16, 1, 0)
    assert row["wall_ms"] > 0
