"""Sampling from a TransformerLM, with or without a KV cache.

With the cache the prompt is run once (prefill) and each new token costs one position. The
context is limited to ``seq_len`` (the trained length): when the cache is full it is rebuilt from
the last ``seq_len // 2`` tokens (a sliding window, amortised). Without the cache every step
recomputes the whole (cropped) prefix; both give the same tokens while the sequence fits in
``seq_len``.

Note: an expert-choice MoE routes over all tokens of a call, so its output for a position
depends on the call's other tokens; with such a model cached and uncached decoding differ.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from torchpeer.lm.model import KVCache, TransformerLM


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits: (B, V) -> next token ids (B, 1). temperature 0 = greedy (argmax)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer (None = sample from all tokens), got {top_k!r}")
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        if top_p <= 0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked before it already reach top_p (keeps at least one).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


def context_note(n_prompt: int, max_new_tokens: int, seq_len: int, use_cache: bool = True) -> str | None:
    """One line saying that generation will run past the model's context (None if it fits): beyond
    ``seq_len`` each token sees a sliding window of recent tokens only (see the module docstring)."""
    if n_prompt + max_new_tokens <= seq_len:
        return None
    window = f"the last {max(1, seq_len // 2)}-{seq_len} tokens" if use_cache else f"the last {seq_len} tokens"
    return (
        f"note: the prompt ({n_prompt} token{'s' * (n_prompt != 1)}) and up to {max_new_tokens} new "
        f"{'ones' if max_new_tokens != 1 else 'one'} exceed the model's context "
        f"(seq_len {seq_len}, the longest it was trained on); beyond it each new token sees only {window} "
        "(a sliding window)"
    )


@torch.no_grad()
def generate(
    model: TransformerLM,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    stop_token: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    decode: str = "eager",
) -> torch.Tensor:
    """Extend idx (B, T0) by up to ``max_new_tokens`` tokens -> (B, T0 + n).

    Stops early once every row has produced ``stop_token`` (if given). ``on_token(next_ids)`` is
    called with each new (B, 1) column as soon as it is sampled (streaming output).
    decode (with the cache): "eager" (default), "graph" (each one-token step replayed from a CUDA
    graph on a static cache: far fewer launches, CUDA only; decode_graph.py) or "static" (the
    graph's static-cache step run eagerly, on any device).
    """
    if not isinstance(idx, torch.Tensor):  # e.g. tok.encode(...)'s list
        raise TypeError(
            f"idx must be a (batch, time) tensor of token ids, got a {type(idx).__name__}: torch.tensor([ids])"
        )
    if idx.dim() != 2 or idx.shape[0] < 1 or idx.shape[1] < 1:
        raise ValueError(f"idx must be (batch, time>=1) token ids, got shape {tuple(idx.shape)}")
    if idx.dtype not in (torch.long, torch.int):
        raise TypeError(f"idx must hold integer token ids (torch.long), got {idx.dtype}")
    vocab = model.cfg.vocab_size  # always set on a built TransformerLM
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= vocab:  # else the embedding's "index out of range in self"
        raise ValueError(f"idx holds token ids {lo}..{hi}, outside the model's vocabulary 0..{vocab - 1}")
    if decode not in ("eager", "static", "graph"):
        raise ValueError(f"decode must be 'eager', 'static' or 'graph', got {decode!r}")
    if decode != "eager" and not use_cache:
        raise ValueError(f"decode={decode!r} decodes on a KV cache: leave use_cache on, or use decode='eager'")
    if decode == "graph" and idx.device.type != "cuda":
        raise ValueError(f"decode='graph' needs the model on a CUDA device (it is on {idx.device}); use 'eager'")
    was_training = model.training
    model.eval()
    window = model.cfg.seq_len
    cache = None
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    static = None
    if decode != "eager":
        from torchpeer.lm.decode_graph import StaticDecoder

        static = StaticDecoder(model, idx.shape[0], window, graph=decode == "graph")
    try:
        for _ in range(max_new_tokens):
            pos = static.pos if static is not None else (cache.pos if cache is not None else 0)  # cached tokens
            if not use_cache:
                logits, _ = model(idx[:, -window:], last_only=True)
            elif pos == 0 or pos >= window:
                # (Re)fill: the whole prompt if it fits, else the last seq_len // 2 tokens.
                n_keep = idx.shape[1] if pos == 0 and idx.shape[1] < window else max(1, window // 2)
                if static is not None:
                    logits = static.prefill(idx[:, -n_keep:])
                else:
                    cache = KVCache(model.cfg, idx.shape[0], window, idx.device, model.tok_emb.weight.dtype)
                    logits, _ = model(idx[:, -n_keep:], cache=cache, last_only=True)
            elif static is not None:
                logits = static.step(idx[:, -1:])
            else:
                logits, _ = model(idx[:, -1:], cache=cache, last_only=True)
            nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
            idx = torch.cat([idx, nxt], dim=1)
            if on_token is not None:
                on_token(nxt)
            if stop_token is not None:
                done |= nxt[:, 0] == stop_token
                if bool(done.all()):
                    break
    finally:
        model.train(was_training)
    return idx
