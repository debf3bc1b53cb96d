"""model.logit_prior = "unigram" (torchpeer/lm/logit_prior.py): the counts against a float64 reference,
the head's bias in the model and the chunked loss, a run that starts from the counts, trains the bias
and resumes with its own, and the config's error."""

import math

import numpy as np
import pytest
import torch

from tests.lm.helpers import losses, write_config, write_corpus
from torchpeer.lm import Callback, ModelConfig, TransformerLM
from torchpeer.lm import logit_prior as lp
from torchpeer.lm.checkpoint import load_model_from_checkpoint
from torchpeer.lm.config_io import load_config
from torchpeer.lm.train import train


def _reference(tokens, vocab, smoothing=0.5):
    counts = np.array([np.sum(tokens == i) for i in range(vocab)], dtype=np.float64) + smoothing
    return np.log(counts / counts.sum())


@pytest.mark.parametrize("chunk", [7, 1 << 24])
def test_log_frequencies_match_a_float64_count(monkeypatch, chunk):
    """Counted a chunk at a time or at once: log((count + 0.5) / total) of every id, ids the tokens
    never use included (finite), in float32 rounded from float64."""
    monkeypatch.setattr(lp, "_CHUNK", chunk)
    rng = np.random.default_rng(0)
    vocab = 50
    tokens = rng.choice(40, size=1000, p=rng.dirichlet(np.ones(40))).astype(np.uint16)  # ids 40..49 unseen
    got = lp.unigram_log_frequencies(tokens, vocab)
    assert got.dtype == torch.float32 and got.shape == (vocab,)
    ref = _reference(tokens.astype(np.int64), vocab)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(got).all() and abs(float(got.double().exp().sum()) - 1) < 1e-5


def test_bad_tokens_and_sizes_say_what_is_wrong():
    with pytest.raises(ValueError, match="token id 9 is outside the vocabulary 0..7"):
        lp.unigram_log_frequencies(np.array([1, 9, 2]), 8)
    with pytest.raises(ValueError, match="token id -1"):
        lp.unigram_log_frequencies(np.array([1, -1]), 8)
    with pytest.raises(ValueError, match="1-D array of integer ids"):
        lp.unigram_log_frequencies(np.array([0.5, 1.0]), 8)
    with pytest.raises(ValueError, match="vocab_size must be a positive integer"):
        lp.unigram_log_frequencies(np.array([0]), 0)
    with pytest.raises(ValueError, match="logit_prior = 'unigram'"):
        lp.init_logit_prior(TransformerLM(_cfg()), np.array([0, 1]))
    with pytest.raises(ValueError, match="model.logit_prior='bigram' is not valid; use one of none, unigram"):
        _cfg(logit_prior="bigram").validate()


def _cfg(**kw):
    opts = dict(d_model=16, n_layers=2, n_heads=2, seq_len=8, vocab_size=24, ffw="dense")
    return ModelConfig(**{**opts, **kw})


@pytest.mark.parametrize("tie", [True, False])
def test_the_bias_adds_to_every_logit_and_the_chunked_loss_sees_it(tie):
    """float64: the prior model's logits are the plain model's (same weights) plus the bias on every
    position; the chunked loss gives the plain loss and the same gradients, the bias's included."""
    torch.manual_seed(0)
    plain, prior = (
        TransformerLM(_cfg(tie_embeddings=tie)).double(),
        TransformerLM(_cfg(logit_prior="unigram", tie_embeddings=tie)).double(),
    )
    assert prior.lm_head.bias is not None and not prior.lm_head.bias.any()  # zero until a run sets it
    missing = prior.load_state_dict(plain.state_dict(), strict=False)
    assert missing.missing_keys == ["lm_head.bias"] and not missing.unexpected_keys
    lp.init_logit_prior(prior, np.random.default_rng(1).integers(0, 20, 500))
    bias = prior.lm_head.bias.detach()
    assert bias[20:].eq(bias[20:][0]).all() and bias[:20].gt(bias[20]).all()  # ids 20..23 unseen: smallest
    idx = torch.randint(0, 24, (3, 8))
    torch.testing.assert_close(prior(idx)[0], plain(idx)[0] + bias, rtol=0, atol=1e-12)

    def grads(chunk):
        prior.zero_grad()
        _, loss = prior(idx[:, :-1], idx[:, 1:], loss_chunk_tokens=chunk)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in prior.parameters()]

    (l0, g0), (l1, g1) = grads(0), grads(5)
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert prior.lm_head.bias.grad.abs().sum() > 0


class _Grab(Callback):
    def __init__(self):
        self.bias = self.tokens = None

    def on_train_start(self, trainer):
        self.bias = trainer.model.lm_head.bias.detach().clone()
        self.tokens = np.array(trainer._train_file.tokens)


def test_a_run_starts_at_the_unigram_loss_trains_the_bias_and_resumes_with_its_own(tmp_path):
    """A new run's bias is the train split's log frequencies (float64 count), so its first loss is
    the unigram cross-entropy (~2.9 nats on this corpus) rather than log(vocab) (5.5); training moves
    the bias; a resumed run starts from its checkpoint's bias, not from the counts again."""
    write_corpus(tmp_path)
    path = write_config(tmp_path, max_steps=10)
    run = str(tmp_path / "run")
    grab = _Grab()
    train(load_config(path, ["--model.logit_prior", "unigram"]), run, progress=False, callbacks=[grab])
    vocab = grab.bias.numel()
    ref = _reference(grab.tokens.astype(np.int64), vocab)
    np.testing.assert_allclose(grab.bias.numpy(), ref, rtol=1e-6, atol=1e-6)
    p = np.exp(ref)
    entropy = float(-(p * ref).sum())
    first = losses(run)[0][1]
    assert abs(first - entropy) < 0.25 and first < math.log(vocab) - 2, (first, entropy)

    trained = load_model_from_checkpoint(run)[0].lm_head.bias.detach()
    assert (trained - grab.bias).abs().max() > 1e-3  # the bias learns (no_decay group, train.lr)

    again = _Grab()
    train(
        load_config(path, ["--model.logit_prior", "unigram", "--train.max_steps", "12"]),
        run,
        resume=True,
        progress=False,
        callbacks=[again],
    )
    torch.testing.assert_close(again.bias, trained, rtol=0, atol=0)
