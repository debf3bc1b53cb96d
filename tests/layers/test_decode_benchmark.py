"""benchmarks/decode.py --quick runs end to end on the CPU (generate rows for both configs and every
batch, op rows) and writes its JSON and markdown."""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_decode_benchmark_quick(tmp_path):
    sys.path.insert(0, REPO)
    try:
        from benchmarks import decode
    finally:
        sys.path.remove(REPO)
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
