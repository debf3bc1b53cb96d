"""The static KV cache (model.py) and its decoder (decode_graph.py): the fixed-shape step that a CUDA
graph records gives the default cache's logits (to the attention's summation order) and the same
greedy tokens through ``generate``, across the sliding-window refill; bad settings get one error."""

import pytest
import torch

from tests.lm.test_model import tiny
from torchpeer.lm.decode_graph import StaticDecoder
from torchpeer.lm.generate import generate
from torchpeer.lm.model import KVCache, TransformerLM


@pytest.mark.parametrize("ffw", ["dense", "peer"])
def test_static_cache_steps_give_the_default_caches_logits(ffw):
    torch.manual_seed(0)
    model = TransformerLM(tiny(ffw)).eval()
    prompt = torch.randint(0, 50, (3, 5))
    steps = torch.randint(0, 50, (3, 8))
    cache = KVCache(model.cfg, 3, 16)
    dec = StaticDecoder(model, 3, 16)
    with torch.no_grad():
        want, _ = model(prompt, cache=cache, last_only=True)
        got = dec.prefill(prompt)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for t in range(steps.shape[1]):
            want, _ = model(steps[:, t : t + 1], cache=cache, last_only=True)
            got = dec.step(steps[:, t : t + 1])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert dec.pos == cache.pos == 13 and int(dec.cache.pos_t) == 13
    # the slots written are the default cache's keys and values; the rest are untouched zeros
    torch.testing.assert_close(dec.cache.k[:, :, :, :13], cache.k[:, :, :, :13], rtol=1e-5, atol=1e-6)
    assert not dec.cache.k[:, :, :, 13:].any()


@pytest.mark.parametrize("ffw", ["dense", "peer"])
def test_generate_static_equals_eager_across_the_window_refill(ffw):
    torch.manual_seed(4)
    model = TransformerLM(tiny(ffw)).eval()
    prompt = torch.randint(0, 50, (2, 3))
    eager = generate(model, prompt, 30, temperature=0)  # seq_len 16: the cache refills twice
    static = generate(model, prompt, 30, temperature=0, decode="static")
    assert static.shape == (2, 33) and torch.equal(static, eager)
    long_prompt = torch.randint(0, 50, (1, 20))  # longer than seq_len: starts from its last 8 tokens
    assert torch.equal(
        generate(model, long_prompt, 5, temperature=0, decode="static"), generate(model, long_prompt, 5, temperature=0)
    )


def test_bad_decode_settings_are_one_clear_error():
    model = TransformerLM(tiny("dense")).eval()
    prompt = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        generate(model, prompt, 2, decode="graph")
    with pytest.raises(ValueError, match="decode must be"):
        generate(model, prompt, 2, decode="cuda")
    with pytest.raises(ValueError, match="leave use_cache on"):
        generate(model, prompt, 2, decode="static", use_cache=False)
    with pytest.raises(ValueError, match="CUDA device"):
        StaticDecoder(model, 1, 16, graph=True)
    dec = StaticDecoder(model, 1, 4)
    with torch.no_grad():
        dec.prefill(torch.zeros(1, 4, dtype=torch.long))
        with pytest.raises(ValueError, match="cache is full"):
            dec.step(prompt[:, :1])
        with pytest.raises(ValueError, match="does not fit"):
            dec.prefill(torch.zeros(1, 5, dtype=torch.long))


def test_a_failed_capture_falls_back_to_eager_steps_with_one_warning(monkeypatch):
    """If an op of the step cannot be captured, the decoder warns once and steps eagerly from the same
    cache position (the CUDA calls are stubbed: this machine has no GPU)."""
    torch.manual_seed(1)
    model = TransformerLM(tiny("peer")).eval()
    prompt, steps = torch.randint(0, 50, (2, 4)), torch.randint(0, 50, (2, 3))
    ref = StaticDecoder(model, 2, 16)
    dec = StaticDecoder(model, 2, 16)
    dec.graph_wanted = True  # as graph=True would on a CUDA device

    def no_stream():
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "Stream", no_stream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    with torch.no_grad():
        torch.testing.assert_close(dec.prefill(prompt), ref.prefill(prompt))
        with pytest.warns(UserWarning, match="CUDA graph capture failed, decoding eagerly"):
            torch.testing.assert_close(dec.step(steps[:, :1]), ref.step(steps[:, :1]))
        for t in (1, 2):  # no second attempt, no second warning
            torch.testing.assert_close(dec.step(steps[:, t : t + 1]), ref.step(steps[:, t : t + 1]))
    assert dec.graph is None and "not permitted" in dec.graph_failed and int(dec.cache.pos_t) == 7
