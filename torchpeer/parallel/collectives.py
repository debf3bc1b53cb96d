"""Token and column exchanges of the column-sharded expert layers, as autograd-aware pieces.

Layout. Rank r holds the tokens of its slice of the global batch, x_r: (T_r, d), and the
columns ``cols_r`` (a contiguous d/W slice) of every expert table. Three exchanges move data
between "my tokens, all columns" and "all tokens, my columns":

* ``gather_tokens``: (T_r, d) on every rank -> the gathered (T, d), T = sum_r T_r, in rank order
  (all-gather). Backward: the gradient reaching the gathered tensor through the *replicated*
  computation (query network, norm, retrieval) is the same on every rank and already in global
  units, so each rank keeps its own tokens' rows and scales them back to local units (x W):
  no communication.
* ``columns_to_tokens``: (T, d_r) "all tokens, my columns" -> (T_r, d) "my tokens, all columns"
  (all-to-all; each rank sends T_s x d_r to rank s).
* ``tokens_to_columns``: the inverse (all-to-all), used by the backward passes.

Units. Each rank's loss L_r is the mean over its own tokens, and DDP averages gradients, so the
global loss is L = mean_r L_r and a gradient arriving at rank r's activations is W * dL/d(act).
The sharded layers keep these "local units" on per-token tensors and convert to global units
exactly where a quantity is summed over all ranks' tokens (table gradients, replicated
parameters); see sharded_layers.py.

Token counts. Training batches are split evenly (``ShardContext.counts`` None: one all-gather,
no host synchronisation); evaluation may split a batch unevenly and sets ``counts`` per batch.

torch.compile. The gather is a torch.library custom op (so are the Triton mixing ops of
triton_mixing.py), opaque to the compiler; a custom op takes no Python objects, so it names its
ShardContext by ``ShardContext.key``, an int resolved by ``shard_context``.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class ShardContext:
    """What the sharded layers of one model share: the process group and the token layout.

    group: the process group of the expert exchanges (its own group, so that these collectives
        never interleave with DDP's gradient buckets); rank, world: this rank's place in it.
    counts: tokens per rank for the current batch, or None when every rank has the same number.
    """

    group: object
    rank: int
    world: int
    counts: list[int] | None = field(default=None)
    key: int = field(default=-1, init=False, compare=False, repr=False)

    def __post_init__(self):
        self.key = next(_KEYS)
        _CONTEXTS[self.key] = self

    def token_counts(self, local: int) -> list[int]:
        return [local] * self.world if self.counts is None else list(self.counts)

    def columns(self, width: int) -> slice:
        """This rank's contiguous column slice of a width-``width`` table (width % world == 0)."""
        part = width // self.world
        return slice(self.rank * part, (self.rank + 1) * part)

    def release(self) -> None:
        """Forget the process group (end of run): out of the registry below and ``group`` None, so
        that this context no longer keeps the group, and gloo's threads, alive."""
        _CONTEXTS.pop(self.key, None)
        self.group = None


_KEYS = itertools.count()
_CONTEXTS: dict[int, ShardContext] = {}  # every live ShardContext (a handful per process; release() removes one)


def shard_context(key: int) -> ShardContext:
    """The ShardContext whose ``key`` is ``key`` (how custom ops name theirs)."""
    return _CONTEXTS[key]


def _all_gather_rows(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    fn = getattr(dist, "all_gather_single", None)
    with warnings.catch_warnings():  # all_gather_into_tensor is deprecated in newer torch, absent name in older
        warnings.simplefilter("ignore", FutureWarning)
        (fn or dist.all_gather_into_tensor)(out, inp, group=group)


def all_gather_tokens(x: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
    """(T_r, d) -> (T, d) rows of all ranks in rank order (no autograd)."""
    counts = ctx.token_counts(x.shape[0])
    if x.shape[0] != counts[ctx.rank]:
        raise ValueError(f"rank {ctx.rank} has {x.shape[0]} tokens but the batch layout says {counts[ctx.rank]}")
    if ctx.world == 1:
        return x
    width = max(counts)
    x = x.contiguous()
    if x.shape[0] != width:  # gloo's all-gather needs equal sizes: pad, gather, drop the padding
        x = torch.cat([x, x.new_zeros(width - x.shape[0], *x.shape[1:])])
    out = x.new_empty(width * ctx.world, *x.shape[1:])
    _all_gather_rows(out, x, ctx.group)
    if all(c == width for c in counts):
        return out
    return torch.cat([out[s * width : s * width + c] for s, c in enumerate(counts)])


def columns_to_tokens(y: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
    """(T, d_r) all tokens, my columns -> (T_r, d_r * W) my tokens, all columns (rank order)."""
    if ctx.world == 1:
        return y
    counts = _counts_for_total(ctx, y.shape[0])
    mine, d_r = counts[ctx.rank], y.shape[1]
    out = y.new_empty(mine * ctx.world, d_r)
    dist.all_to_all_single(
        out, y.contiguous(), output_split_sizes=[mine] * ctx.world, input_split_sizes=counts, group=ctx.group
    )
    return out.view(ctx.world, mine, d_r).permute(1, 0, 2).reshape(mine, ctx.world * d_r)


def tokens_to_columns(dy: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
    """(T_r, d) my tokens, all columns -> (T, d / W) all tokens, my columns."""
    if ctx.world == 1:
        return dy
    counts = ctx.token_counts(dy.shape[0])
    mine, d_r = dy.shape[0], dy.shape[1] // ctx.world
    send = dy.reshape(mine, ctx.world, d_r).permute(1, 0, 2).contiguous().view(ctx.world * mine, d_r)
    out = dy.new_empty(sum(counts), d_r)
    dist.all_to_all_single(out, send, output_split_sizes=counts, input_split_sizes=[mine] * ctx.world, group=ctx.group)
    return out


def _counts_for_total(ctx: ShardContext, total: int) -> list[int]:
    if ctx.counts is not None:
        return list(ctx.counts)
    if total % ctx.world:
        raise ValueError(f"{total} gathered tokens do not split evenly over {ctx.world} ranks; set ShardContext.counts")
    return [total // ctx.world] * ctx.world


def all_reduce_sum_(t: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
    if ctx.world > 1:
        dist.all_reduce(t, group=ctx.group)
    return t


@torch.library.custom_op("torchpeer::shard_gather_tokens", mutates_args=())
def _gather_tokens_op(x: torch.Tensor, key: int) -> torch.Tensor:
    out = all_gather_tokens(x, shard_context(key))
    return out.clone() if out is x else out  # (one rank: a custom op must not return its input)


@_gather_tokens_op.register_fake
def _(x, key):
    return x.new_empty(sum(shard_context(key).token_counts(x.shape[0])), *x.shape[1:])


def _gather_setup(ctx, inputs, output):
    ctx.key, ctx.local = inputs[1], inputs[0].shape[0]


def _gather_backward(fctx, grad):
    # The gathered tensor feeds only the replicated computation, whose gradient is identical
    # on every rank and in global units (see module docstring): keep my rows, back to local units.
    ctx = shard_context(fctx.key)
    start = sum(ctx.token_counts(fctx.local)[: ctx.rank])
    return grad[start : start + fctx.local] * ctx.world, None


_gather_tokens_op.register_autograd(_gather_backward, setup_context=_gather_setup)


def gather_tokens(x: torch.Tensor, ctx: ShardContext) -> torch.Tensor:
    """Differentiable all-gather of tokens (T_r, d) -> (T, d) for the replicated computation.
    With one rank it is x itself (nothing to gather; the gradient's scale W is 1)."""
    if ctx.world == 1:
        all_gather_tokens(x, ctx)  # (checks the token count)
        return x
    return _gather_tokens_op(x, ctx.key)
