"""Shared pieces of the Triton retrieval kernels: packed (score, index) keys and a running top-k.

Selection works on packed int64 keys: the high 32 bits are the fp32 score mapped to an int32 with
the same order, the low 32 bits hold (2**31 - 1 - index). One integer compare then orders by score
and breaks ties towards the smaller index, and sorting/top-k moves scores and indices together
(Triton's tl.topk / tl.bitonic_merge take one tensor).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torchpeer.ops.dispatch import triton_interpreting

# persistent programs of the threshold kernel under the interpreter (small: exercises the loop)
INTERP_PROGRAMS = 3


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def num_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def dot_fp32(queries: torch.Tensor, sub_keys: torch.Tensor) -> bool:
    # bf16/fp16 x bf16/fp16 products are exact in the fp32 accumulator (tensor cores); any other
    # mix is done in fp32 ("ieee", not tf32). The interpreter's half-precision dot is broken
    # (it multiplies the raw uint16 storage), so it always takes the fp32 path.
    half = (torch.bfloat16, torch.float16)
    return triton_interpreting() or not (queries.dtype == sub_keys.dtype and queries.dtype in half)


@triton.jit
def pack(score, idx):
    """fp32 score + int32 index -> int64 whose integer order is (score, -index)."""
    bits = score.to(tl.int32, bitcast=True)
    # negative floats: flip all but the sign bit so larger float <=> larger int
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (key.to(tl.int64) << 32) | (2147483647 - idx).to(tl.int64)


@triton.jit
def unpack(packed):
    key = (packed >> 32).to(tl.int32)
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    idx = 2147483647 - (packed & 0x7FFFFFFF).to(tl.int32)
    return bits.to(tl.float32, bitcast=True), idx


@triton.jit
def sentinel(BLOCK_M: tl.constexpr, K: tl.constexpr):
    # below every packed finite score (the key of -inf is -2139095041)
    return tl.full((BLOCK_M, K), -2147483647, tl.int64) << 32


@triton.jit
def half_topk(
    q_rows, stride_qd, row_mask, k_ptr, n,
    DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr,
    DOT_FP32: tl.constexpr,
):  # fmt: skip
    """Running top-KP (ascending packed keys) of q_half . C[j] over the n sub-keys."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < DH
    q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    running = sentinel(BLOCK_M, KP)
    for n0 in range(0, n, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_mask = cols < n
        c = tl.load(
            k_ptr + cols[:, None] * DH + offs_d[None, :],
            mask=col_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        if DOT_FP32:
            s = tl.dot(q, tl.trans(c.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(c))  # bf16/fp16 products are exact in the fp32 accumulator
        p = pack(s, cols[None, :])
        p = tl.where(col_mask[None, :], p, sentinel(BLOCK_M, BLOCK_N))
        tile_top = tl.topk(p, KP)  # descending
        # max(ascending, descending) holds the top-KP of the union as a bitonic sequence
        running = tl.bitonic_merge(tl.maximum(running, tile_top), descending=False)
    return running
