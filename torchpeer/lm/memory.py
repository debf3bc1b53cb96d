"""Memory of one training step, estimated from the config before anything is allocated.

``estimate_step_memory(cfg)`` adds up, in bytes:

* parameters (fp32 master weights, counted from the config's shapes), gradients (same size) and
  AdamW state (two moments, plus on the CPU one temporary of the largest parameter: the unfused
  AdamW step builds its denominator);
* activations that autograd keeps for backward, per token and block (RMSNorm inputs and outputs,
  q/k/v and their rotated copies, the attention output and log-sum-exp, the FFW's hidden units or
  PEER/PKM queries, scores, gates and int64 indices, MoE dispatch buffers; with a fused table
  optimizer on a shared pool, what its layers' backwards keep for its step(): ``pool_stash_bytes``);
* attention at ``model.seq_len``: the fused kernels (flash attention on the CPU, flash or
  memory-efficient on CUDA) keep O(seq_len) per head, never the (seq_len, seq_len) score matrix;
* routing workspace: the lean PyTorch PEER/PKM paths work on chunks of gathered expert rows
  (torchpeer/mixing.py, product_keys.py), the Triton path on (tokens, heads, top_k) sort buffers;
* logits: (batch * seq_len, vocab) in fp32, alive four times around the loss backward
  (logits, log-softmax, and both of their gradients), or three times for an evaluation batch
  (``train.eval_batch_size``) when that is larger; with ``train.loss_chunk_tokens`` only one
  chunk's logits (and the head's input and weight gradients the chunked loss keeps);
* a backward workspace of about one block's activations (the gradients in flight);
* runtime: a fixed allowance for what the trainer still loads and initialises after the check (on
  the CPU mostly code: building torch.optim imports torch._dynamo and sympy, 100-150 MiB of RSS;
  thread pools, allocator slack; on CUDA the cuBLAS workspace and caching-allocator rounding).

``check_fits(cfg, device)`` compares that total with what the device has free (CPU: MemAvailable
from /proc/meminfo, capped by a cgroup memory limit; CUDA: ``torch.cuda.mem_get_info``) and raises a
ValueError that names the knobs to turn.

Calibration (``python scripts/calibrate_memory.py``: the real trainer, 3 steps, CPU, torch 2.13):
on five tiny configs (PEER, PEER with 65k experts, dense, PKM, MoE; 1.5k-8k tokens per batch) the
growth of peak RSS from the trainer's check to the end of training was 0.71-0.76x of the estimate,
so the estimate is an upper bound with a 25-30 % margin. The interpreter, torch and the tokenizer
are already resident when it is checked and are not counted. GPU estimates follow the same
formulas with bf16 activations and are not calibrated yet.
"""

from __future__ import annotations

import dataclasses
import math

import torch

GiB = 1024**3
MiB = 1024**2

# Fixed allowance per device type (see "runtime" in the module docstring).
_RUNTIME = {"cpu": 256 * MiB, "cuda": 512 * MiB}

# Chunk budgets of the lean PyTorch paths (elements of one chunk of gathered rows / of scores);
# mirror torchpeer/mixing.py and torchpeer/product_keys.py.
_MIX_CHUNK = {"cpu": 1 << 23, "cuda": 1 << 27}
_TOPK_CHUNK = {"cpu": 1 << 22, "cuda": 1 << 26}


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step, by part (see the module docstring). ``total`` is their sum."""

    device: str
    tokens: int  # tokens of one micro-batch: train.batch_size * model.seq_len
    parameters: int
    gradients: int
    optimizer: int
    activations: int
    attention: int
    routing: int
    logits: int
    workspace: int
    runtime: int

    PARTS = tuple("parameters gradients optimizer activations attention routing logits workspace runtime".split())

    @property
    def total(self) -> int:
        return sum(getattr(self, p) for p in self.PARTS)

    def breakdown(self) -> dict[str, int]:
        """{part: bytes} of the nonzero parts, largest first."""
        parts = {p: getattr(self, p) for p in self.PARTS if getattr(self, p)}
        return dict(sorted(parts.items(), key=lambda kv: -kv[1]))

    def format(self) -> str:
        """One line: total and the parts, e.g. '1.21 GiB (logits 0.50 GiB, activations ...)'."""
        parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.breakdown().items())
        return f"{format_bytes(self.total)} ({parts})"

    def against_peak(self) -> dict:
        """{"estimate": bytes, "peak": bytes or None, "peak_over_estimate": ratio or None}: the estimate
        beside this process's peak of the caching allocator (CUDA; None elsewhere), for summary.json,
        so that GPU runs calibrate the estimate (the sweep's start lock reserves it for the others)."""
        peak = None
        if self.device.startswith("cuda") and torch.cuda.is_available():
            peak = int(torch.cuda.max_memory_reserved(torch.device(self.device)))
        ratio = round(peak / self.total, 3) if peak is not None and self.total else None
        return {"estimate": self.total, "peak": peak, "peak_over_estimate": ratio}


def format_bytes(n: float) -> str:
    if n >= 1024**4:
        return f"{n / 1024**4:.2f} TiB"
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.1f} MiB"


def _device_of(cfg, device) -> torch.device:
    if device is None:
        device = getattr(cfg.train, "device", "cpu")
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _vocab_size(cfg) -> int:
    """model.vocab_size; before the tokenizer sets it, what the tokenizer will give (257 for bytes,
    the target for bpe; a named tokenizer is not loaded here: its data.vocab_size stands in)."""
    from torchpeer.data import expected_vocab_size

    if cfg.model.vocab_size is not None:
        return int(cfg.model.vocab_size)
    if cfg.data.tokenizer in ("byte", "bpe"):
        return expected_vocab_size(cfg.data, progress=False)
    return int(cfg.data.vocab_size)


def _query_norm_params(kind: str, heads: int, d_key: int) -> int:
    """Parameters of a router's query norm (a tiny module: built on the CPU to count them)."""
    from torchpeer.layers.query_norm import build_query_norm

    return sum(p.numel() for p in build_query_norm(kind, heads, d_key).parameters())


def _ffw_param_sizes(kind: str, cfg) -> list[int]:
    """Element counts of one FFW's parameters, from its config section (mirrors torchpeer/layers)."""
    d = cfg.model.d_model
    c = getattr(cfg.model, kind)
    if kind == "dense":
        h = c.d_hidden or 4 * d
        bias = bool(getattr(c, "bias", False))
        mats = [d * h + (h if bias else 0)] * (2 if c.swiglu else 1)
        return [*mats, h * d + (d if bias else 0)]
    if kind == "peer":
        n = math.isqrt(c.n_experts)
        key_sets = 1 if c.shared_keys else c.heads
        router = [d * c.heads * c.d_key, _query_norm_params(c.query_norm, c.heads, c.d_key), key_sets * n * c.d_key]
        readout = getattr(c, "readout", "paper")
        gated = [d * d, d * d] if readout == "gated" else []  # W_g and W_o (layers/readout.py)
        if getattr(c, "shared_pool", False):
            return [*router, *gated]  # the tables are the LM's one pool: _param_sizes counts them once
        return [*router, *gated, *_peer_table_sizes(c, d)]
    if kind == "pkm":
        dk, vd = c.d_key or 256, c.value_dim or d
        hq = c.heads * dk
        router = [d * hq + hq, _query_norm_params(c.query_norm, c.heads, dk), c.heads * c.n_keys * dk]
        return [*router, c.n_keys**2 * vd] + ([vd * d] if vd != d else [])
    if kind == "moe":
        de = c.d_expert or 4 * d
        return [d * c.n_experts, c.n_experts * d * de, c.n_experts * de * d]
    raise ValueError(f"unknown FFW kind {kind!r}")


def _peer_table_sizes(c, d: int) -> list[int]:
    """Element counts of a PEER layer's (or pool's) expert tables: u and v, and w for read-out "glu"."""
    return [c.n_experts * d] * (3 if getattr(c, "readout", "paper") == "glu" else 2)


def _rowwise_table_elements(cfg) -> int:
    """Elements of the PEER tables that a fused train.expert_optimizer (rowwise_adam*, elementwise_adam*)
    updates (0 for adamw): each layer's own, or a shared pool's once."""
    from torchpeer.lm.config import FUSED_EXPERT_OPTIMIZERS  # (imported already: cfg is one)

    if getattr(cfg.train, "expert_optimizer", "adamw") not in FUSED_EXPERT_OPTIMIZERS:
        return 0
    m = cfg.model
    n_peer = sum(kind == "peer" for kind in m.block_kinds())
    owners = min(n_peer, 1) if getattr(m.peer, "shared_pool", False) else n_peer
    return owners * sum(_peer_table_sizes(m.peer, m.d_model))


def pool_stash_bytes(cfg, tokens: int, mm: int) -> int:
    """What a fused table optimizer keeps of a shared pool's layers from their backwards to its step()
    (ops/expert_mixing/triton_deferred_op.py): per token of each PEER layer x and dy (d values each, mm
    bytes a value) and 16 bytes per selection (index, gate, u.x, coef); 0 without a pool or fused optimizer."""
    m = cfg.model
    if not (_rowwise_table_elements(cfg) and getattr(m.peer, "shared_pool", False)):
        return 0
    n_peer = sum(kind == "peer" for kind in m.block_kinds())
    return n_peer * tokens * (2 * m.d_model * mm + 16 * m.peer.heads * m.peer.top_k)


def _param_sizes(cfg, vocab: int) -> list[int]:
    """Element counts of the model's parameters, from the config alone (nothing is built or allocated:
    a meta-device build costs seconds of imports). tests/test_memory.py checks them against built models."""
    m = cfg.model
    d = m.d_model
    sizes = [vocab * d] + ([] if m.tie_embeddings else [vocab * d]) + [d]  # embeddings, final norm
    sizes += [vocab] if m.logit_prior != "none" else []  # the head's bias
    kinds = m.block_kinds()
    for kind in kinds:
        sizes += [d, 3 * d * d, d * d, d]  # norm1, qkv, proj, norm2
        sizes += _ffw_param_sizes(kind, cfg)
    if "peer" in kinds and getattr(m.peer, "shared_pool", False):
        sizes += _peer_table_sizes(m.peer, d)  # one ExpertPool for every PEER layer
    return [s for s in sizes if s]


def _section(cfg, kind: str):
    return getattr(cfg.model, kind)


def _ffw_bytes(kind: str, cfg, tokens: int, mm: int, dev: str, triton: bool) -> tuple[int, int]:
    """(bytes saved for backward, transient routing workspace) of one block's FFW."""
    d = cfg.model.d_model
    if kind == "dense":
        c = _section(cfg, "dense")
        hidden = c.d_hidden or 4 * d
        n = 4 if c.swiglu else 2  # pre-/post-activation (and the gate branch and product)
        return tokens * n * hidden * mm, 0
    if kind == "peer":
        c = _section(cfg, "peer")
        hk, qd = c.heads * c.top_k, c.heads * c.d_key
        # query projection + norm output (+ a copy in the autocast dtype); scores, gates fp32, indices int64
        saved = tokens * (2 * qd * 4 + (qd * mm if mm != 4 else 0) + hk * (4 + 4 + 8))
        n_sub = math.isqrt(c.n_experts)
        if triton:
            work = tokens * hk * 8 * 4  # sort keys, permutation, per-selection coefficients
        else:
            rows = min(_MIX_CHUNK[dev], tokens * hk * d)  # one chunk of gathered (c, h, k, d) rows
            scores = min(_TOPK_CHUNK[dev], tokens * c.heads * max(n_sub, c.top_k**2))
            work = 5 * rows * mm + 3 * scores * 4  # backward: u, v, two products, einsum copy
        return saved, work
    if kind == "pkm":
        c = _section(cfg, "pkm")
        hk, dk = c.heads * c.top_k, (c.d_key or 256)
        vd = c.value_dim or d
        saved = tokens * (2 * c.heads * dk * 4 + hk * (4 + 4 + 8) + vd * 4)
        scores = min(_TOPK_CHUNK[dev], tokens * c.heads * max(c.n_keys, c.top_k**2))
        return saved, 3 * scores * 4 + tokens * hk * 8 * 2
    if kind == "moe":
        c = _section(cfg, "moe")
        de = c.d_expert or 4 * d
        slots = min(tokens * c.n_experts, math.ceil(c.capacity_factor * c.top_k * tokens / c.n_experts) * c.n_experts)
        saved = tokens * c.n_experts * 4 * 2 + slots * (2 * d + 2 * de) * mm + slots * 16
        return saved, slots * d * mm
    raise ValueError(f"unknown FFW kind {kind!r}")


def estimate_step_memory(cfg, device: str | torch.device | None = None) -> MemoryEstimate:
    """Bytes one training step of ``cfg`` (a RunConfig) needs on ``device`` (default: cfg.train.device).

    Nothing is allocated: everything follows from the config's shapes (see the module docstring).
    """
    dev = _device_of(cfg, device)
    dev_type = "cuda" if dev.type == "cuda" else "cpu"
    m, t = cfg.model, cfg.train
    bf16 = dev_type == "cuda" and getattr(t, "dtype", "fp32") == "bf16"
    mm = 2 if bf16 else 4  # bytes of a matmul output (bf16 under autocast, else fp32)
    vocab = _vocab_size(cfg)
    tokens = t.batch_size * m.seq_len
    d, heads = m.d_model, m.n_heads

    sizes = _param_sizes(cfg, vocab)
    n_params = sum(sizes)
    parameters = 4 * n_params
    gradients = 4 * n_params
    if t.grad_accum > 1:  # the next micro-batch's gradient exists beside .grad before it is added
        gradients += 4 * max(sizes)
    optimizer = 8 * n_params + (0 if dev_type == "cuda" else 4 * max(sizes))
    tables = _rowwise_table_elements(cfg)
    if tables:  # the fused lazy Adam (torchpeer/optim/fused_tables.py) owns the PEER tables' update:
        # no table gradients and no AdamW moments for them; per element an fp32 first moment, per row an
        # int32 step count, and an fp32 second moment per row (rowwise_adam*) or per element (elementwise_adam*)
        from torchpeer.lm.config import FUSED_EXPERT_OPTIMIZERS

        fused, rows = FUSED_EXPERT_OPTIMIZERS[t.expert_optimizer], tables // m.d_model
        gradients -= 4 * tables
        optimizer += 4 * tables + 4 * rows - 8 * tables
        optimizer += 4 * (tables if fused["elementwise"] else rows)
        if fused["bf16_tables"]:  # bf16 working tables, fp32 masters in the optimizer
            parameters -= 2 * tables
            optimizer += 4 * tables

    # Per block: two RMSNorms keep their fp32 input and normalised output and pass on their output.
    norms = tokens * 2 * (2 * d * 4 + d * mm)
    # qkv (3d), rotated q and k (2d), attention output (d) and its contiguous copy (d), fp32 log-sum-exp.
    attention_block = tokens * (7 * d * mm + heads * 4)
    triton = dev_type == "cuda" and getattr(getattr(m, "peer", None), "backend", "auto") in ("auto", "triton")
    activations, attention, routing, largest_block = 0, 0, 0, 0
    for kind in m.block_kinds():
        ffw_saved, ffw_work = _ffw_bytes(kind, cfg, tokens, mm, dev_type, triton)
        activations += norms + ffw_saved
        attention += attention_block
        routing = max(routing, ffw_work)  # one layer's chunks live at a time
        largest_block = max(largest_block, norms + ffw_saved + attention_block)
    activations += tokens * (2 * d * 4 + d * mm)  # final norm
    # a shared pool's fused update keeps its layers' selections through the backward (step()'s concatenated
    # copy of them comes after the backward has freed the activations, which are larger)
    activations += pool_stash_bytes(cfg, tokens, mm)
    chunk = getattr(t, "loss_chunk_tokens", 0)
    if chunk:  # chunked_loss.py: one chunk's fp32 logits and logsumexp's temporary, the bf16 product and
        # gradient, 4 bytes of slack; + the kept gradients (tokens x d, vocab x d)
        logits = min(chunk, tokens) * vocab * (8 + (2 if bf16 else 0) + 4) + tokens * d * mm + vocab * d * (4 + mm)
    else:
        logits = tokens * vocab * (16 + (2 if bf16 else 0))
    eval_tokens = (getattr(t, "eval_batch_size", None) or t.batch_size) * m.seq_len
    logits = max(logits, eval_tokens * vocab * (12 + (2 if bf16 else 0)))  # no gradients, a larger batch
    # activation gradients of the block in backward (FFW hidden units and their pre-activations, q/k/v)
    workspace = largest_block * 3 // 2 + tokens * d * 4 * 2
    return MemoryEstimate(
        device=str(dev),
        tokens=tokens,
        parameters=parameters,
        gradients=gradients,
        optimizer=optimizer,
        activations=activations,
        attention=attention,
        routing=routing,
        logits=logits,
        workspace=workspace,
        runtime=_RUNTIME[dev_type],
    )


def _cgroup_limit() -> int | None:
    """Bytes left under a cgroup (v2 or v1) memory limit, or None when there is none."""
    for limit_path, usage_path in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_path) as fh:
                raw = fh.read().strip()
            if raw == "max":
                return None
            limit = int(raw)
            with open(usage_path) as fh:
                usage = int(fh.read().strip())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:  # v1 "unlimited"
            return None
        return max(0, limit - usage)
    return None


def available_memory(device: str | torch.device) -> tuple[int | None, str]:
    """(free bytes, where the number comes from) for ``device``; (None, reason) when unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return free, f"free GPU memory on {dev} (torch.cuda.mem_get_info)"
    if dev.type != "cpu":
        return None, f"no memory query for device type {dev.type!r}"
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh if ":" in line)
        avail = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None, "no /proc/meminfo"
    source = "available CPU RAM (MemAvailable in /proc/meminfo)"
    limit = _cgroup_limit()
    if limit is not None and limit < avail:
        avail, source = limit, "CPU RAM left under this cgroup's memory limit"
    return avail, source


def _knobs(est: MemoryEstimate, cfg) -> list[str]:
    """The config fields to turn, those acting on the largest parts first."""
    m, t = cfg.model, cfg.train
    per_token = est.activations + est.attention + est.logits + est.workspace + est.routing
    state = est.parameters + est.gradients + est.optimizer
    batch = [
        f"train.batch_size (now {t.batch_size}; raise train.grad_accum, now {t.grad_accum}, "
        "to keep the tokens per step)",
        f"model.seq_len (now {m.seq_len})",
    ]
    if est.logits > 0.25 * est.total:
        batch.append(f"model.vocab_size / data.vocab_size (now {_vocab_size(cfg)}; logits are batch*seq_len*vocab)")
    size = [f"model.d_model (now {m.d_model})", f"model.n_layers (now {m.n_layers})"]
    if m.ffw == "peer":
        size.append(f"model.peer.n_experts (now {m.peer.n_experts})")
    elif m.ffw == "pkm":
        size.append(f"model.pkm.n_keys (now {m.pkm.n_keys})")
    elif m.ffw == "moe":
        size.append(f"model.moe.n_experts (now {m.moe.n_experts})")
    knobs = batch + size if per_token >= state else size + batch
    if est.device.startswith("cuda") and getattr(t, "dtype", "bf16") != "bf16":
        knobs.append("train.dtype bf16 (halves the activations)")
    return knobs


def check_fits(
    cfg, device: str | torch.device | None = None, available: int | None = None, reserved: int = 0
) -> MemoryEstimate:
    """Raise ValueError (naming the knobs to turn) if a training step of ``cfg`` cannot fit on ``device``.

    available: free bytes to compare with (default: measured, see ``available_memory``).
    reserved: bytes of the measured free memory promised to runs starting beside this one
    (start_lock.py's ledger), taken off it.
    Returns the estimate when it fits, or when the free memory cannot be measured.
    """
    dev = _device_of(cfg, device)
    est = estimate_step_memory(cfg, dev)
    source = "the given budget"
    if available is None:
        available, source = available_memory(dev)
        if available is None:
            return est
        if reserved > 0:
            available = max(0, available - reserved)
            source += f" less {format_bytes(reserved)} reserved by runs starting beside this one"
    if est.total <= available:
        return est
    raise MemoryFitError(
        f"a training step needs about {est.format()}, more than the {format_bytes(available)} of {source}; "
        f"lower {', or '.join(_knobs(est, cfg))}",
        needed=est.total,
        available=available,
        capacity=torch.cuda.mem_get_info(dev)[1] if dev.type == "cuda" else None,
    )


class MemoryFitError(ValueError):
    """``check_fits``' refusal. needed, available: bytes; capacity: the GPU's total memory (None off
    CUDA), so a caller can tell "not now, others hold memory" (needed <= capacity) from "never"."""

    def __init__(self, message: str, needed: int, available: int, capacity: int | None):
        super().__init__(message)
        self.needed, self.available, self.capacity = needed, available, capacity
