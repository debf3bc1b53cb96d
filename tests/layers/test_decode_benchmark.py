"""benchmarks/decode.py --quick runs end to end on the CPU (generate rows for both configs and every
batch, op rows) and writes its JSON and markdown."""

import json

import pytest

from tests.references import import_benchmark


def test_decode_benchmark_quick(tmp_path):
    decode = import_benchmark("decode")
    result = decode.main(["--quick", "--out-dir", str(tmp_path), "--commit", "abc123"])
    saved = json.loads(next(tmp_path.glob("decode_*.json")).read_text())
    assert saved["rows"] == result["rows"] and saved["commit"] == "abc123" and saved["gpu"] == "cpu"
    got = {(r["config"], r["variant"], r["batch"]) for r in saved["rows"]}
    assert got == {(c, v, b) for c in decode.CONFIGS for v in ("fp32", "bf16") for b in (1, 2)}
    for r in saved["rows"]:
        assert "note" not in r, r
        assert r["total_ms"] > 0 and r["prefill_ms"] > 0 and r["tokens_per_s"] > 0
    assert {r["what"] for r in saved["ops"]} >= {"retrieval torch", "PEER layer eval fwd (default)", "mixing torch"}
    assert all(r.get("eager_ms", 0) > 0 for r in saved["ops"])
    md = next(tmp_path.glob("decode_*.md")).read_text()
    assert "| gpu-peer-small | fp32 | 1 |" in md and "## Ops at decode sizes" in md


def test_rows_alternate_configs_and_the_budget_keeps_what_ran(tmp_path):
    decode = import_benchmark("decode")
    result = decode.main(
        ["--quick", "--no-ops", "--out-dir", str(tmp_path), "--variants", "bf16,fp32", "--budget-s", "0"]
    )
    # a zero budget still runs nothing and says how many rows it left out
    assert result["rows"] == [] and any("8 generate row(s) not run" in n for n in result["notes"])
    result = decode.main(["--quick", "--no-ops", "--out-dir", str(tmp_path), "--variants", "bf16,fp32"])
    order = [(r["variant"], r["batch"], r["config"]) for r in result["rows"]]
    # variants in VARIANTS' order (fp32 before bf16), each (variant, batch) with dense then PEER beside it
    assert order == [(v, b, c) for v in ("fp32", "bf16") for b in (1, 2) for c in decode.CONFIGS]


def test_unknown_config_or_variant_is_refused_with_the_choices(tmp_path):
    decode = import_benchmark("decode")
    with pytest.raises(SystemExit, match="unknown variant.*choose from: bf16 graph"):
        decode.main(["--quick", "--out-dir", str(tmp_path), "--variants", "fp16"])
    with pytest.raises(SystemExit, match="unknown config"):
        decode.main(["--quick", "--out-dir", str(tmp_path), "--configs", "gpu-peer-base"])


def test_the_winner_config_decodes_beside_the_dense_twin_when_asked(tmp_path):
    """issue 19: the recommended PEER config gets the same rows; not in the default pair."""
    decode = import_benchmark("decode")
    argv = ["--quick", "--no-ops", "--out-dir", str(tmp_path), "--variants", "fp32", "--batches", "1"]
    result = decode.main(argv + ["--configs", "gpu-dense-small,gpu-peer-multi-tuned-small"])
    assert [r["config"] for r in result["rows"]] == ["gpu-dense-small", "gpu-peer-multi-tuned-small"]
    assert all("note" not in r and r["tokens_per_s"] > 0 for r in result["rows"])
