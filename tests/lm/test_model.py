"""TransformerLM: every FFW kind and placement, a float64 reference forward, causality, KV cache."""

import math

import pytest
import torch
import torch.nn.functional as F

from torchpeer.lm.config import ModelConfig, MoEConfig, PEERConfig, PKMConfig
from torchpeer.lm.model import KVCache, TransformerLM


def tiny(ffw="peer", placement="middle", **kw) -> ModelConfig:
    cfg = ModelConfig(
        d_model=32,
        n_layers=3,
        n_heads=2,
        seq_len=16,
        vocab_size=50,
        ffw=ffw,
        placement=placement,
        peer=PEERConfig(n_experts=64, heads=2, top_k=4, d_key=16),
        pkm=PKMConfig(n_keys=8, heads=2, top_k=4, d_key=16),
        moe=MoEConfig(n_experts=4, d_expert=32),
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("ffw", ["dense", "peer", "pkm", "moe"])
@pytest.mark.parametrize("placement", ["middle", "all", [0, 2]])
def test_forward_backward_every_kind_and_placement(ffw, placement):
    torch.manual_seed(0)
    cfg = tiny(ffw, placement)
    model = TransformerLM(cfg)
    expected = {"middle": [1], "all": [0, 1, 2], tuple([0, 2]): [0, 2]}[
        tuple(placement) if isinstance(placement, list) else placement
    ]
    kinds = [blk.ffw_kind for blk in model.blocks]
    assert kinds == [ffw if (i in expected and ffw != "dense") else "dense" for i in range(3)]
    names = {"dense": "DenseFFW", "peer": "PEER", "pkm": "PKM", "moe": "MoE"}
    assert [type(b.ffw).__name__ for b in model.blocks] == [names[k] for k in kinds]

    x = torch.randint(0, 50, (2, 16))
    logits, loss = model(x, x.roll(-1, 1))
    assert logits.shape == (2, 16, 50)
    assert torch.isfinite(loss) and abs(loss.item() - math.log(50)) < 1.0  # near uniform at init
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    # the sparse layer's own parameters receive gradient
    sparse = model.blocks[expected[0]].ffw
    assert any(p.grad.abs().sum() > 0 for p in sparse.parameters())


def test_middle_placement_index_convention():
    cfg = tiny(n_layers=12)
    assert cfg.sparse_blocks() == [6]  # 0-based n_layers // 2: the paper's middle block of 12
    assert tiny(n_layers=4).sparse_blocks() == [2]
    assert tiny(ffw="dense").sparse_blocks() == []


def test_tied_and_untied_embeddings():
    tied = TransformerLM(tiny("dense"))
    assert tied.lm_head.weight is tied.tok_emb.weight
    untied = TransformerLM(tiny("dense", tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight
    n_tied = sum(p.numel() for p in tied.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == 50 * 32


def _reference_forward(model: TransformerLM, idx: torch.Tensor) -> torch.Tensor:
    """Independent float64 forward: explicit causal softmax attention, complex-number RoPE."""
    cfg = model.cfg
    d, H = cfg.d_model, cfg.n_heads
    hd = d // H
    B, T = idx.shape

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * w

    def rope(x):  # x: (B, T, H, hd), pairs (j, j + hd/2) rotated by pos * base^(-2j/hd)
        half = hd // 2
        z = torch.complex(x[..., :half], x[..., half:])
        theta = cfg.rope_base ** (-torch.arange(half, dtype=torch.float64) * 2 / hd)
        rot = torch.polar(
            torch.ones(T, half, dtype=torch.float64), torch.arange(T, dtype=torch.float64)[:, None] * theta
        )
        z = z * rot[None, :, None, :]
        return torch.cat([z.real, z.imag], dim=-1)

    sd = {k: v.double() for k, v in model.state_dict().items()}
    x = sd["tok_emb.weight"][idx]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = (h @ sd[p + "attn.qkv.weight"].T).split(d, dim=-1)
        q, k, v = (t.reshape(B, T, H, hd) for t in (q, k, v))
        q, k = rope(q), rope(k)
        att = torch.einsum("bthe,bshe->bhts", q, k) / math.sqrt(hd)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        y = torch.einsum("bhts,bshe->bthe", att, v).reshape(B, T, d)
        x = x + y @ sd[p + "attn.proj.weight"].T
        h = rms(x, sd[p + "norm2.weight"])
        x = x + F.gelu(h @ sd[p + "ffw.fc_in.weight"].T) @ sd[p + "ffw.fc_out.weight"].T
    x = rms(x, sd["norm_f.weight"])
    return x @ sd["tok_emb.weight"].T


def test_forward_matches_float64_reference():
    torch.manual_seed(1)
    model = TransformerLM(tiny("dense")).double()
    with torch.no_grad():  # non-trivial norm weights so that they are exercised
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    idx = torch.randint(0, 50, (2, 16))
    logits, _ = model(idx)
    ref = _reference_forward(model, idx)
    torch.testing.assert_close(logits.double(), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("ffw", ["dense", "peer", "pkm"])
def test_causal(ffw):
    torch.manual_seed(2)
    model = TransformerLM(tiny(ffw)).eval()  # eval: BatchNorm uses running stats, per position
    idx = torch.randint(0, 50, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 7) % 50
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("ffw", ["dense", "peer", "pkm"])
def test_kv_cache_logits_match_full_forward(ffw):
    torch.manual_seed(3)
    model = TransformerLM(tiny(ffw)).eval()
    idx = torch.randint(0, 50, (2, 12))
    full, _ = model(idx)
    cache = KVCache(model.cfg, 2, 16)
    parts = [model(idx[:, :5], cache=cache)[0]]  # prefill of 5, then chunks of 1 and 6
    parts.append(model(idx[:, 5:6], cache=cache)[0])
    parts.append(model(idx[:, 6:], cache=cache)[0])
    assert cache.pos == 12
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"ffw": "mlp"}, "unknown FFW kind"),
        ({"placement": [5]}, "placement"),
        ({"placement": "top"}, "placement"),
        ({"n_heads": 3}, "divisible"),
        ({"vocab_size": None}, "vocab_size"),
    ],
)
def test_bad_model_config(change, match):
    cfg = tiny()
    for k, v in change.items():
        setattr(cfg, k, v)
    with pytest.raises(ValueError, match=match):
        TransformerLM(cfg)


def test_odd_placement_is_every_second_block_from_block_1_at_any_depth():
    from torchpeer.lm.config import ModelConfig

    for n, blocks in ((2, [1]), (3, [1]), (4, [1, 3]), (8, [1, 3, 5, 7]), (10, [1, 3, 5, 7, 9])):
        assert ModelConfig(n_layers=n, placement="odd").sparse_blocks() == blocks
    with pytest.raises(ValueError, match=r"placement='odd' is not valid; use .*odd \(2\+ blocks\)"):
        ModelConfig(n_layers=1, placement="odd").validate()
    with pytest.raises(ValueError, match="placement='even' is not valid"):
        ModelConfig(placement="even").validate()
