"""benchmarks/rowwise_quality.py's command line: --set config overrides reach every run, and a bad one
is refused in one line before any training."""

import pytest

from tests.references import import_benchmark


def test_set_parses_key_value_pairs_and_refuses_a_missing_equals_sign():
    mod = import_benchmark("rowwise_quality")
    assert mod.parse_set(["model.placement=1,3", " train.expert_weight_decay = 1.0 "]) == [
        ("model.placement", "1,3"),
        ("train.expert_weight_decay", "1.0"),
    ]
    with pytest.raises(ValueError, match="KEY=VALUE"):
        mod.parse_set(["model.placement"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--set", "model.bogus=1"], "unknown config field 'model.bogus'"),
        (["--set", "foo"], "--set takes KEY=VALUE"),
        (["--optimizers", "rowwise:xfast"], "--optimizers takes"),
    ],
)
def test_bad_arguments_exit_with_one_line_before_training(argv, message, capsys, tmp_path):
    mod = import_benchmark("rowwise_quality")
    with pytest.raises(SystemExit) as exc:
        mod.main([*argv, "--out-dir", str(tmp_path)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_set_overrides_the_config_of_a_run(tmp_path):
    """One 2-step run with the design's overrides (on a small written corpus): the run's config has them
    (the shared pool read by two layers), and the result records both routers."""
    from tests.lm.helpers import write_corpus

    mod = import_benchmark("rowwise_quality")
    train_txt, valid_txt = write_corpus(tmp_path, 300, 20)
    extra = mod.parse_set([
        "model.placement=1,3", "model.peer.shared_pool=true", "train.expert_weight_decay=0.5",
        "model.d_model=32", "model.peer.n_experts=256", "model.peer.d_key=16", "model.seq_len=16",
        "train.batch_size=2", f"data.train={train_txt}", f"data.valid.ptb={valid_txt}", "data.tokenizer=byte",
        f"data.cache_dir={tmp_path / 'cache'}",
    ])  # fmt: skip
    r = mod.run("ptb-tiny", "rowwise", 0, 2, str(tmp_path / "runs"), extra)
    assert r["steps"] == 2 and set(r["valid_loss"]) == {"ptb"}
    assert set(r["usage"]["ptb"]) == {"blocks.1.ffw", "blocks.3.ffw"}


def _table_steps(make, grads):
    import torch

    table = torch.nn.Parameter(torch.linspace(-1, 1, 24, dtype=torch.float64).reshape(6, 4).clone())
    opt = make([{"params": [table], "name": "experts", "lr": 0.1, "weight_decay": 0.5}])
    for g in grads:
        table.grad = g.clone()
        opt.step()
    return table.detach().clone(), opt


def test_factored_rowwise_reduces_to_rowwise_when_columns_share_one_scale_and_not_otherwise():
    """The factored variant's denominator is sqrt(v_i * f_j): with gradients of +-1 (every column's
    mean g^2 is 1, so f = 1) it takes the row-wise rule's steps exactly, idle rows untouched; with one
    column's gradient 10x larger it steps that column less than row-wise Adam (f_j > 1 there)."""
    import torch

    from torchpeer.optim import RowwiseAdamW

    mod = import_benchmark("rowwise_quality")
    gen = torch.Generator().manual_seed(0)
    signs = [torch.randint(0, 2, (6, 4), generator=gen).double() * 2 - 1 for _ in range(3)]
    for g in signs:
        g[4] = 0  # row 4 is never selected
    rowwise = lambda groups: RowwiseAdamW(groups, lr=0.1, betas=(0.9, 0.99), eps=1e-8)  # noqa: E731
    factored = lambda groups: mod.factored_rowwise_adamw(groups, 0.1, (0.9, 0.99), 1e-8, ("experts",))  # noqa: E731
    a, _ = _table_steps(rowwise, signs)
    b, opt = _table_steps(factored, signs)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    start, _ = _table_steps(rowwise, [])
    assert torch.equal(b[4], start[4])  # lazy: the idle row did not move
    assert opt.state[next(iter(opt.state))]["col_t"] == 3
    skewed = [g * torch.tensor([10.0, 1.0, 1.0, 1.0], dtype=torch.float64) for g in signs[:1]]
    a1, _ = _table_steps(rowwise, skewed)
    b1, _ = _table_steps(factored, skewed)
    moved_a, moved_b = (a1 - start).abs(), (b1 - start).abs()
    assert (moved_b[:4, 0] < moved_a[:4, 0]).all() and (moved_b[:4, 1:] > moved_a[:4, 1:]).all()


def test_bf16_rounding_to_nearest_and_stochastic():
    """round_bf16_: nearest equals torch's bf16 cast; stochastic rounding is unbiased (the mean of many
    roundings of one value is that value) and leaves bf16 values exact; a 0.1 % EMA step that rounding
    to nearest loses is kept on average by stochastic rounding."""
    import torch

    mod = import_benchmark("rowwise_quality")
    x = torch.randn(1000, dtype=torch.float32)
    torch.testing.assert_close(mod.round_bf16_(x.clone()), x.bfloat16().float(), rtol=0, atol=0)
    gen = torch.Generator().manual_seed(0)
    v = torch.full((200_000,), 1.0 + 3e-3, dtype=torch.float32)  # between the bf16 values 1 and 1 + 2^-7
    r = mod.round_bf16_(v.clone(), gen)
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(r.double().mean().item() - (1.0 + 3e-3)) < 3e-5
    exact = x.bfloat16().float()
    torch.testing.assert_close(mod.round_bf16_(exact.clone(), gen), exact, rtol=0, atol=0)
    ema_near, ema_sr = torch.ones(4096), torch.ones(4096)
    for _ in range(200):  # v <- 0.999 v + 0.001 * 2: the fixed point is 2
        mod.round_bf16_(ema_near.mul_(0.999).add_(0.002))
        mod.round_bf16_(ema_sr.mul_(0.999).add_(0.002), gen)
    assert ema_near.max().item() == 1.0  # stuck: each increment is under half an ulp
    assert 1.15 < ema_sr.mean().item() < 1.21  # 2 - 0.999^200 = 1.181


def test_global_step_elementwise_counts_the_tables_steps_not_the_rows():
    """elementwise_gstep: rows selected at every step take the element-wise rule's steps exactly (the
    two counts agree); a row first selected at step 3 takes lazy AdamW's step with t = 3 (smaller than
    the per-row count's sign-like first step here), computed by hand in float64; idle rows stay."""
    import math

    import torch

    from torchpeer.optim import RowwiseAdamW

    mod = import_benchmark("rowwise_quality")
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(6, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    for i, g in enumerate(grads):
        g[4] = 0  # never selected
        if i < 2:
            g[5] = 0  # first selected at step 3
    per_row = lambda groups: RowwiseAdamW(groups, lr=0.1, betas=(0.9, 0.99), eps=1e-8, elementwise=True)  # noqa: E731
    gstep = lambda groups: mod.global_step_elementwise_adamw(groups, 0.1, (0.9, 0.99), 1e-8, ("experts",))  # noqa: E731
    a, _ = _table_steps(per_row, grads)
    b, _ = _table_steps(gstep, grads)
    start, _ = _table_steps(per_row, [])
    torch.testing.assert_close(b[:4], a[:4], rtol=1e-12, atol=1e-12)
    assert torch.equal(b[4], start[4]) and torch.equal(a[4], start[4])
    g = grads[2][5]
    w0 = start[5] * (1 - 0.1 * 0.5)  # decoupled decay (weight_decay 0.5 in _table_steps' group)
    m, v = 0.1 * g, 0.01 * g * g
    by_hand = w0 - 0.1 * (m / (1 - 0.9**3)) / ((v / (1 - 0.99**3)).sqrt() + 1e-8)
    torch.testing.assert_close(b[5], by_hand, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(a[5], by_hand)  # the per-row count takes a different (t = 1) step
    assert math.isclose(float((a[5] - w0).abs().max()), 0.1, rel_tol=1e-6)  # sign-like: lr per element
