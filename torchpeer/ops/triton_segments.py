"""Segments of sorted lists: the plan that makes a gradient pass over sorted selections skew-robust.

A backward that sums over the selections of each row of a table (the mixing backward per expert,
the retrieval's sub-key gradient per sub-key) sorts them by row and gives each row's list to a
program. A hot row (a collapsed router) would serialise on its one program, so every list is cut
into segments of at most SEG entries: programs 0..N-1 take segment 0 of row = program id, extra
programs take the rest and write fp32 partials, and a reduce pass adds a hot row's partials in
segment order (deterministic, no atomics).

- ``segment_plan(offsets, n_selections, seg)``: the plan, sized from shapes only (no host sync).
- ``LaggedSplitCheck``: does any list exceed ``seg``? answered from an earlier call's count on CUDA,
  so near-uniform routing runs the unsplit pass without building a plan.
- ``segment_of_program`` (a Triton helper): the (row, segment, range) of one program of such a pass.
- ``hot_row_of_program`` (a Triton helper): the hot row, and where its partials lie, of one program
  of the reduce pass.

Used by torchpeer/ops/expert_mixing (triton_op, triton_cols_op, triton_fused_op and their kernels)
and torchpeer/ops/retrieval/triton_backward_sorted.py.
"""

import torch
import triton
import triton.language as tl


def segment_plan(offsets, n_selections, seg):
    """Split each row's (expert's) sorted selection list into segments of at most `seg` selections.

    offsets: (N+1,) list boundaries of the sorted selections (e.g. expert_mixing.triton_op.
    _sort_by_expert). Returns (nseg (N,), pbase (N,), seg_expert (E,), seg_index (E,), hot (Hb,))
    with E = n_selections // seg, an upper bound on the extra
    segments (segment 1, 2, ... of experts with more than `seg` selections), so that no host
    sync is needed, and Hb = n_selections // (seg + 1), a bound on those hot experts:
    nseg[e] = max(1, ceil(count_e / seg)); extra program q handles segment seg_index[q] of
    expert seg_expert[q] (-1: none) and writes partial row pair q; hot expert e's partials are
    q in [pbase[e], pbase[e] + nseg[e] - 1); hot lists the hot experts (-1 padded).
    All int64 on the device; every size depends on shapes only (CUDA-graph safe).
    """
    counts = offsets[1:] - offsets[:-1]
    N = counts.numel()
    dev = offsets.device
    nseg = torch.clamp((counts + seg - 1) // seg, min=1)
    extra = nseg - 1
    cum_extra = torch.cumsum(extra, 0)
    pbase = cum_extra - extra
    q = torch.arange(n_selections // seg, device=dev, dtype=torch.int64)
    seg_expert = torch.searchsorted(cum_extra, q, right=True)
    in_range = seg_expert < N
    seg_expert = seg_expert.clamp(max=N - 1)
    seg_index = q - pbase[seg_expert] + 1
    seg_expert = torch.where(in_range, seg_expert, -1)
    # the q-th hot expert is the first e with (number of hot experts in 0..e) = q + 1. Found by a
    # search, not a scatter: a scatter that sends every cold expert to one dump slot makes ~N
    # stores to a single address, which serialise (milliseconds at N = 1M).
    cum_hot = torch.cumsum((extra > 0).to(torch.int64), 0)
    rank = torch.arange(1, max(1, n_selections // (seg + 1)) + 1, device=dev, dtype=torch.int64)
    hot = torch.searchsorted(cum_hot, rank)
    hot = torch.where(hot < N, hot, -1)
    return nseg, pbase, seg_expert, seg_index, hot


class LaggedSplitCheck:
    """Does any expert own more than ``seg`` selections? Answered without stalling the GPU stream.

    The exact answer needs the largest expert count on the host: a sync that drains the stream,
    after which the GPU idles while the CPU launches the rest of the step (the cost shows most
    at small batches, where the step is launch-bound). With ``lagged`` (CUDA tensors), each call
    starts an asynchronous copy of its max count into pinned memory and answers from the newest
    copy of an earlier call with the same key (number of experts, segment) that has landed; only
    the first call of a key syncs. A stale answer costs speed only, never exactness: both kernels
    compute the same sums (the split one is skew-robust, the unsplit one has no plan to build), so
    a router that turns skewed is served by the unsplit kernel for one more call at most (more
    only while copies are still in flight). Without ``lagged`` (CPU tensors: a free read) every
    answer is exact. While a CUDA graph is being captured no copy may be read: always split.
    """

    MAX_IN_FLIGHT = 4

    def __init__(self) -> None:
        self._pending: dict = {}  # key -> [(host count, event or None), ...] oldest first
        self._last: dict = {}  # key -> the newest max count read back

    def __call__(self, offsets: torch.Tensor, seg: int, lagged: bool | None = None) -> bool:
        if offsets.is_cuda and torch.cuda.is_current_stream_capturing():
            return True
        peak = (offsets[1:] - offsets[:-1]).max()
        if not (offsets.is_cuda if lagged is None else lagged):
            return int(peak) > seg
        key = (offsets.device, offsets.numel(), seg)
        queue = self._pending.setdefault(key, [])
        while queue and (queue[0][1] is None or queue[0][1].query()):
            self._last[key] = int(queue.pop(0)[0])  # landed: reading it does not sync
        pinned = offsets.is_cuda
        host = torch.empty((), dtype=peak.dtype, pin_memory=pinned)
        host.copy_(peak, non_blocking=pinned)
        event = None
        if pinned:
            event = torch.cuda.Event()
            event.record()
        queue.append((host, event))
        del queue[: -self.MAX_IN_FLIGHT]  # unread older copies are superseded by newer ones
        if key not in self._last:  # the first call of this key: wait for its own count once
            if event is not None:
                event.synchronize()
            self._last[key] = int(queue.pop()[0])
        return self._last[key] > seg


@triton.jit
def segment_of_program(pid, N, seg_expert_ptr, seg_index_ptr, offsets_ptr, SEG):
    """-> (expert e, segment index, valid, expert's first/last selection, segment start/end) of
    segment program pid: programs 0..N-1 take segment 0 of expert pid, programs N.. the extra
    segment named by seg_expert/seg_index (-1: none, an empty range)."""
    if pid < N:
        e = pid
        seg = pid * 0
    else:
        e = tl.load(seg_expert_ptr + (pid - N))
        seg = tl.load(seg_index_ptr + (pid - N))
    valid = e >= 0
    e = tl.maximum(e, 0)
    first = tl.load(offsets_ptr + e)
    last = tl.load(offsets_ptr + e + 1)
    start = tl.where(valid, first + seg * SEG, first)
    end = tl.where(valid, tl.minimum(last, start + SEG), first)
    return e, seg, valid, first, last, start, end


@triton.jit
def hot_row_of_program(pid, hot_ptr, nseg_ptr, pbase_ptr):
    """-> (row e, valid, number of extra segments, index of its first partial) of reduce program pid:
    e = hot[pid] (-1 padding: valid False, no extra segments, e clamped to 0 so loads stay in range);
    its partials are pbase[e] .. pbase[e] + extra - 1 (segment_plan)."""
    e = tl.load(hot_ptr + pid)
    valid = e >= 0
    e = tl.maximum(e, 0).to(tl.int64)
    extra = tl.where(valid, tl.load(nseg_ptr + e) - 1, 0)
    return e, valid, extra, tl.load(pbase_ptr + e)
