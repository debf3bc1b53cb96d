"""benchmarks/lm_throughput.py's row plan: issue 19 asks for compiled rows of all four configs, dense
beside PEER; the plan keeps each pair adjacent so a run cut by its time budget still has a ratio."""

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
