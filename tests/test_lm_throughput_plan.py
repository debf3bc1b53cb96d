"""benchmarks/lm_throughput.py's row plan: issue 19 asks for compiled rows of all four configs, dense
beside PEER; the plan keeps each pair adjacent so a run cut by its time budget still has a ratio."""

import json

import pytest

from tests.references import import_benchmark


def test_compiled_only_is_the_four_configs_in_dense_then_peer_pairs():
    plan = import_benchmark("lm_throughput").lm_plan(compiled_only=True)
    assert plan == [
        ("gpu-dense-small", "adamw", True),
        ("gpu-peer-small", "rowwise_adam_bf16", True),
        ("gpu-dense-base", "adamw", True),
        ("gpu-peer-base", "rowwise_adam_bf16", True),
    ]


def test_full_plan_has_every_config_compiled_and_quick_drops_compiled_rows():
    mod = import_benchmark("lm_throughput")
    full = mod.lm_plan()
    assert {c for c, _, compiled in full if compiled} == {
        "gpu-dense-small", "gpu-peer-small", "gpu-dense-base", "gpu-peer-base"
    }  # fmt: skip
    assert len(set(full)) == len(full)  # no row twice
    assert mod.lm_plan(quick=True) == [r for r in full if not r[2]] and mod.lm_plan(quick=True)


def test_configs_replace_the_plan_in_the_order_given_and_an_empty_list_is_refused():
    mod = import_benchmark("lm_throughput")
    plan = mod.lm_plan(configs="gpu-dense-small, gpu-peer-multi-tuned-small")
    assert plan == [("gpu-dense-small", "adamw", False), ("gpu-peer-multi-tuned-small", "adamw", False)]
    compiled = mod.lm_plan(compiled_only=True, configs="gpu-dense-small,gpu-peer-multi-tuned-small")
    assert compiled == [(c, "adamw", True) for c, _, _ in plan]
    with pytest.raises(ValueError, match="names no config"):
        mod.lm_plan(configs=" , ")


def test_configs_take_a_tables_optimizer_after_a_colon_and_refuse_an_unknown_one():
    mod = import_benchmark("lm_throughput")
    plan = mod.lm_plan(
        configs="gpu-dense-small,gpu-peer-multi-tuned-small,gpu-peer-multi-tuned-small:rowwise_adam_bf16,"
        "gpu-peer-small:elementwise_adam_bf16"
    )
    assert plan == [
        ("gpu-dense-small", "adamw", False),
        ("gpu-peer-multi-tuned-small", "adamw", False),
        ("gpu-peer-multi-tuned-small", "rowwise_adam_bf16", False),
        ("gpu-peer-small", "elementwise_adam_bf16", False),
    ]
    assert mod.lm_plan(compiled_only=True, configs="gpu-peer-small:rowwise_adam") == [
        ("gpu-peer-small", "rowwise_adam", True)
    ]
    with pytest.raises(
        ValueError, match="unknown tables' optimizer 'rowwise'.*rowwise_adam_bf16.*elementwise_adam_bf16"
    ):
        mod.lm_plan(configs="gpu-peer-small:rowwise")


def test_cli_runs_a_quick_row_with_the_rowwise_tables_on_the_cpu(tmp_path, monkeypatch):
    """The colon form reaches lm_row: a quick row of the recommended config with a fused table optimizer
    (Triton interpreted; rowwise_adam_bf16: the options of FUSED_EXPERT_OPTIMIZERS, bf16 tables), whose
    shared pool takes the deferred update (before it, the row recorded the pool's ValueError as its note)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mod = import_benchmark("lm_throughput")
    configs = "gpu-peer-multi-tuned-small:rowwise_adam_bf16"
    mod.main(["--quick", "--no-layer", "--out-dir", str(tmp_path), "--configs", configs])
    (result,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    (row,) = result["rows"]
    assert (row["config"], row["expert_optimizer"]) == ("gpu-peer-multi-tuned-small", "rowwise_adam_bf16")
    assert "note" not in row, row["note"]
    assert row["tokens_per_s"] > 0 and row["loss_last"] == row["loss_last"]  # finite, not NaN
