"""The PEER layer: Parameter Efficient Expert Retrieval (He 2024, "Mixture of A Million Experts").

A drop-in replacement for a transformer FFW, f: R^d -> R^d. There are N single-neuron experts
e_i(x) = act(u_i . x) * v_i (u_i = ``down[i]``, v_i = ``up[i]``, no biases). Each of ``heads``
query networks maps x to a query q_h(x) (linear, then normalisation); the top_k experts of head h
are the exact top-k of q_h . key_i over all N product keys, and

    f(x) = sum_h sum_{i in topk_h} g_{h,i} e_i(x),   g_h = softmax (or sigmoid) of the top-k scores.

All heads share one expert pool and (by default, as in the paper) one set of product keys.
Retrieval is the shared ``ProductKeyRouter`` (router.py); mixing is ``torchpeer.ops.expert_mix``.
Registered as FFW kind "peer" (config ``PEERConfig``).

Options beyond the paper (each off by default, so the default layer is the paper's; issue 18,
docs/research/beyond_paper.md): ``readout`` (readout.py: "linear", "glu", Memory+'s "gated"),
``shared_pool`` (expert_pool.py: one set of tables for all PEER layers of an LM),
``balance_weight`` / ``balance_stride`` (balance.py: a Switch-style term on the sub-key
marginals, returned by ``aux_loss()``), ``key_lr_scale`` / ``query_lr_scale`` (lr multipliers of
the sub-keys and the query network, ``lr_scales()``), ``key_init`` (key_init.py: sub-keys from the
first batch's queries), ``key_norm`` (router.py: normalised sub-keys, Memory Layers at Scale),
``dense_hidden`` (a narrow dense FFW beside the experts, in the spirit of UltraMemV2's memory
layers beside an FFN: y = PEER(x) + W2 gelu(W1 x)).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from torchpeer.layers.accounting import FFWCost, count_params
from torchpeer.layers.balance import balance_train_flops, subkey_balance_loss
from torchpeer.layers.dense import DenseFFW
from torchpeer.layers.expert_pool import TABLE_NAMES, ExpertPool, expert_tables
from torchpeer.layers.key_init import KEY_INITS, init_sub_keys_from_queries
from torchpeer.layers.readout import LAYER_ACTIVATIONS, READOUTS, OutputGate, mix_activation, rows_per_selection
from torchpeer.layers.registry import register_ffw
from torchpeer.layers.router import KEY_NORMS, ProductKeyRouter, RoutedLayer, autocast_dtype, norm_statistics_kept
from torchpeer.layers.validators import check_choice, check_input, check_number, check_positive
from torchpeer.ops import BACKENDS, expert_mix, resolve_backend
from torchpeer.usage import UsageTrackingMixin

GATES = ("softmax", "sigmoid")


@dataclass
class PEERConfig:
    """Options of ``PEER`` (the ``[model.peer]`` config section); ``PEER`` documents each. The
    fields after ``up_init_std`` go beyond the paper; their defaults are the paper's layer."""

    n_experts: int = 1024**2
    heads: int = 8
    top_k: int = 16
    d_key: int = 128
    activation: str = "gelu"
    gate: str = "softmax"
    query_norm: str = "ema"
    shared_keys: bool = True
    backend: str = "auto"
    up_init_std: float | None = None
    readout: str = "paper"
    shared_pool: bool = False
    balance_weight: float = 0.0
    balance_stride: int = 1
    key_lr_scale: float = 1.0
    query_lr_scale: float = 1.0
    key_init: str = "random"
    key_norm: str = "none"
    dense_hidden: int = 0
    query_norm_momentum: float | None = None


class PEER(RoutedLayer, UsageTrackingMixin, nn.Module):
    """PEER layer. Input (..., d_model) -> output (..., d_model).

    Args:
        d_model: model width d.
        n_experts: N, a perfect square (the product keys have sqrt(N) sub-keys per half).
            Paper default 1024**2.
        heads: number of query heads h (paper: 8). Head outputs are summed.
        top_k: experts retrieved per head k (paper: 16), at most sqrt(N).
        d_key: query/key width, even. Default 128: the retrieval cost per token and head is
            2*d*d_key (query) + 2*sqrt(N)*d_key (sub-key scores), so d_key = 128 keeps retrieval
            at the same order as the experts' own 4*d*k FLOPs for d ~ 1024, N = 1024**2, while
            64-wide half keys still separate 1024 sub-keys well.
        activation: "gelu" or "relu" for the expert neurons.
        gate: "softmax" (paper) or "sigmoid" over each head's k retrieved scores.
        query_norm: a ``build_query_norm`` kind. Default "ema": batch normalisation whose value
            uses running statistics of earlier steps only (causal-safe) and whose gradient is
            BatchNorm's. "batch" is the paper's BatchNorm1d over the heads*d_key query features:
            at train time it normalises with statistics of the whole batch, so in a causal LM a
            position's query depends on the other positions (including later ones) of the batch.
            "layer" (LayerNorm per head) and "none" are the other plain choices.
        shared_keys: True (paper): one set of product keys for all heads; False: one per head.
        backend: "auto" (Triton on CUDA when available, else "torch"), "torch" (memory-lean
            chunked PyTorch), "reference" (naive, materialises gathered rows; tests) or "triton";
            used for both ops (retrieval and mixing), resolved by ``torchpeer.ops``.
        up_init_std: std of the ``up`` (v) table at init; None = 1/sqrt(d_model) (see below).
        readout: "paper" (act(u.x) v), "linear" ((u.x) v), "glu" (act(u.x) (w.x) v, one more table
            ``lin``) or "gated" (Memory+: W_o(mix * silu(W_g x))); see readout.py. All four run on
            every backend (the Triton kernels on CUDA).
        shared_pool: read the tables from ``pool`` (below) instead of owning them. Only the LM
            acts on it (it builds one pool for all its PEER layers); a layer built alone with
            shared_pool and no pool owns its tables.
        balance_weight: weight of the sub-key balance term (balance.py) that ``aux_loss()``
            returns after a training forward; 0 (default) computes nothing.
        balance_stride: the term's soft marginals use every balance_stride-th token (cost 1/stride).
        key_lr_scale, query_lr_scale: lr multipliers (of train.lr) for the sub-keys and for the
            query network (projection and norm parameters), through ``lr_scales()``.
        key_init: "random" (N(0, 1/d_key)) or "queries": at the first training forward the
            sub-keys are set from that batch's queries (key_init.py); a persistent flag
            (``keys_initialised``) keeps a resumed run from doing it again.
        key_norm: "none" (paper), "l2" or "layer": every sub-key row is normalised before it is
            scored (router.py ``normalize_sub_keys``: rows at the random init's norm, so scores
            start on the same scale), by retrieval on every backend and by the balance term.
        dense_hidden: 0 (paper) or the hidden width of a dense FFW (``DenseFFW``, gelu, no biases)
            whose output is added to the experts': the block keeps a narrow dense path beside the
            retrieved neurons instead of losing its FFW to them (attribute ``dense``, else None).
        query_norm_momentum: None (the norm's own: ema 0.05, batch 0.1) or the running statistics'
            update rate in (0, 1] of a "batch", "ema" or "ema_white" query norm. Why: at a high lr the
            queries move fast in the first few dozen steps, and statistics averaged over all earlier
            steps lag them, so every token's query carries one offset and picks the same sub-keys
            (the early router collapse, beyond_paper.md P26-i); a higher rate follows them.
        pool: an ``ExpertPool`` to read the tables from (not a submodule: its owner counts,
            saves and optimises it); must match n_experts, d_model and the read-out's tables.

    Initialisation (why): ``down`` ~ N(0, 1/d), like a dense layer's first matrix, so u.x has unit
    variance for unit-variance x. ``up`` ~ N(0, 1/d) (default ``up_init_std``): the layer's output
    starts small and Adam's steps (~lr per entry) are a few % of an entry, as for a dense layer's
    weights, so the experts' outputs learn. The earlier choice N(0, 1/(h*G)) (G = expected sum of
    squared gates per head: softmax over near-equal scores G ~ 1/k, sigmoid near 0 G ~ k/4) gave
    Var(f(x)) ~ E[act(u.x)^2] like a dense FFW, but entries of ~1.4 at h=8, k=16, which 1e-3 steps
    move by 0.07 % per step: on the H200 (N = 1024**2, 30M tokens) it left usage at 15 % and
    32.3 valid ppl against 73 % and 29.7 with 1/sqrt(d) (docs/research/routing.md). Pass
    ``up_init_std=(h*G)**-0.5`` for the old init. Sub-keys ~ N(0, 1/d_key), so a unit-variance
    query scores each key with unit variance. The query projection uses nn.Linear's default.

    Attributes: ``down``, ``up`` (n_experts, d_model) Parameters (u and v tables; ``lin`` too
    for readout "glu"; the pool's when one is shared); ``router`` (ProductKeyRouter:
    ``query_proj``, ``norm``, ``sub_keys`` (key_sets, 2, sqrt(N), d_key//2), also reachable as
    attributes of the layer); ``out_gate`` (OutputGate, readout "gated", else None).
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int = 1024**2,
        heads: int = 8,
        top_k: int = 16,
        d_key: int = 128,
        activation: str = "gelu",
        gate: str = "softmax",
        query_norm: str = "ema",
        shared_keys: bool = True,
        backend: str = "auto",
        up_init_std: float | None = None,
        readout: str = "paper",
        shared_pool: bool = False,
        balance_weight: float = 0.0,
        balance_stride: int = 1,
        key_lr_scale: float = 1.0,
        query_lr_scale: float = 1.0,
        key_init: str = "random",
        key_norm: str = "none",
        dense_hidden: int = 0,
        query_norm_momentum: float | None = None,
        pool: ExpertPool | None = None,
    ):
        super().__init__()
        if isinstance(n_experts, bool) or not isinstance(n_experts, int):
            raise TypeError(f"n_experts must be an int (a perfect square, e.g. 1024**2), got {n_experts!r}")
        n = math.isqrt(n_experts) if n_experts > 0 else -1
        if n < 1 or n * n != n_experts:
            raise ValueError(f"n_experts={n_experts} must be a perfect square (e.g. 1024**2 or 256**2)")
        if activation == "identity":  # an op-level activation; the layer spells it as a read-out
            raise ValueError("activation='identity' is the linear read-out: set readout='linear' instead")
        check_choice("activation", activation, LAYER_ACTIVATIONS)
        check_choice("gate", gate, GATES)
        check_choice("backend", backend, BACKENDS)
        if up_init_std is not None and not (
            isinstance(up_init_std, (int, float)) and not isinstance(up_init_std, bool) and 0 < up_init_std < math.inf
        ):
            raise ValueError(f"up_init_std must be a positive number (or None = 1/sqrt(d_model)), got {up_init_std!r}")
        _check_beyond_paper(
            readout, shared_pool, balance_weight, balance_stride, key_lr_scale, query_lr_scale, key_init, key_norm,
            dense_hidden,
        )  # fmt: skip
        self.router = ProductKeyRouter(
            d_model, n, heads, top_k, d_key, query_norm, key_sets=1 if shared_keys else heads, backend=backend,
            key_norm=key_norm, query_norm_momentum=query_norm_momentum,
        )  # fmt: skip
        self.d_model, self.n_experts, self.n_sub = d_model, n_experts, n
        self.heads, self.top_k, self.d_key = heads, top_k, d_key
        self.activation, self.gate, self.query_norm = activation, gate, query_norm
        self.shared_keys, self.backend = shared_keys, backend
        self.readout, self.shared_pool, self.key_init, self.key_norm = readout, shared_pool, key_init, key_norm
        self.balance_weight, self.balance_stride = float(balance_weight), balance_stride
        self.key_lr_scale, self.query_lr_scale = float(key_lr_scale), float(query_lr_scale)

        glu = readout == "glu"
        if pool is None:  # own tables, registered on the layer (state-dict keys "down", "up" as ever)
            self.up_init_std = 1.0 / math.sqrt(d_model) if up_init_std is None else float(up_init_std)
            for name, table in expert_tables(n_experts, d_model, self.up_init_std, glu).items():
                setattr(self, name, table)
        else:
            shape = (n_experts, d_model, glu)
            if not isinstance(pool, ExpertPool) or (pool.n_experts, pool.d_model, pool.glu) != shape:
                raise ValueError(
                    f"pool must be an ExpertPool of n_experts={n_experts}, d_model={d_model}, glu={glu} "
                    f"(readout {readout!r}); got {pool!r}"
                )
            self.up_init_std = pool.up_init_std
        object.__setattr__(self, "_pool", pool)  # a reference, not a submodule: see ``pool`` above
        self.out_gate = OutputGate(d_model) if readout == "gated" else None
        self.dense_hidden = dense_hidden
        self.dense = DenseFFW(d_model, dense_hidden) if dense_hidden else None
        self.balance_loss: torch.Tensor | None = None  # the unweighted term of the last training forward
        self._keys_pending = key_init == "queries"
        if self._keys_pending:
            self.register_buffer("keys_initialised", torch.zeros((), dtype=torch.bool))

    @classmethod
    def from_config(cls, d_model: int, cfg: PEERConfig, pool: ExpertPool | None = None) -> PEER:
        """The layer ``cfg`` describes; ``pool``: the LM's shared ExpertPool (``cfg.shared_pool``)."""
        return cls(d_model, **dataclasses.asdict(cfg), pool=pool)

    def __getattr__(self, name: str):
        # A shared pool's tables read as the layer's own (``layer.down`` etc.), so the code that
        # uses them (mixing, optimizers, tests) does not care where they live.
        if name in TABLE_NAMES:
            pool = self.__dict__.get("_pool")
            if pool is not None and hasattr(pool, name):
                return getattr(pool, name)
        return super().__getattr__(name)

    @property
    def pool(self) -> ExpertPool | None:
        """The shared ExpertPool this layer reads, or None (it owns its tables)."""
        return self.__dict__.get("_pool")

    def tables(self) -> list[nn.Parameter]:
        """The expert tables this layer reads: [down, up] (+ lin for readout "glu")."""
        return [self.down, self.up] + ([self.lin] if self.readout == "glu" else [])

    @property
    def table_update(self):
        """Replaces expert_mix when set (same arguments, no backend): an optimizer that updates the
        tables inside the mixing backward installs it (on a shared pool: one whose ``pool`` attribute
        is the layer's pool, which updates the pool once for all its layers). Not part of the state_dict."""
        return self.__dict__.get("_table_update")

    @table_update.setter
    def table_update(self, fn) -> None:
        if fn is not None and self.readout == "glu":
            raise ValueError(
                "the fused table optimizer (train.expert_optimizer=rowwise_adam*, elementwise_adam*) updates "
                "down/up, not a glu read-out's third table: use train.expert_optimizer=adamw or another readout"
            )
        if fn is not None and self.pool is not None and getattr(fn, "pool", None) is not self.pool:
            # stepping the pool inside each layer's backward would step a row once per layer
            raise ValueError(
                "this layer reads a shared pool: its tables take one update from all the pool's layers after "
                "the backward (torchpeer.optim.attach_rowwise_adam, train.expert_optimizer=rowwise_adam*, "
                "elementwise_adam*), not a per-layer mixer (one whose .pool is not this layer's pool)"
            )
        self.__dict__["_table_update"] = fn

    @property
    def column_shard(self):
        """Set by torchpeer.parallel when it shards the tables (absent otherwise)."""
        try:
            return self.__dict__["_column_shard"]
        except KeyError:
            raise AttributeError("column_shard") from None

    @column_shard.setter
    def column_shard(self, ctx) -> None:
        # The column-sharded forward (torchpeer.parallel) computes the paper's layer: it would
        # silently drop these options, so sharding a layer that uses them is an error.
        used = self.beyond_paper_options()
        if ctx is not None and used:
            raise ValueError(f"torchrun (column-sharded PEER) supports the paper's layer only; this one sets {used}")
        self.__dict__["_column_shard"] = ctx

    def beyond_paper_options(self) -> dict[str, object]:
        """{option: value} of the options that change what the layer computes or trains on (readout,
        shared pool, balance term, key init, dense branch), set to other than the paper's; {} for the paper's layer."""
        used = {"readout": self.readout, "shared_pool": self.pool is not None}
        used.update(balance_weight=self.balance_weight, key_init=self.key_init, dense_hidden=self.dense_hidden)
        paper = {
            "readout": "paper",
            "shared_pool": False,
            "balance_weight": 0.0,
            "key_init": "random",
            "dense_hidden": 0,
        }
        return {k: v for k, v in used.items() if v != paper[k]}

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_experts={self.n_experts}, heads={self.heads}, top_k={self.top_k}, "
            f"d_key={self.d_key}, activation={self.activation}, gate={self.gate}, "
            f"query_norm={self.query_norm}, shared_keys={self.shared_keys}, backend={self.backend}, "
            f"up_init_std={self.up_init_std:.4g}"
            + "".join(f", {k}={v}" for k, v in self.beyond_paper_options().items())
            + "".join(f", {k}={getattr(self, k)}" for k in ("key_lr_scale", "query_lr_scale") if getattr(self, k) != 1)
            + (f", key_norm={self.key_norm}" if self.key_norm != "none" else "")
        )

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k experts per head: the ones ``forward`` mixes (same precision rules). In
        training mode it leaves the query norm's running statistics alone (as ``query()`` does; only
        ``forward`` updates them), so a call before the forward gives the forward's experts.

        x: (..., d_model) -> scores (..., heads, top_k) float32 and indices (..., heads, top_k)
        int64 in [0, n_experts), sorted by descending score.
        """
        check_input(x, self.d_model, "PEER", self.router.query_proj.weight.dtype)
        lead = x.shape[:-1]
        with norm_statistics_kept(self.router.norm):  # inspecting is no training step
            _, scores, indices = self.router(x.reshape(-1, self.d_model))
        return scores.view(*lead, self.heads, self.top_k), indices.view(*lead, self.heads, self.top_k)

    def gates(self, scores: torch.Tensor) -> torch.Tensor:
        """Gate weights from retrieved scores (..., heads, top_k), same shape."""
        return scores.softmax(dim=-1) if self.gate == "softmax" else torch.sigmoid(scores)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.d_model, "PEER", self.router.query_proj.weight.dtype)
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.d_model)
        if self._keys_pending and self.training:  # key_init "queries": once, on the first training batch
            init_sub_keys_from_queries(self.router, flat)
            self.keys_initialised.fill_(True)
            self._keys_pending = False
        q, scores, indices = self.router(flat)
        g = self.gates(scores)
        self._track_routing(q, indices, g)
        self.balance_loss = None
        if self.balance_weight > 0 and self.training and torch.is_grad_enabled():
            # the keys as retrieval scored them (normalised with key_norm), so the term pushes what routes
            self.balance_loss = subkey_balance_loss(q, self.router.retrieval_keys(), indices, self.balance_stride)
        compute = autocast_dtype(x.device)
        xc = flat.to(compute) if compute is not None else flat  # mix in the autocast dtype (fp32 master tables)
        act = mix_activation(self.readout, self.activation)
        if self.table_update is not None:  # a fused table optimizer's mixing (e.g. torchpeer.optim)
            y = self.table_update(xc, self.down, self.up, indices, g, act)
        else:
            lin = self.lin if self.readout == "glu" else None
            y = expert_mix(xc, self.down, self.up, indices, g, act, lin=lin, backend=self.backend)
        if self.out_gate is not None:
            y = self.out_gate(xc, y)
        if self.dense is not None:
            y = y + self.dense(flat).to(y.dtype)
        return y.view(*lead, self.d_model)

    def aux_loss(self) -> torch.Tensor | None:
        """``balance_weight * balance_loss`` of the last training forward (what the LM trainer adds
        to the loss); None when the term is off or the last forward was not a training one."""
        if self.balance_loss is None:
            return None
        return self.balance_weight * self.balance_loss

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        flag = prefix + "keys_initialised"
        if self.key_init == "queries" and flag not in state_dict and prefix + "router.sub_keys" in state_dict:
            # A checkpoint from a layer without key_init: its sub-keys are given, never re-initialise them.
            state_dict[flag] = torch.ones((), dtype=torch.bool)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.key_init == "queries":
            self._keys_pending = not bool(self.keys_initialised)

    def op_backends(self, device: torch.device | str | None = None) -> dict[str, str]:
        """{op: backend} this layer runs with on ``device`` (default: where its tables live)."""
        device = device or self.down.device
        mix = resolve_backend("expert_mix", self.backend, device)
        return {"product_key_topk": self.router.retrieval_backend(device), "expert_mix": mix}

    def cost(self) -> FFWCost:
        """Per-token cost: the router's (query projection 2*d*h*d_key, sub-key scores
        2*h*sqrt(N)*d_key, query network and all sub-keys active) plus the experts, h*k*(2d in +
        2d out) FLOPs and h*k u and v rows (glu: 6d FLOPs and a w row more; gated: + the output
        gate's 2 dense d x d matmuls; dense_hidden: + the dense branch's); the balance term's
        training-only FLOPs in aux_train_flops.
        total_params: the layer's own (a shared pool is counted by the LM, once)."""
        d, h, k = self.d_model, self.heads, self.top_k
        rows = rows_per_selection(self.readout)
        routing = self.router.cost()
        extras = [m.cost() for m in (self.out_gate, self.dense) if m is not None]
        aux = 0
        if self.balance_weight > 0:
            aux = balance_train_flops(h, self.n_sub, self.d_key, self.balance_stride)
        return FFWCost(
            total_params=count_params(self),
            active_params=routing.active_params + h * k * rows * d + sum(c.active_params for c in extras),
            forward_flops=routing.forward_flops + h * k * 2 * rows * d + sum(c.forward_flops for c in extras),
            aux_train_flops=aux,
        )

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        """The expert tables (down, up, lin) are read a few rows per token: own lr, no decay by default;
        the router's sub-keys and norm are not decayed (the output gate's matrices are, as any linear layer's)."""
        return {"expert": self.tables(), "no_decay": self.router.optim_groups()["no_decay"]}

    def lr_scales(self) -> list[tuple[float, list[nn.Parameter]]]:
        """(lr multiplier, parameters) for the LM optimizer (torchpeer.lm.optim): the sub-keys at
        key_lr_scale, the query network (projection, norm parameters) at query_lr_scale; scales of 1 omitted."""
        query_net = [*self.router.query_proj.parameters(), *self.router.norm.parameters()]
        pairs = [(self.key_lr_scale, [self.router.sub_keys]), (self.query_lr_scale, query_net)]
        return [(scale, params) for scale, params in pairs if scale != 1.0 and params]


def _check_beyond_paper(
    readout, shared_pool, balance_weight, balance_stride, key_lr_scale, query_lr_scale, key_init, key_norm="none",
    dense_hidden=0,
):  # fmt: skip
    """ValueError/TypeError naming the first bad value of the options beyond the paper."""
    check_choice("readout", readout, READOUTS)
    if not isinstance(shared_pool, bool):
        raise TypeError(f"shared_pool must be true or false, got {shared_pool!r}")
    check_number("balance_weight", balance_weight)
    check_positive(balance_stride=balance_stride)
    check_number("key_lr_scale", key_lr_scale, strict=True)
    check_number("query_lr_scale", query_lr_scale, strict=True)
    check_choice("key_init", key_init, KEY_INITS)
    check_choice("key_norm", key_norm, KEY_NORMS)
    if isinstance(dense_hidden, bool) or not isinstance(dense_hidden, int) or dense_hidden < 0:
        raise ValueError(f"dense_hidden must be 0 (no dense branch) or a positive int width, got {dense_hidden!r}")


register_ffw("peer", PEERConfig, PEER.from_config, build_shared=ExpertPool.from_config)
