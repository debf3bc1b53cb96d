"""RetrievalKernelConfig: which forward/backward algorithm the Triton retrieval runs, and its launch tuning.

Passed down explicitly (``product_key_topk(..., config=...)``, benchmarks build variants with
``dataclasses.replace``); nothing is read from the environment. Numbers are from one H200
(triton 3.6, T=65536, H=8, n=1024, d_key=128, top_k=16), benchmarks/NOTES_retrieval.md.

Forward algorithms (``forward``):
  "threshold": per-half candidates >= a group-max bound, then a pruned pair merge
               (bf16 T=65536: 5.9 ms against 15.4 for "merge"); triton_threshold.py.
  "merge":     one kernel, running top-KP per half + all KP*KP pair sums; triton_merge.py.
  "split":     for a handful of tokens (decoding): one program per (sub-key tile, head, half) scores
               one tile and keeps its top-k, a second kernel merges; triton_split.py. Not measured yet:
               the byte/latency count is in that file and benchmarks/NOTES_issue19.md.
  "onepass":   one kernel per (row block, head): both halves' candidates (group-max theta + cumsum
               compaction), each half's top-k and the pruned pair merge by rounds of max, no int64
               sorting network, no second launch (the half lists stay in the program's own scratch);
               triton_onepass.py. Measured 2026-12-05: 5.67 ms against 5.91 for "threshold" at
               T=65536 (1.48 vs 1.54 at 16384), bit-equal (benchmarks/results/
               bench_retrieval_onepass_2026-12-05.md; predicted 1.6 ms: the selection rounds, not the
               bytes, cost). "auto" does not pick it yet: its CAP is 32 candidate slots against
               threshold's 64, and the fallback rate on trained keys is unmeasured (4 % is not worth
               a slow fallback).
  "packed":    "onepass" with each half's selection rounds on 32-bit packed (truncated score, slot)
               keys, an exact per-row check and the int64 rounds where it fails, and no per-score bounds
               masks; bit-equal to the others; launched with the onepass_* tuples; triton_packed.py.
               Unmeasured: from the sm_90 SASS count ~10-15 % faster than "onepass" (NOTES_retrieval.md
               section 8, which also says why no selection change alone reaches ~1.5 ms: pass 2 is ~2/3).
  "queue":     per (row, strided column group) a sorted register queue of the D best 32-bit (truncated
               score, tile) keys, filled elementwise in the accumulator layout (no compaction, no theta),
               k rounds over the queue heads, the winners' exact scores from a gathered tensor-core
               product, a per-row exactness check and "packed"'s exact path for a failing half;
               bit-equal to the others; onepass_* launch tuples + queue_depth; triton_queue.py.
               H100, 2026-12-05 (bf16, top_k 16): 4.61 ms against 5.77 for "threshold" at T=65536,
               1.23 vs 1.52 at 16384; fwd+bwd with "sorted" 6.14 vs 7.40 (benchmarks/results/
               bench_retrieval_queue_2026-12-05_h100.md). Bit-equal to "merge" and "threshold" in all
               6 check rows at T=4096 (Gaussian, D 3, per-head, fp32, top_k 32, dup4; exact path on
               4.0 / 25.2 / 5.6 / 2.2 / 10.5 / 100 % of halves: bench_retrieval_checks_2026-12-05_h100.md).
  "auto":      "split" for at most ``small_tokens`` tokens; else "queue" for bf16/fp16 inputs with
               top_k <= 16 and at least ``queue_tokens`` tokens (where the queue kernel takes n: at
               most 256 tiles of BLOCK_N); else "merge" for fp32 (or mixed-dtype) inputs with
               top_k <= 16, where its single pass of fp32 dots wins (T=16384: 7.8 vs 10.7 ms), else
               "threshold".
Backward algorithms (``backward``, triton_backward.py):
  "sorted" (the default): the dq kernel + dkeys by sorted segment sums: the (half, selection)
               pairs radix-sorted by table row (int16 keys), each row's list cut into segments of
               SEGMENT_BLOCKS blocks (skew-robust: a hot sub-key spreads over many programs), fp32
               sums, no atomics (triton_backward_sorted.py). H200, 2026-12-05, T=65536: backward
               1.49 ms against 3.34 for "hybrid" (fwd+bwd 7.23 vs 9.49 ms); the layer at d=1024
               31.5-31.8 ms against 33.8-33.9 (benchmarks/results/peer_layer_2026-12-05_sorted_bwd.md;
               measured with per-row splits, before the segment plan of the same kernel loop).
  "hybrid":    dq by the gather kernel (0.25 ms) + dkeys by the dense path: (T*H, n) fp32 scatter
               matrices and TF32 matmuls per token chunk (~9.2 GB of traffic at 65536 tokens).
               The default until 2026-12-05; 2026-11-28: layer 33.1 ms against 34.4 with "dense".
  "dense":     scatter matrix per token chunk + TF32 matmuls (5.0 ms).
  "triton":    dq and dkeys kernels, deterministic partial sums (29.8 ms).
"""

from __future__ import annotations

from dataclasses import dataclass

FORWARD_IMPLS = ("auto", "threshold", "merge", "split", "onepass", "packed", "queue")
BACKWARD_IMPLS = ("dense", "hybrid", "triton", "sorted")
THETA_METHODS = ("max", "topk")
PREFIX_METHODS = ("cumsum", "dot")


@dataclass(frozen=True)
class RetrievalKernelConfig:
    forward: str = "auto"
    backward: str = "sorted"
    # "merge" launch (BLOCK_M, BLOCK_N, num_warps). "half": bf16/fp16 queries and keys with top_k <= 16;
    # "fp32": any other dtype mix; "wide": 16 < top_k <= 32. Measured, bf16: (64, 128, 16) 15.5 ms,
    # (64, 64, 16) 25.0, (32, 64, 16) 32.5, (32, 128, 16) 48.8, (16, 64, 4) 37.6; fp32 (16, 64, 4)
    # 31.3; top_k=32 (16, 64, 8) 64.3.
    merge_half: tuple[int, int, int] = (64, 128, 16)
    merge_fp32: tuple[int, int, int] = (16, 64, 4)
    merge_wide: tuple[int, int, int] = (16, 64, 8)
    # "threshold" launch (BLOCK_M, BLOCK_N, num_warps, CAP, programs per SM), keyed like merge_*.
    # CAP: candidate slots per row (power of two >= KP). With Gaussian scores, n = 1024, k = 16 and
    # BLOCK_N = 64 the candidate count has mean 18 and max 28 over 20000 rows. bf16: (64, 64, 4, 64, 8)
    # 5.94 ms, CAP 32 5.67 (kept 64: twice the observed max before a work item falls back),
    # (64, 64, 4, 64, 4) 5.97, (128, 64, 8, 64, 4) 6.28, (32, 64, 4, 64, 8) 6.65, (64, 128, 4, 64, 8)
    # 6.74, (64, 64, 8, 64, 8) 7.33. fp32 and wide: untuned (fp32 T=16384: 10.7 ms; top_k=32 bf16
    # T=16384: 3.0 ms against 16.3 for "merge").
    threshold_half: tuple[int, int, int, int, int] = (64, 64, 4, 64, 8)
    threshold_fp32: tuple[int, int, int, int, int] = (32, 64, 4, 64, 8)
    threshold_wide: tuple[int, int, int, int, int] = (32, 64, 4, 128, 8)
    # "onepass" launch (BLOCK_M, BLOCK_N, num_warps, CAP, programs per SM), keyed like merge_*. Unmeasured
    # (NOTES_retrieval.md section 7). From the sm_90 compile (ptxas, no GPU): (64, 64, 4) uses wgmma with
    # each warp owning 16 whole rows, so the per-round row reductions stay inside a warp (96 barriers in
    # the PTX; 255 registers, 4 bytes spilled); (32, 64, 4) gets mma.sync with the warps side by side along
    # the columns, so every row reduction crosses warps through shared memory (350 barriers; 254
    # registers, no spill). CAP 32 is above the 28 candidates seen in 20000 Gaussian rows (a block with
    # more is redone exactly in the same program). top_k > 16 has ~2k candidates and 119 pairs (NCP 128)
    # per row: (16, 64, 4) compiles without spills, (64, 64, 4) spills 3 KB.
    onepass_half: tuple[int, int, int, int, int] = (64, 64, 4, 32, 8)
    onepass_fp32: tuple[int, int, int, int, int] = (32, 64, 4, 32, 8)
    onepass_wide: tuple[int, int, int, int, int] = (16, 64, 4, 64, 8)
    # How "onepass" numbers the candidates of a tile: "cumsum" (tl.cumsum: the compiler converts the
    # (BLOCK_M, BLOCK_N) tile to a blocked layout for the scan and back) or "dot" (the prefix count as
    # a product with a triangular ones matrix on the tensor cores, exact). Which is faster is unmeasured.
    onepass_prefix: str = "cumsum"
    # "queue": D, the keys kept per (row, group) besides the best dropped one (3 or 4). A half of a work item
    # takes the exact path when one of its rows has a group holding more than D of its top-k (CPU
    # simulation, Gaussian bf16, n 1024, k 16: 0.42 % of half-rows at D 3, ~0.01 % at D 4) or a near tie
    # (~0.06 %); D 4 costs 2 more integer max/min per score and 32 more registers (NOTES_retrieval.md 9).
    queue_depth: int = 4
    # "auto" takes "queue" for bf16/fp16 inputs with top_k <= 16 from this many tokens (0: never). Why:
    # the only T it was timed at, H100 bf16 top_k 16 (bench_retrieval_queue_2026-12-05_h100.md): 1.23 vs
    # 1.52 ms for "threshold" at T=16384, 4.61 vs 5.77 at 65536, and every check row bit-equal
    # (bench_retrieval_checks_2026-12-05_h100.md). Below 16384 and for top_k 32 it is unmeasured.
    queue_tokens: int = 16384
    # How the threshold kernel finds the k-th largest group maximum: "topk" (tl.topk of BLOCK_N floats)
    # or "max" (top_k rounds of max + drop; also much faster under the interpreter). Same speed (5.67
    # vs 5.68 ms).
    theta: str = "max"
    # "split" (small T): tile kernel (BLOCK_M, BLOCK_N, num_warps) and merge kernel (BLOCK_R rows,
    # num_warps); "auto" takes it up to small_tokens tokens (0: never). Untuned (issue 19, to measure).
    split: tuple[int, int, int] = (16, 64, 4)
    split_merge: tuple[int, int] = (8, 4)
    small_tokens: int = 64
    # Stage 2 (pairs) and backward: (BLOCK, num_warps); dkeys: (BLOCK_A, BLOCK_R, num_warps, programs
    # per SM). dq (32, 4) 0.37 ms, (64, 4) 0.43, (128, 8) 0.44; dkeys (128, 32, 4, 4) 28.7 ms,
    # (128, 64, 8, 4) 29.6, (64, 64, 4, 4) 30.6, (256, 64, 8, 2) 40.0, (128, 64, 4, 8) 96.6.
    pair: tuple[int, int] = (64, 4)
    dq: tuple[int, int] = (32, 4)
    dkeys: tuple[int, int, int, int] = (128, 32, 4, 4)
    # "dense" backward chunks hold a (rows, n) fp32 matrix; at most this many elements (256 MiB).
    backward_chunk_elements: int = 1 << 26
    # The kernels hold (BLOCK_M, KP * KP) int64 candidates ("merge") or pair lists of ~k ln k
    # ("threshold") in registers; above this padded top-k the chunked torch implementation answers.
    max_kernel_kp: int = 32

    def __post_init__(self):
        if self.forward not in FORWARD_IMPLS:
            raise ValueError(f"forward must be one of {FORWARD_IMPLS}, got {self.forward!r}")
        if self.backward not in BACKWARD_IMPLS:
            raise ValueError(f"backward must be one of {BACKWARD_IMPLS}, got {self.backward!r}")
        if self.theta not in THETA_METHODS:
            raise ValueError(f"theta must be one of {THETA_METHODS}, got {self.theta!r}")
        if self.onepass_prefix not in PREFIX_METHODS:
            raise ValueError(f"onepass_prefix must be one of {PREFIX_METHODS}, got {self.onepass_prefix!r}")
        if self.queue_depth not in (3, 4):
            raise ValueError(f"queue_depth must be 3 or 4, got {self.queue_depth!r}")
        if self.queue_tokens < 0:
            raise ValueError(f"queue_tokens must be >= 0 (0: never), got {self.queue_tokens!r}")

    def merge_launch(self, kp: int, dot_fp32: bool) -> tuple[int, int, int]:
        return self.merge_wide if kp > 16 else self.merge_fp32 if dot_fp32 else self.merge_half

    def threshold_launch(self, kp: int, dot_fp32: bool) -> tuple[int, int, int, int, int]:
        return self.threshold_wide if kp > 16 else self.threshold_fp32 if dot_fp32 else self.threshold_half

    def onepass_launch(self, kp: int, dot_fp32: bool) -> tuple[int, int, int, int, int]:
        return self.onepass_wide if kp > 16 else self.onepass_fp32 if dot_fp32 else self.onepass_half


DEFAULT_CONFIG = RetrievalKernelConfig()

# torch.library custom ops take no dataclasses: a config travels into the op as its index here.
_REGISTERED: list[RetrievalKernelConfig] = [DEFAULT_CONFIG]


def config_id(config: RetrievalKernelConfig) -> int:
    """Index of `config` in the registry (added on first use; equal configs share one index)."""
    for i, c in enumerate(_REGISTERED):
        if c == config:
            return i
    _REGISTERED.append(config)
    return len(_REGISTERED) - 1


def config_by_id(i: int) -> RetrievalKernelConfig:
    return _REGISTERED[i]
