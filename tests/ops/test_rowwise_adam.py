"""The fused lazy Adam mixing backward vs the plain-PyTorch spec (torchpeer/optim/rowwise_adam.py)
and vs lazy Adam by hand in float64 (tests/references.py LazyAdam64), with the second moment per row
(rowwise_adam) and per element (elementwise_adam).

Step for step: the same starting tables and state, each step fresh random inputs (repeated
experts, skew), the spec gets float64 gradients from expert_mix_reference; after every step tables,
moments and step counts must agree, and rows nobody selected must be bitwise unchanged.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from tests.references import LazyAdam64, rel_err  # noqa: E402
from torchpeer.ops import expert_mix_reference  # noqa: E402
from torchpeer.ops.expert_mixing import triton_op as mixing  # noqa: E402
from torchpeer.ops.expert_mixing.triton_fused_op import expert_mix_rowwise_adam  # noqa: E402
from torchpeer.optim.rowwise_adam import RowwiseAdamState, rowwise_adam_update_  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = {"tile": 128, "num_warps": {1024: 4}}  # BLOCK_D 32 -> BLOCK_S 4: many segments


def hyper(lr, betas=(0.9, 0.99), eps=1e-8, wd=0.1):
    return torch.tensor([lr, betas[0], betas[1], eps, wd], dtype=torch.float32, device=DEVICE)


def run_steps(T, H, K, d, N, steps, segment, monkeypatch, skew=0.0, activation="gelu", seed=0, elementwise=False):
    monkeypatch.setattr(mixing, "TUNING", {"fwd": SMALL, "expert": dict(SMALL, segment=segment), "dx": SMALL})
    gen = torch.Generator().manual_seed(seed)
    down = (torch.randn(N, d, generator=gen) / d**0.25).to(DEVICE)
    up = torch.randn(N, d, generator=gen).to(DEVICE)
    down_ref, up_ref = down.double(), up.double()
    st = [RowwiseAdamState.zeros_like(t, elementwise=elementwise) for t in (down, up)]
    st_ref = [RowwiseAdamState.zeros_like(t, elementwise=elementwise) for t in (down, up)]
    by_hand = [LazyAdam64(t, elementwise) for t in (down, up)]
    for step in range(steps):
        lr = 1e-2 * (1 + step)  # a changing lr: read from the hyper tensor at backward time
        x = torch.randn(T, d, generator=gen).to(DEVICE).requires_grad_()
        idx = torch.randint(0, N // 2, (T, H, K), generator=gen)  # half the rows never selected
        idx[:, :, 1] = idx[:, :, 0]  # repeated experts inside a head
        if skew:
            hot = torch.rand(idx.shape, generator=gen) < skew
            idx[hot] = torch.randint(0, 2, (int(hot.sum()),), generator=gen)
        idx = idx.to(DEVICE)
        gates = (torch.rand(T, H, K, generator=gen) + 0.1).to(DEVICE).requires_grad_()
        dy = torch.randn(T, d, generator=gen).to(DEVICE)
        before = down.clone(), up.clone()

        y = expert_mix_rowwise_adam(x, down, up, idx, gates, activation, st[0], st[1], hyper(lr))
        y.backward(dy)

        leaves = [t.detach().double().requires_grad_() for t in (x, down_ref, up_ref, gates)]
        y_ref = expert_mix_reference(leaves[0], leaves[1], leaves[2], idx, leaves[3], activation)
        y_ref.backward(dy.double())
        assert rel_err(y, y_ref) < 1e-5
        assert rel_err(x.grad, leaves[0].grad) < 1e-5
        assert rel_err(gates.grad, leaves[3].grad) < 1e-5
        rows = idx.reshape(-1).unique()
        for table, grad, state in ((down_ref, leaves[1].grad, st_ref[0]), (up_ref, leaves[2].grad, st_ref[1])):
            rowwise_adam_update_(table, state, rows, grad[rows], lr, (0.9, 0.99), 1e-8, 0.1)
        for hand, grad in zip(by_hand, (leaves[1].grad, leaves[2].grad)):
            hand.step(grad, idx.reshape(-1), lr)

        untouched = torch.ones(N, dtype=torch.bool, device=DEVICE)
        untouched[rows] = False
        for table, ref, b, s, sr, hand in (
            (down, down_ref, before[0], st[0], st_ref[0], by_hand[0]),
            (up, up_ref, before[1], st[1], st_ref[1], by_hand[1]),
        ):
            assert torch.equal(table[untouched], b[untouched])
            assert not torch.equal(table[rows], b[rows])
            assert rel_err(table, ref) < 1e-5, (step, rel_err(table, ref))
            assert rel_err(table, hand.w) < 1e-5, (step, rel_err(table, hand.w))
            assert s.steps.tolist() == hand.t
            assert rel_err(s.exp_avg, sr.exp_avg) < 1e-5
            assert rel_err(s.exp_avg_sq, sr.exp_avg_sq) < 1e-4
            assert torch.equal(s.steps, sr.steps)
    return st


@pytest.mark.parametrize("elementwise", [False, True], ids=["rowwise", "elementwise"])
@pytest.mark.parametrize("activation", ["gelu", "identity"])  # identity: the linear read-out
def test_fused_update_matches_the_spec_step_for_step(monkeypatch, activation, elementwise):
    st = run_steps(
        T=11, H=2, K=3, d=32, N=40, steps=2, segment=1 << 20, monkeypatch=monkeypatch, activation=activation,
        elementwise=elementwise,
    )  # fmt: skip
    # rows stepped twice, once (their first step's bias correction at t = 1 beside rows at t = 2) and never
    assert {0, 1, 2} <= set(st[0].steps.tolist())
    assert st[0].exp_avg_sq.shape == ((40, 32) if elementwise else (40,))


@pytest.mark.parametrize("elementwise", [False, True], ids=["rowwise", "elementwise"])
def test_fused_update_under_skew_with_split_segments(monkeypatch, elementwise):
    """80% of the selections on experts 0 and 1: their lists are split into segments of 4 and
    the reduce pass updates them; relu exercises the other activation."""
    run_steps(
        T=13, H=2, K=3, d=32, N=30, steps=2, segment=4, monkeypatch=monkeypatch, skew=0.8, activation="relu", seed=1,
        elementwise=elementwise,
    )  # fmt: skip


@pytest.mark.parametrize("elementwise", [False, True], ids=["rowwise", "elementwise"])
def test_spec_is_lazy_adam_by_hand(elementwise):
    """rowwise_adam_update_ == LazyAdam64 over 4 steps: a row selected every step, rows first selected
    at a later step (their first update is a normal bias-corrected step), a row never selected (bitwise
    untouched); element-wise, the rows selected every step equal torch.optim.AdamW (same decay)."""
    gen = torch.Generator().manual_seed(21)
    table = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    adamw_rows = table[:1].clone().requires_grad_()  # row 0 is selected at every step
    adamw = torch.optim.AdamW([adamw_rows], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    state = RowwiseAdamState.zeros_like(table, elementwise=elementwise)
    hand = LazyAdam64(table, elementwise)
    start = table.clone()
    for step, rows in enumerate(([0, 1], [0, 2, 3], [0, 1, 3], [0, 4])):  # row 5: never
        lr = 1e-2 * (step + 1)
        grad = torch.zeros_like(table)
        grad[rows] = torch.randn(len(rows), 4, generator=gen, dtype=torch.float64) * 10.0 ** torch.arange(4.0)
        for group in adamw.param_groups:
            group["lr"] = lr
        adamw_rows.grad = grad[:1].clone()
        adamw.step()
        was = table.clone()
        rowwise_adam_update_(table, state, torch.tensor(rows), grad[rows], lr, (0.9, 0.99), 1e-8, 0.1)
        hand.step(grad, rows, lr)
        assert rel_err(table, hand.w) < 1e-7, step
        if elementwise:
            assert rel_err(table[:1], adamw_rows) < 1e-7, step
        first = [r for r in rows if hand.t[r] == 1]  # a first step: lr * g / |g| per element (+ decay)
        if elementwise and first:
            delta = table[first] - was[first] * (1 - lr * 0.1)
            assert torch.allclose(delta.abs(), torch.full_like(delta, lr), rtol=1e-4), step
    assert torch.equal(table[5], start[5]) and state.steps.tolist() == hand.t == [4, 2, 1, 2, 1, 0]


def test_fused_update_is_bitwise_deterministic(monkeypatch):
    def once():
        monkeypatch.setattr(mixing, "TUNING", {"fwd": SMALL, "expert": dict(SMALL, segment=4), "dx": SMALL})
        gen = torch.Generator().manual_seed(3)
        down, up = torch.randn(20, 16, generator=gen).to(DEVICE), torch.randn(20, 16, generator=gen).to(DEVICE)
        x = torch.randn(9, 16, generator=gen).to(DEVICE).requires_grad_()
        idx = torch.randint(0, 3, (9, 2, 3), generator=gen).to(DEVICE)
        g = torch.rand(9, 2, 3, generator=gen).to(DEVICE).requires_grad_()
        st = [RowwiseAdamState.zeros_like(t) for t in (down, up)]
        expert_mix_rowwise_adam(x, down, up, idx, g, "gelu", st[0], st[1], hyper(1e-2)).sum().backward()
        return down, up, x.grad, g.grad, st[0].exp_avg, st[1].exp_avg_sq

    for a, b in zip(once(), once()):
        assert torch.equal(a, b)


def test_bad_inputs_raise_clear_errors():
    down = torch.randn(8, 16, device=DEVICE)
    up = torch.randn(8, 16, device=DEVICE)
    x = torch.randn(3, 16, device=DEVICE)
    idx = torch.randint(0, 8, (3, 1, 2), device=DEVICE)
    g = torch.rand(3, 1, 2, device=DEVICE)
    st = [RowwiseAdamState.zeros_like(t) for t in (down, up)]
    with pytest.raises(ValueError, match="both tables or neither keep element-wise"):
        expert_mix_rowwise_adam(
            x, down, up, idx, g, "gelu", st[0], RowwiseAdamState.zeros_like(up, elementwise=True), hyper(1e-3)
        )
    bad_v = RowwiseAdamState(st[1].exp_avg, torch.zeros(8, 15, device=DEVICE), st[1].steps)
    with pytest.raises(ValueError, match=r"exp_avg_sq must be a contiguous torch.float32 tensor of shape \(8, 16\)"):
        expert_mix_rowwise_adam(x, down, up, idx, g, "gelu", st[0], bad_v, hyper(1e-3))
    with pytest.raises(ValueError, match="must not require grad"):
        expert_mix_rowwise_adam(x, down.requires_grad_(), up, idx, g, "gelu", st[0], st[1], hyper(1e-3))
    down.requires_grad_(False)
    bad = RowwiseAdamState(st[1].exp_avg, st[1].exp_avg_sq, st[1].steps.long())
    with pytest.raises(ValueError, match="steps must be a contiguous torch.int32"):
        expert_mix_rowwise_adam(x, down, up, idx, g, "gelu", st[0], bad, hyper(1e-3))
    with pytest.raises(ValueError, match=r"hyper must be a \(5,\)"):
        expert_mix_rowwise_adam(x, down, up, idx, g, "gelu", st[0], st[1], torch.zeros(4, device=DEVICE))


@pytest.mark.parametrize("elementwise", [False, True], ids=["rowwise", "elementwise"])
def test_state_dict_round_trip_and_shape_check(elementwise):
    table = torch.randn(6, 4)
    a = RowwiseAdamState.zeros_like(table, elementwise=elementwise)
    a.exp_avg.normal_()
    a.exp_avg_sq.uniform_()
    a.steps.fill_(3)
    b = RowwiseAdamState.zeros_like(table, elementwise=elementwise)
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in ("exp_avg", "exp_avg_sq", "steps"))
    with pytest.raises(ValueError, match="shape"):
        RowwiseAdamState.zeros_like(torch.randn(5, 4), elementwise=elementwise).load_state_dict(a.state_dict())
    other = RowwiseAdamState.zeros_like(table, elementwise=not elementwise)  # the other optimizer's state
    theirs = "per element" if elementwise else "per row"
    with pytest.raises(
        ValueError, match=f"checkpoint's Adam second moment is {theirs}.*resume with the train.expert_optimizer"
    ):
        other.load_state_dict(a.state_dict())


class TinyPEERTables(torch.nn.Module):
    """Just the tables and the hook a PEER layer has (routing comes from the test)."""

    def __init__(self, N, d, seed):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.down = torch.nn.Parameter((torch.randn(N, d, generator=gen) / d**0.25).to(DEVICE))
        self.up = torch.nn.Parameter(torch.randn(N, d, generator=gen).to(DEVICE))
        self.table_update = None

    def forward(self, x, idx, gates):
        return self.table_update(x, self.down, self.up, idx, gates, "gelu")


@pytest.mark.parametrize("elementwise", [False, True], ids=["rowwise", "elementwise"])
def test_table_optimizer_set_lr_and_checkpoint_resume(elementwise):
    """Engine level: set_lr reaches the kernels; a state_dict round trip into a fresh engine on a
    copy of the tables continues bitwise like the original (the other kind of second moment is
    refused, naming the fix); no_grad forwards update nothing."""
    from torchpeer.optim import RowwiseTableAdam

    gen = torch.Generator().manual_seed(7)
    batches = [
        (
            torch.randn(7, 16, generator=gen),
            torch.randint(0, 12, (7, 2, 2), generator=gen),
            torch.rand(7, 2, 2, generator=gen) + 0.1,
            torch.randn(7, 16, generator=gen),
        )
        for _ in range(3)
    ]

    def step(layer, engine, b, lr):
        x, idx, g, dy = (t.to(DEVICE) for t in b)
        engine.set_lr(lr)
        layer(x.requires_grad_(), idx, g).backward(dy)

    a = TinyPEERTables(24, 16, seed=8)
    engine_a = RowwiseTableAdam({"l": a}, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, elementwise=elementwise)
    assert not a.down.requires_grad and not a.up.requires_grad
    start = a.down.detach().clone()
    step(a, engine_a, batches[0], 3e-2)
    assert engine_a.lr == pytest.approx(3e-2)
    # the first update of a row is lr * g / rms(g) (+ decay): check its size against lr = 3e-2
    rows = batches[0][1].reshape(-1).unique()
    delta = (a.down.detach() - start * (1 - 3e-2 * 0.1))[rows]
    assert torch.allclose(delta.pow(2).mean(1).sqrt(), torch.full((rows.numel(),), 3e-2, device=DEVICE), rtol=1e-3)

    b = TinyPEERTables(24, 16, seed=0)
    b.down.data.copy_(a.down.detach())
    b.up.data.copy_(a.up.detach())
    with pytest.raises(ValueError, match="second moments.*set train.expert_optimizer to the checkpoint's kind"):
        RowwiseTableAdam({"l": TinyPEERTables(24, 16, seed=0)}, lr=0.5, elementwise=not elementwise).load_state_dict(
            engine_a.state_dict()
        )
    engine_b = RowwiseTableAdam({"l": b}, lr=0.5, elementwise=elementwise)
    engine_b.load_state_dict(engine_a.state_dict())
    assert engine_b.states["l"][1].exp_avg_sq.shape == ((24, 16) if elementwise else (24,))
    for layer, engine in ((a, engine_a), (b, engine_b)):
        step(layer, engine, batches[1], 1e-2)
    assert torch.equal(a.down, b.down) and torch.equal(a.up, b.up)
    assert torch.equal(engine_a.states["l"][0].exp_avg, engine_b.states["l"][0].exp_avg)
    assert torch.equal(engine_a.states["l"][0].exp_avg_sq, engine_b.states["l"][0].exp_avg_sq)

    before = a.up.detach().clone()
    with torch.no_grad():
        x, idx, g, _ = (t.to(DEVICE) for t in batches[2])
        a(x, idx, g)
    assert torch.equal(a.up, before)
    with pytest.raises(ValueError, match="does not match"):
        engine_b.load_state_dict({"hyper": [1.0] * 5, "layers": {"other": {}}})


def test_attach_to_a_real_peer_layer_keeps_tables_out_of_adamw():
    from torchpeer.layers.peer import PEER
    from torchpeer.lm.optim import expert_parameters
    from torchpeer.optim import attach_rowwise_adam

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 16), PEER(16, n_experts=36, heads=2, top_k=2, d_key=8, backend="torch")
    )
    model.to(DEVICE)
    table_opt = attach_rowwise_adam(model, lr=1e-2)
    peer = model[1]
    assert set(expert_parameters(model)) == {id(peer.down), id(peer.up)}
    trainable = [p for p in model.parameters() if p.requires_grad]  # what AdamW and clipping see
    assert all(p is not peer.down and p is not peer.up for p in trainable)
    before = peer.down.detach().clone()
    model(torch.randn(10, 16, device=DEVICE)).square().mean().backward()
    assert not torch.equal(peer.down, before)
    assert model[0].weight.grad is not None and peer.down.grad is None
    assert int(table_opt.states["1"][0].steps.sum()) > 0
    with pytest.raises(ValueError, match="at least one PEER layer"):
        attach_rowwise_adam(torch.nn.Linear(3, 3), lr=1e-3)


@pytest.mark.parametrize("elementwise", [False, True], ids=["rowwise", "elementwise"])
def test_bf16_working_tables_with_fp32_masters_match_the_spec(elementwise):
    """bf16 tables read by the kernels, fp32 masters updated by the rule (rowwise_adam_bf16,
    elementwise_adam_bf16); after each step the table is exactly the master rounded to bf16 and the
    master matches the spec and lazy Adam by hand."""
    from torchpeer.optim import RowwiseTableAdam

    layer = TinyPEERTables(20, 24, seed=9)  # d 24: BLOCK_D 32, the kernels' masked lanes
    engine = RowwiseTableAdam(
        {"l": layer}, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, bf16_tables=True, elementwise=elementwise
    )
    assert layer.down.dtype == torch.bfloat16 and engine.states["l"][0].master.dtype == torch.float32
    ref_tables = [s.master.double().clone() for s in engine.states["l"]]
    ref_states = [RowwiseAdamState.zeros_like(t, elementwise=elementwise) for t in ref_tables]
    by_hand = [LazyAdam64(t, elementwise) for t in ref_tables]
    gen = torch.Generator().manual_seed(10)
    for _ in range(2):
        x = torch.randn(9, 24, generator=gen).to(DEVICE).requires_grad_()
        idx = torch.randint(0, 10, (9, 2, 2), generator=gen).to(DEVICE)
        g = (torch.rand(9, 2, 2, generator=gen) + 0.1).to(DEVICE)
        dy = torch.randn(9, 24, generator=gen).to(DEVICE)
        bf16 = [layer.down.detach().double(), layer.up.detach().double()]  # what the forward reads
        layer(x, idx, g).backward(dy)
        leaves = [t.clone().requires_grad_() for t in bf16]
        expert_mix_reference(x.detach().double(), leaves[0], leaves[1], idx, g.double()).backward(dy.double())
        rows = idx.reshape(-1).unique()
        for table, leaf, st, hand in zip(ref_tables, leaves, ref_states, by_hand):
            rowwise_adam_update_(table, st, rows, leaf.grad[rows], 1e-2, (0.9, 0.99), 1e-8, 0.1)
            hand.step(leaf.grad, rows, 1e-2)
        for table, ref, st, hand in zip((layer.down, layer.up), ref_tables, engine.states["l"], by_hand):
            assert rel_err(st.master, ref) < 1e-5 and rel_err(st.master, hand.w) < 1e-5
            if DEVICE == "cuda":
                assert torch.equal(table, st.master.to(torch.bfloat16))
            else:  # the interpreter rounds fp32 -> bf16 by truncation: within one bf16 ulp
                assert ((table.float() - st.master).abs() <= st.master.abs() * 2.0**-7).all()
            assert (st.master[10:] == ref[10:].float()).all()  # never selected: unchanged
    sd = engine.state_dict()
    assert "master" in sd["layers"]["l"]["down"]
    engine.detach()
    assert layer.down.dtype == torch.float32 and layer.down.requires_grad


@pytest.mark.parametrize("elementwise", [False, True], ids=["rowwise", "elementwise"])
def test_opcheck_fused_backward_op(elementwise):
    """Schema (the declared mutation of tables and states), fake-tensor and AOT dispatch checks."""
    from torchpeer.ops.expert_mixing import triton_fused_op as fused

    gen = torch.Generator().manual_seed(11)
    x, dy = (torch.randn(5, 8, generator=gen).to(DEVICE) for _ in range(2))
    down, up = (torch.randn(12, 8, generator=gen).to(DEVICE) for _ in range(2))
    idx = torch.randint(0, 12, (5, 1, 3), generator=gen).to(DEVICE)
    g = torch.rand(5, 1, 3, generator=gen).to(DEVICE)
    _, h = mixing._peer_mix_fwd(x, down, up, idx, g, "gelu")
    states = []
    for t in (down, up):
        s = RowwiseAdamState.zeros_like(t, elementwise=elementwise)
        states += [torch.empty(0, device=DEVICE), s.exp_avg, s.exp_avg_sq, s.steps]
    tables = [down, up, *states]
    torch.library.opcheck(fused._peer_mix_bwd_rowwise_adam, (dy, x, tables, idx, g, h, hyper(1e-2), "gelu"))


def test_bf16_first_moments_match_the_spec():
    """bf16 exp_avg: the kernel computes in fp32 and rounds the moment each step, like the spec
    (the interpreter truncates instead of rounding to nearest: within bf16 tolerance here)."""
    from torchpeer.optim import RowwiseTableAdam

    layer = TinyPEERTables(16, 16, seed=12)
    engine = RowwiseTableAdam({"l": layer}, lr=1e-2, betas=(0.9, 0.99), bf16_moments=True)
    assert engine.states["l"][0].exp_avg.dtype == torch.bfloat16
    ref_tables = [layer.down.detach().double().clone(), layer.up.detach().double().clone()]
    ref_states = [RowwiseAdamState.zeros_like(t, moment_dtype=torch.bfloat16) for t in ref_tables]
    gen = torch.Generator().manual_seed(13)
    for _ in range(2):
        x = torch.randn(9, 16, generator=gen).to(DEVICE).requires_grad_()
        idx = torch.randint(0, 16, (9, 2, 2), generator=gen).to(DEVICE)
        g = (torch.rand(9, 2, 2, generator=gen) + 0.1).to(DEVICE)
        dy = torch.randn(9, 16, generator=gen).to(DEVICE)
        leaves = [layer.down.detach().double().requires_grad_(), layer.up.detach().double().requires_grad_()]
        layer(x, idx, g).backward(dy)
        expert_mix_reference(x.detach().double(), leaves[0], leaves[1], idx, g.double()).backward(dy.double())
        rows = idx.reshape(-1).unique()
        for table, leaf, st in zip(ref_tables, leaves, ref_states):
            rowwise_adam_update_(table, st, rows, leaf.grad[rows], 1e-2, (0.9, 0.99), 1e-8, 0.0)
        for table, ref, st, sr in zip((layer.down, layer.up), ref_tables, engine.states["l"], ref_states):
            assert rel_err(st.exp_avg, sr.exp_avg) < 1e-2
            assert rel_err(table, ref) < 1e-4


@pytest.mark.parametrize("elementwise", [False, True], ids=["rowwise", "elementwise"])
def test_plain_pytorch_rowwise_adamw_groups(elementwise):
    """RowwiseAdamW (CPU path): expert groups follow the spec on rows with a gradient, the other
    groups equal torch.optim.AdamW, and lr changes on the shared group dicts reach both."""
    from torchpeer.optim import RowwiseAdamW

    gen = torch.Generator().manual_seed(14)
    table = torch.nn.Parameter(torch.randn(8, 4, generator=gen))
    w = torch.nn.Parameter(torch.randn(3, 3, generator=gen))
    w_ref = torch.nn.Parameter(w.detach().clone())
    groups = [
        {"name": "experts", "params": [table], "lr": 1e-2, "weight_decay": 0.1},
        {"name": "decay", "params": [w], "lr": 1e-2, "weight_decay": 0.1},
    ]
    opt = RowwiseAdamW(groups, betas=(0.9, 0.99), elementwise=elementwise)
    ref_opt = torch.optim.AdamW([w_ref], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    spec_table = table.detach().double().clone()
    spec_state = RowwiseAdamState.zeros_like(table, elementwise=elementwise)
    for step in range(3):
        for group in opt.param_groups + ref_opt.param_groups:
            group["lr"] = 1e-2 / (step + 1)
        rows = torch.tensor([0, 2, 5]) if step != 1 else torch.tensor([2, 7])
        coef = torch.randn(rows.numel(), 4, generator=gen)
        x = torch.randn(3, generator=gen)
        ((table[rows] * coef).sum() + (w @ x).sum()).backward()
        (w_ref @ x).sum().backward()
        rowwise_adam_update_(
            spec_table, spec_state, rows, table.grad[rows].double(), 1e-2 / (step + 1), (0.9, 0.99), 1e-8, 0.1
        )
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        assert rel_err(table, spec_table) < 1e-6
        assert torch.allclose(w, w_ref, rtol=1e-6, atol=1e-7)
    assert opt.state[table]["rowwise"].steps.tolist() == [2, 0, 3, 0, 0, 2, 0, 1]
