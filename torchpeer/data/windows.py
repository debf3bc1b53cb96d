"""Window samplers over a 1-D token array: (x, y) int64 batches, y = x shifted by one.

``RandomWindows``: training batches at random offsets, reproducible and resumable.
``sequential_windows``: one ordered pass for evaluation; every token after the first is a
target exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

IGNORE_INDEX = -100  # target value of padded positions (F.cross_entropy's default ignore_index)
_MASK64 = (1 << 64) - 1


def _as_array(tokens):
    """np.ndarray / np.memmap / torch tensor / TokenFile -> 1-D array-like."""
    tokens = getattr(tokens, "tokens", tokens)  # a TokenFile
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
    return tokens


def _to_long(a) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.long()
    return torch.from_numpy(np.asarray(a).astype(np.int64))


def _mix(seed: int, step: int) -> int:
    """splitmix64(seed, step): well-spread 63-bit seeds for consecutive steps."""
    z = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class RandomWindows:
    """Endless iterator of random training windows.

    tokens: 1-D token ids (np.memmap, ndarray, tensor or TokenFile), len >= seq_len + 1.
    batch_size: the GLOBAL batch: with ``world_size`` processes each rank yields its slice of
    batch_size // world_size rows (batch_size must be divisible by world_size).
    Yields x, y: (batch_size // world_size, seq_len) int64 CPU tensors with y[:, i] = tokens[o + i + 1]
    for x[:, i] = tokens[o + i]; offsets o are uniform in [0, len - seq_len - 1].

    Batch ``step`` is drawn from a torch.Generator seeded with a hash of (seed, step), so the
    sampler's whole state is ``step``: ``load_state_dict(state_dict())`` resumes exactly.
    Every rank draws the same batch_size offsets and keeps rows [rank * b, (rank + 1) * b) with
    b = batch_size // world_size: the global batch, and the state, do not depend on the number of
    ranks (a checkpoint of 2 ranks resumes on 1 or 4).
    """

    def __init__(self, tokens, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        header = getattr(tokens, "header", None)  # a TokenFile: its split and source name the data
        self.tokens = _as_array(tokens)
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if len(self.tokens) < seq_len + 1:
            if isinstance(header, dict) and header.get("source"):
                split = header.get("split") or "train"
                raise ValueError(
                    f"the {split} split ({header['source']}) has {len(self.tokens)} tokens, fewer than one training "
                    f"window of model.seq_len {seq_len} + 1 = {seq_len + 1}; use a shorter model.seq_len or more "
                    "text in data.train"
                )
            raise ValueError(
                f"a window of seq_len {seq_len} needs at least {seq_len + 1} tokens, the split has "
                f"{len(self.tokens)}; use a shorter seq_len or a larger corpus"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank}, world_size {world_size}")
        if batch_size % world_size:
            raise ValueError(
                f"train.batch_size={batch_size} is not divisible by the {world_size} processes; use a multiple "
                f"of {world_size} (the batch is global: each process takes batch_size / {world_size} rows)"
            )
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, int(seed)
        self.rank, self.world_size = rank, world_size
        self.step = 0
        self._arange = np.arange(seq_len + 1)

    def offsets(self, step: int) -> torch.Tensor:
        """Start offsets of this rank's rows of batch ``step``: (batch_size // world_size,) int64."""
        g = torch.Generator()
        g.manual_seed(_mix(self.seed, step))
        high = len(self.tokens) - self.seq_len  # exclusive; the window's last target is o + seq_len
        all_offsets = torch.randint(0, high, (self.batch_size,), generator=g)
        rows = self.batch_size // self.world_size
        return all_offsets[self.rank * rows : (self.rank + 1) * rows]

    def __iter__(self) -> RandomWindows:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        offs = self.offsets(self.step)
        self.step += 1
        if isinstance(self.tokens, torch.Tensor):
            w = self.tokens[offs[:, None] + torch.from_numpy(self._arange)]
            return w[:, :-1].long().contiguous(), w[:, 1:].long().contiguous()
        w = self.tokens[offs.numpy()[:, None] + self._arange]  # (batch, seq_len + 1), token dtype
        # shift and widen in numpy: several times faster than torch's strided int64 copies
        x = np.ascontiguousarray(w[:, :-1], dtype=np.int64)
        y = np.ascontiguousarray(w[:, 1:], dtype=np.int64)
        return torch.from_numpy(x), torch.from_numpy(y)

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        for k in ("batch_size", "seq_len"):
            if state[k] != getattr(self, k):
                raise ValueError(
                    f"cannot resume RandomWindows: saved {k} = {state[k]}, this sampler has "
                    f"{getattr(self, k)}; resume with the same batch_size and seq_len"
                )
        self.seed, self.step = int(state["seed"]), int(state["step"])


def num_sequential_batches(n_tokens: int, batch_size: int, seq_len: int, pad: bool = False) -> int:
    """How many batches ``sequential_windows`` yields for a split of n_tokens tokens."""
    full, rem = divmod(n_tokens - 1, seq_len)
    if pad:
        return -(-(full + (1 if rem else 0)) // batch_size)
    return -(-full // batch_size) + (1 if rem else 0)


def sequential_windows(
    tokens, batch_size: int, seq_len: int, max_batches: int | None = None, pad: bool = False
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One ordered pass: non-overlapping windows so that tokens[1:] are each a target once.

    tokens: 1-D token ids (len >= 2). Row r covers x = tokens[r*T : r*T + T],
    y = tokens[r*T + 1 : r*T + T + 1] (T = seq_len); rows are grouped into batches of
    batch_size, the last one possibly smaller. The (len - 1) % T trailing targets that do not
    fill a row form a last, shorter "tail" row:
    * pad=False: the tail is its own batch of shape (1, remainder);
    * pad=True: every batch is (batch_size, seq_len): the tail row joins the last batch and
      missing positions are padded with x = 0, y = IGNORE_INDEX (-100); count targets
      with (y != IGNORE_INDEX).
    Each row's first tokens see little context (no overlap): the usual cheap evaluation.
    max_batches: stop after this many batches (None: the whole split).
    """
    tokens = _as_array(tokens)
    n = len(tokens)
    if n < 2:
        raise ValueError(f"sequential_windows needs at least 2 tokens, got {n}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    full, rem = divmod(n - 1, seq_len)
    n_rows = full + (1 if rem and pad else 0)  # without pad the tail row is handled after the loop
    for b, first in enumerate(range(0, n_rows, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        rows = min(batch_size, full - first)  # full rows in this batch
        chunk = _to_long(tokens[first * seq_len : (first + rows) * seq_len + 1])  # one contiguous read
        x, y = chunk[:-1].view(rows, seq_len), chunk[1:].view(rows, seq_len)
        if pad and rows < batch_size:
            px = torch.zeros(batch_size, seq_len, dtype=torch.long)
            py = torch.full((batch_size, seq_len), IGNORE_INDEX, dtype=torch.long)
            px[:rows], py[:rows] = x, y
            if rem and first + batch_size >= n_rows:  # the tail row is in this batch
                tail = _to_long(tokens[full * seq_len : n])  # rem + 1 tokens
                px[rows, :rem], py[rows, :rem] = tail[:-1], tail[1:]
            x, y = px, py
        yield x.contiguous(), y.contiguous()
    if rem and not pad and (max_batches is None or -(-full // batch_size) < max_batches):
        tail = _to_long(tokens[full * seq_len : n])
        yield tail[:-1].view(1, rem).contiguous(), tail[1:].view(1, rem).contiguous()
