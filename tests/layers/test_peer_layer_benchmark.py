"""benchmarks/peer_layer.py --retrieval-forwards auto,threshold: one run gives the Triton layer's row
with each retrieval forward, named by what ran, and their ratio (the layer with the new default
beside the old one on one card, NOTES_issue19 section 19). On the CPU through the Triton interpreter
at a tiny shape, each timing one call; bad values get one argparse error naming the allowed ones."""

import json
import time

import pytest
import torch

from tests.references import import_benchmark


@pytest.fixture(scope="module")
def peer_layer():
    return import_benchmark("peer_layer")


def test_retrieval_forwards_give_both_rows_named_and_their_ratio(peer_layer, tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from torchpeer.ops.retrieval import triton_op

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the "triton" impl on the CPU

    def once(fn, device, **kw):  # the interpreter is slow: one call per timing
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)

    ran = []  # the forward each real (not meta) retrieval call was configured with, and what ran
    real_forward_impl = triton_op.forward_impl

    def spy(queries, sub_keys, top_k, config):
        impl = real_forward_impl(queries, sub_keys, top_k, config)
        if queries.device.type != "meta":
            ran.append((config.forward, impl))
        return impl

    monkeypatch.setattr(peer_layer, "time_ms", once)
    monkeypatch.setattr(triton_op, "forward_impl", spy)
    argv = ["--quick", "--impls", "triton", "--retrieval-forwards", "auto,threshold", "--d-models", "32",
            "--tokens", "16", "--no-optim", "--no-kernels", "--no-parts", "--out-dir", str(tmp_path),
            "--commit", "abc123"]  # fmt: skip
    result = peer_layer.main(argv)
    saved = json.loads(next(tmp_path.glob("peer_layer_*.json")).read_text())
    assert saved["rows"] == result["rows"] and saved["retrieval_forwards"] == ["auto", "threshold"]
    auto, threshold = saved["rows"]
    assert (auto["impl"], auto["retrieval_forward"], auto["retrieval"]) == ("triton", "auto", "auto=split")  # 16 tokens
    assert (threshold["impl"], threshold["retrieval_forward"], threshold["retrieval"]) == (
        "triton", "threshold", "threshold")  # fmt: skip
    assert auto["label"] == "triton (retrieval auto=split)" and threshold["label"] == "triton (retrieval threshold)"
    for row in (auto, threshold):
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and "note" not in row
    # the config reached the layer's kernels: the first row ran auto's pick, the second threshold
    assert ("auto", "split") in ran and ("threshold", "threshold") in ran and len(set(ran)) == 2
    (ratio,) = saved["retrieval_ratios"]
    assert ratio["first"] == auto["label"] and ratio["other"] == threshold["label"]
    assert ratio["fwd_bwd_ratio"] == pytest.approx(threshold["fwd_bwd_ms"] / auto["fwd_bwd_ms"], rel=1e-2)
    md = next(tmp_path.glob("peer_layer_*.md")).read_text()
    assert "| triton (retrieval auto=split) | 32 |" in md and "| triton (retrieval threshold) | 32 |" in md
    assert "## Retrieval forwards compared" in md
    assert f"| triton (retrieval auto=split) | triton (retrieval threshold) | 32 | 16 | {ratio['fwd_ratio']:.3f}" in md


def test_auto_label_names_the_forward_auto_takes_at_the_gpu_shapes(peer_layer):
    """At the full config (heads 8, top_k 16, d_key 128, 1024^2 experts, bf16): the old default below
    queue_tokens, queue from 16384 tokens (torchpeer/ops/retrieval/triton_op.py forward_impl)."""
    pytest.importorskip("triton")
    cfg = dict(n_experts=1024**2, heads=8, top_k=16, d_key=128)
    labels = [peer_layer.retrieval_label("auto", T, cfg, torch.bfloat16) for T in (4096, 16384, 65536)]
    assert labels == ["auto=threshold", "auto=queue", "auto=queue"]
    assert peer_layer.retrieval_label("threshold", 65536, cfg, torch.bfloat16) == "threshold"


@pytest.mark.parametrize(
    "value, message",
    [("auto,nope", "(unknown: nope)"), ("auto,auto", "distinct values"), (",", "distinct values")],
)
def test_bad_retrieval_forwards_name_the_allowed_values(peer_layer, value, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        peer_layer.main(["--quick", "--retrieval-forwards", value, "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert message in err and "auto, threshold, merge, split, onepass, packed, queue" in err
    assert not list(tmp_path.iterdir())  # nothing ran


def test_retrieval_forwards_without_a_triton_impl_is_refused(peer_layer, capsys, tmp_path):
    """The option multiplies only the Triton rows: asked for with none of them, it would do nothing,
    so the script says which impl to add instead of running without it."""
    with pytest.raises(SystemExit):
        peer_layer.main(
            ["--quick", "--impls", "dense4d", "--retrieval-forwards", "auto,threshold", "--out-dir", str(tmp_path)]
        )
    assert "add one to --impls" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_graph_impl_off_cuda_is_a_note_and_the_other_rows_run(peer_layer, tmp_path, monkeypatch):
    """triton-graph needs CUDA graphs: on the CPU (even under the interpreter) it is skipped with a note
    that says so, and the rows of the other impls still run."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(peer_layer, "time_ms", lambda fn, device, **kw: (fn(), 1.0)[1])
    argv = ["--quick", "--impls", "triton-graph,dense4d", "--d-models", "32", "--tokens", "16", "--no-optim",
            "--no-kernels", "--no-parts", "--out-dir", str(tmp_path), "--commit", "abc123"]  # fmt: skip
    result = peer_layer.main(argv)
    assert "triton-graph skipped: needs a CUDA device (CUDA graphs)" in result["notes"]
    assert [r["impl"] for r in result["rows"]] == ["dense4d"] and result["rows"][0]["fwd_bwd_ms"] == 1.0
    assert (
        peer_layer.make_module("triton-graph", 32, dict(n_experts=256, heads=2, top_k=4, d_key=16)).backend == "triton"
    )


def test_graph_rows_of_several_sizes_each_capture_their_own_shape(peer_layer, monkeypatch):
    """make_graphed_callables replaces the forward of the module it is given with one that accepts only
    the captured shape; the benchmark must hand it a fresh wrapper per row, so that the layer itself
    keeps its own forward and a later row of another size is captured anew (on 2026-12-06 the 16384-
    and 65536-token triton-graph rows failed on the 4096-token row's graph). The fake below does what
    the real function does to a module's forward, on the CPU."""
    captured = []

    def fake_graphed(m, args):
        shape, eager = args[0].shape, m.forward
        captured.append(tuple(shape))

        def replay(x):
            if x.shape != shape:
                raise RuntimeError(f"The size of tensor a ({shape[0]}) must match the size of tensor b ({x.shape[0]})")
            return eager(x)

        m.forward = replay
        return m

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake_graphed)
    monkeypatch.setattr(peer_layer, "time_ms", lambda fn, device, **kw: (fn(), 1.0)[1])
    module = torch.nn.Linear(8, 8)
    own_forward = module.forward
    for tokens in (4, 16):
        row = {"impl": "triton-graph", "d_model": 8, "tokens": tokens, "fwd_ms": None, "fwd_bwd_ms": None}
        out = peer_layer.measure_row(module, row, torch.device("cpu"), torch.float32, budget_s=0.1)
        assert out["fwd_bwd_ms"] == 1.0 and "note" not in out
    assert captured == [(4, 8), (16, 8)]
    assert module.forward == own_forward  # the layer itself was never replaced


def test_touched_rows_time_the_opt_in_expert_pass_and_leave_the_tuning_as_it_was(peer_layer, tmp_path, monkeypatch):
    """triton-touched sets TUNING["expert"]["touched_below"] for its own rows only: the "triton" row
    beside it runs the default pass, and the tuning is restored after (also for later rows)."""
    pytest.importorskip("triton")
    from torchpeer.ops.expert_mixing import triton_op

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    seen = []

    def fake_time(fn, device, **kw):
        fn()
        seen.append(triton_op.TUNING["expert"].get("touched_below"))
        return 1.0

    monkeypatch.setattr(peer_layer, "time_ms", fake_time)
    argv = ["--quick", "--impls", "triton-touched,triton", "--d-models", "16", "--tokens", "4", "--no-optim",
            "--no-kernels", "--no-parts", "--out-dir", str(tmp_path), "--commit", "abc123"]  # fmt: skip
    before = dict(triton_op.TUNING["expert"])
    result = peer_layer.main(argv)
    assert [r["impl"].split()[0] for r in result["rows"]] == ["triton-touched", "triton"]
    assert seen == [1.0, 1.0, None, None]  # fwd and fwd+bwd of each row
    assert triton_op.TUNING["expert"] == before
