"""The chunked LM head + cross-entropy (torchpeer/lm/chunked_loss.py) against the plain path."""

import copy

import pytest
import torch
import torch.nn.functional as F

from torchpeer.lm.chunked_loss import IGNORE_INDEX, chunked_linear_cross_entropy


def _plain(h, w, t):  # TransformerLM's head and loss
    logits = F.linear(h, w)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), t)


def _grads(fn, h, w, t):
    h = h.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    loss = fn(h, w, t)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 1000])
def test_matches_the_plain_loss_and_gradients_in_float64(chunk):
    """Loss and both gradients equal the plain head's in float64, whatever the chunk (dividing the
    tokens or not, larger than them), with ignored targets among the rows."""
    g = torch.Generator().manual_seed(chunk)
    T, d, V = 64, 12, 50
    h = torch.randn(T, d, generator=g, dtype=torch.float64)
    w = torch.randn(V, d, generator=g, dtype=torch.float64) * 0.5
    t = torch.randint(0, V, (T,), generator=g)
    t[::5] = IGNORE_INDEX
    ref = _grads(_plain, h, w, t)
    got = _grads(lambda a, b, c: chunked_linear_cross_entropy(a, b, c, chunk), h, w, t)
    for r, o in zip(ref, got):
        torch.testing.assert_close(o.double(), r.double(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 9, 1000])
def test_a_bias_matches_the_plain_head_with_a_bias_in_float64(chunk):
    """With a logit bias (model.logit_prior): loss and the gradients of h, weight and bias equal
    F.linear(h, w, b)'s in float64, ignored rows included (they add nothing to the bias's gradient)."""
    g = torch.Generator().manual_seed(10 + chunk)
    T, d, V = 40, 8, 30
    h = torch.randn(T, d, generator=g, dtype=torch.float64)
    w = torch.randn(V, d, generator=g, dtype=torch.float64) * 0.5
    b0 = torch.randn(V, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, V, (T,), generator=g)
    t[::4] = IGNORE_INDEX

    def run(fn):
        hh, ww, bb = (x.clone().requires_grad_(True) for x in (h, w, b0))
        loss = fn(hh, ww, bb)
        (2.5 * loss).backward()
        return loss.detach(), hh.grad, ww.grad, bb.grad

    ref = run(lambda hh, ww, bb: F.cross_entropy(F.linear(hh, ww, bb), t))
    got = run(lambda hh, ww, bb: chunked_linear_cross_entropy(hh, ww, t, chunk, bb))
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="bias must be \\(vocab,\\)"):
        chunked_linear_cross_entropy(h, w, t, chunk, b0[:-1])


def test_scales_by_the_incoming_gradient_and_accumulates_into_a_tied_weight():
    """d(3 * loss) is three times the gradient, and a weight used by the loss and elsewhere (tied
    embeddings) receives the sum of both paths, as with the plain head."""
    g = torch.Generator().manual_seed(1)
    T, d, V = 20, 6, 11
    w0 = torch.randn(V, d, generator=g, dtype=torch.float64)
    idx = torch.randint(0, V, (T,), generator=g)
    t = torch.randint(0, V, (T,), generator=g)

    def run(loss_fn):
        w = w0.clone().requires_grad_(True)
        h = torch.tanh(w[idx])  # the embedding lookup feeds the head's input
        (3 * loss_fn(h, w, t)).backward()
        return w.grad

    torch.testing.assert_close(run(lambda h, w, t: chunked_linear_cross_entropy(h, w, t, 8)), run(_plain))


def test_bf16_autocast_is_close_to_the_plain_autocast_path():
    """Under bf16 autocast (CPU), the products run in bf16 as the plain head's do: loss within bf16
    rounding, gradients within a few bf16 ulps of the plain path's, both far from an fp32 run's error
    scale if the dtype handling were wrong (e.g. gradients not reaching the fp32 weight)."""
    g = torch.Generator().manual_seed(2)
    T, d, V = 96, 32, 200
    h = torch.randn(T, d, generator=g)
    w = torch.randn(V, d, generator=g) * 0.2
    t = torch.randint(0, V, (T,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _grads(_plain, h, w, t)
        got = _grads(lambda a, b, c: chunked_linear_cross_entropy(a, b, c, 32), h, w, t)
    assert got[1].dtype == h.dtype and got[2].dtype == w.dtype  # fp32 leaves get fp32 gradients
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for r, o in zip(ref[1:], got[1:]):
        torch.testing.assert_close(o, r, rtol=2e-2, atol=2e-2 * r.abs().max().item())


def test_a_bias_under_bf16_autocast_is_close_to_the_plain_path():
    """A log-frequency-sized fp32 bias under bf16 autocast: cast like the plain head's (the loss within
    bf16 rounding of its), and its gradient comes back fp32 and close to the plain path's."""
    g = torch.Generator().manual_seed(5)
    T, d, V = 96, 32, 200
    h, w = torch.randn(T, d, generator=g), torch.randn(V, d, generator=g) * 0.2
    b0 = torch.log_softmax(torch.randn(V, generator=g) * 2, 0)
    t = torch.randint(0, V, (T,), generator=g)

    def run(fn):
        hh, ww, bb = (x.clone().requires_grad_(True) for x in (h, w, b0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(hh, ww, bb)
        loss.backward()
        return loss.detach(), bb.grad

    def plain(hh, ww, bb):
        return F.cross_entropy(F.linear(hh, ww, bb).float(), t)

    ref, got = run(plain), run(lambda hh, ww, bb: chunked_linear_cross_entropy(hh, ww, t, 32, bb))
    assert got[1].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], ref[1], rtol=2e-2, atol=2e-2 * ref[1].abs().max().item())


def test_a_scaled_loss_scales_bf16_gradients_without_a_bias():
    """(loss / 3).backward() under bf16 autocast (the trainer divides by grad_accum): the gradients
    are a third of loss.backward()'s up to one rounding each, not biased by a bf16 copy of 1/3
    (0.333984, +0.2 % on every element)."""
    g = torch.Generator().manual_seed(4)
    T, d, V = 64, 32, 100
    h, w = torch.randn(T, d, generator=g), torch.randn(V, d, generator=g) * 0.2
    t = torch.randint(0, V, (T,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        one = _grads(lambda a, b, c: chunked_linear_cross_entropy(a, b, c, 16), h, w, t)
        third = _grads(lambda a, b, c: chunked_linear_cross_entropy(a, b, c, 16) / 3, h, w, t)
    for full, part in zip(one[1:], third[1:]):
        ratio = (part * 3).abs().sum() / full.abs().sum()
        assert abs(ratio.item() - 1) < 5e-4, ratio.item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_autocast_matches_the_plain_head():
    """On the GPU under bf16 autocast (how the campaign trains): loss and gradients as the plain
    head's, at a campaign-like vocabulary (16k) with chunks that do not divide the tokens."""
    g = torch.Generator(device="cuda").manual_seed(3)
    T, d, V = 3000, 256, 16384
    h = torch.randn(T, d, generator=g, device="cuda")
    w = torch.randn(V, d, generator=g, device="cuda") * 0.05
    t = torch.randint(0, V, (T,), generator=g, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = _grads(_plain, h, w, t)
        got = _grads(lambda a, b, c: chunked_linear_cross_entropy(a, b, c, 1024), h, w, t)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for r, o in zip(ref[1:], got[1:]):
        torch.testing.assert_close(o, r, rtol=2e-2, atol=2e-2 * r.abs().max().item())


def test_bad_arguments_say_what_to_fix():
    h, w, t = torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="chunk must be a positive"):
        chunked_linear_cross_entropy(h, w, t, 0)
    with pytest.raises(ValueError, match="weight \\(vocab, d\\)"):
        chunked_linear_cross_entropy(h, torch.zeros(5, 4), t, 2)
    with pytest.raises(ValueError, match="targets must be"):
        chunked_linear_cross_entropy(h, w, t[:3], 2)


def test_the_model_trains_the_same_with_a_chunked_loss():
    """TransformerLM (tied embeddings, a PEER block) in float64: the chunked loss gives the plain
    loss and every parameter's gradient; logits are not returned; without gradients (evaluation)
    the plain path runs."""
    from torchpeer.layers import PEERConfig
    from torchpeer.lm import ModelConfig, TransformerLM

    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=32,
        n_layers=2,
        n_heads=2,
        seq_len=16,
        vocab_size=40,
        peer=PEERConfig(n_experts=64, heads=2, top_k=4, d_key=16, backend="torch"),
    )
    model = TransformerLM(cfg).double()
    x = torch.randint(0, 40, (3, 16))
    y = torch.randint(0, 40, (3, 16))

    def grads(chunk):  # on a copy: a training forward moves the query norm's running statistics
        m = copy.deepcopy(model)
        logits, loss = m(x, y, loss_chunk_tokens=chunk)
        loss.backward()
        return logits, loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    _, l0, g0 = grads(0)
    logits, l1, g1 = grads(10)
    assert logits is None
    torch.testing.assert_close(l1, l0, rtol=1e-10, atol=1e-12)
    assert g1.keys() == g0.keys() and len(g0) > 5
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-9, atol=1e-11, msg=n)
    with torch.no_grad():
        logits, loss = copy.deepcopy(model)(x, y, loss_chunk_tokens=10)
    assert logits is not None and loss.item() == pytest.approx(l0.item(), rel=1e-10)


def test_config_and_memory_estimate():
    """train.loss_chunk_tokens < 0 is refused with the fix; > 0 lowers the estimated logits memory
    to one chunk's (the part that kept a third 1M-expert run off an 80 GB GPU)."""
    from torchpeer.lm import load_config
    from torchpeer.lm.memory import estimate_step_memory

    with pytest.raises(ValueError, match="loss_chunk_tokens must be 0"):
        load_config("gpu-peer-small", [("train.loss_chunk_tokens", "-1")])
    plain = estimate_step_memory(load_config("gpu-peer-small", [("train.eval_batch_size", "1")]), device="cuda")
    chunked = estimate_step_memory(
        load_config("gpu-peer-small", [("train.eval_batch_size", "1"), ("train.loss_chunk_tokens", "4096")]),
        device="cuda",
    )
    assert chunked.logits < plain.logits / 4
    assert chunked.total < plain.total


def test_training_with_a_chunked_loss_follows_the_plain_run(tmp_path):
    """The real trainer, 12 steps on the CPU (float32): every logged training loss and the final
    evaluation agree with the plain run's to float rounding (the chunks change only the order of
    the head's sums), so the setting can join a study without changing what it measures."""
    from tests.lm.helpers import evals, losses, write_config, write_corpus
    from torchpeer.lm.config_io import load_config
    from torchpeer.lm.train import train

    write_corpus(tmp_path)
    cfg = write_config(tmp_path, max_steps=12, extra="checkpoint = false")
    flags = ["--model.seq_len", "16", "--train.log_interval", "1"]
    train(load_config(cfg, flags), str(tmp_path / "plain"), progress=False)
    train(load_config(cfg, flags + ["--train.loss_chunk_tokens", "24"]), str(tmp_path / "chunked"), progress=False)
    plain, chunked = losses(tmp_path / "plain"), losses(tmp_path / "chunked")
    assert len(plain) == len(chunked) >= 12
    for (step_a, a), (step_b, b) in zip(plain, chunked):
        assert step_a == step_b and b == pytest.approx(a, rel=1e-4)
    assert evals(tmp_path / "chunked")[-1][1] == pytest.approx(evals(tmp_path / "plain")[-1][1], rel=1e-4)
