"""One-token decode steps with fixed shapes, replayed from a CUDA graph.

A decode step of a small model at batch 1 is a few hundred kernel launches of a few microseconds
of GPU work each, so eager decoding is bound by the host (Python, dispatch, launches), and PEER's
layer adds its own launches to that. A CUDA graph records the step's kernels once and replays them
with one launch. That needs a step whose shapes, addresses and control flow never change: the
static KV cache (``KVCache(static=True)``, model.py) keeps its position on the device and always
attends over all its slots with a mask, the input token sits in a fixed buffer, and the logits
come out in a fixed buffer.

    dec = StaticDecoder(model, batch=1, max_len=model.cfg.seq_len, graph=True)
    logits = dec.prefill(prompt)       # (B, 1, V), eager, any prompt length <= max_len
    logits = dec.step(next_tokens)     # (B, 1, V), one position; replays the graph after the 1st
    dec.pos                            # cached positions (host count)

``graph=False`` runs the same static step eagerly (any device): the CPU tests check it against the
default cache, so the graph replays the step they test. Sampling stays outside the graph.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from torchpeer.lm.model import KVCache, TransformerLM


class StaticDecoder:
    """Prefill and one-token steps of ``model`` on a static KV cache of ``max_len`` positions."""

    def __init__(self, model: TransformerLM, batch: int, max_len: int, graph: bool = False):
        device = model.tok_emb.weight.device
        if graph and device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the model on a CUDA device (it is on {device}); use graph=False")
        self.model, self.graph_wanted = model, graph
        self.cache = KVCache(model.cfg, batch, max_len, device, model.tok_emb.weight.dtype, static=True)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.logits: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_failed: str | None = None  # why capture failed (then steps run eagerly)
        self.pos = 0

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """Restart the cache with ``idx`` (B, T), T <= max_len; -> logits of its last position (B, 1, V)."""
        if idx.shape[1] > self.cache.max_len:
            raise ValueError(f"a prompt of {idx.shape[1]} tokens does not fit the cache of {self.cache.max_len}")
        self.cache.pos_t.zero_()
        self.cache.pos = 0
        logits, _ = self.model(idx, cache=self.cache, last_only=True)
        self.pos = idx.shape[1]
        return logits

    def step(self, nxt: torch.Tensor) -> torch.Tensor:
        """Append one token per row, ``nxt`` (B, 1); -> logits (B, 1, V). Returns the graph's own
        output buffer when replaying: read (or copy) it before the next step."""
        if self.pos >= self.cache.max_len:
            raise ValueError(f"the cache is full ({self.cache.max_len} positions): prefill again")
        self.tokens.copy_(nxt)
        self.pos += 1
        if self.graph is None and self.graph_wanted and self.graph_failed is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._run()

    def _run(self) -> torch.Tensor:
        """One step on the token buffer (what the graph records)."""
        logits, _ = self.model(self.tokens, cache=self.cache, last_only=True)
        return logits

    def _capture(self) -> None:
        """Warm up on a side stream (lazy initialisations, Triton compiles), then record one step.
        The warm-up steps write the current token's keys and values at the current position and
        advance pos_t; pos_t is put back, so the recorded step writes the same slot again."""
        start = self.cache.pos_t.clone()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            # autocast's weight cache would keep casts made during capture outside the graph's pool
            no_cache = (
                torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
                if torch.is_autocast_enabled("cuda")
                else contextlib.nullcontext()
            )
            with torch.cuda.stream(side), no_cache:
                for _ in range(2):
                    self._run()
                    self.cache.pos_t.copy_(start)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), no_cache:
                self.logits = self._run()
            self.cache.pos_t.copy_(start)  # capture records the in-place advance without running it
            self.graph = graph
        except Exception as e:  # an op that cannot be captured: decode eagerly, say so once
            torch.cuda.synchronize()
            self.cache.pos_t.copy_(start)
            self.graph_failed = f"{type(e).__name__}: {e}"
            warnings.warn(f"CUDA graph capture failed, decoding eagerly: {self.graph_failed[:300]}", stacklevel=3)
