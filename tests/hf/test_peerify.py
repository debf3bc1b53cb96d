"""peerify: PEER in place of the MLP of chosen blocks of GPT-2 / Llama / Qwen2 models (tiny, local)."""

import inspect
import sys

import pytest
import torch
from torch import nn

from torchpeer import PEER
from torchpeer.hf import decoder_blocks, from_pretrained, peerify

PEER_KW = dict(n_experts=64, heads=2, top_k=4, d_key=16)
VOCAB = 64


def tiny_model(family: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    ids = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64, **ids)
        return tf.GPT2LMHeadModel(cfg)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    sizes.update(num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=64, **ids)
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**sizes))
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(**sizes))


FAMILIES = ["gpt2", "llama", "qwen2"]


def pattern_batch(n: int = 8, T: int = 16) -> torch.Tensor:
    """Learnable sequences: token t+1 = token t + 1 (mod vocab), random starts."""
    start = torch.randint(1, VOCAB, (n, 1), generator=torch.Generator().manual_seed(1))
    return (start + torch.arange(T)) % VOCAB


@pytest.mark.parametrize("family", FAMILIES)
def test_peerify_replaces_mlp_forward_backward_and_plain_loop(family):
    model = tiny_model(family)
    _, _, blocks = decoder_blocks(model)
    kept = blocks[0].mlp
    assert peerify(model, blocks=[1], **PEER_KW) is model
    assert isinstance(blocks[1].mlp, PEER) and blocks[0].mlp is kept and not isinstance(kept, PEER)
    assert model.config.peer["blocks"] == [1] and model.config.peer["n_experts"] == 64
    default_norm = inspect.signature(PEER).parameters["query_norm"].default
    assert model.config.peer["query_norm"] == default_norm  # PEER defaults are recorded too

    ids = pattern_batch()
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    peer = blocks[1].mlp
    for name in ("down", "up", "sub_keys"):
        g = getattr(peer, name).grad
        assert g is not None and g.abs().sum() > 0, name
    assert peer.query_proj.weight.grad.abs().sum() > 0
    model.zero_grad()

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        final = model(input_ids=ids, labels=ids).loss.item()
    assert final < losses[0]


def _eval_loss(model, ids) -> float:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_trainer_lowers_loss(family, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = peerify(tiny_model(family), blocks=[0, 1], **PEER_KW)
    ids = pattern_batch(16)
    data = [{"input_ids": row, "labels": row} for row in ids]
    before = _eval_loss(model, ids)
    down0 = decoder_blocks(model)[2][0].mlp.down.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=3,
        learning_rate=1e-2,
        warmup_steps=0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    assert _eval_loss(model, ids) < before
    assert not torch.equal(decoder_blocks(model)[2][0].mlp.down, down0)  # the expert table was trained


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_round_trip_and_generate(family, tmp_path):
    model = peerify(tiny_model(family), blocks=[1], **PEER_KW)
    ids = pattern_batch(4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()  # one step: BatchNorm stats and weights move off init
    opt.step()
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(str(tmp_path))
    assert type(loaded) is type(model) and not loaded.training
    assert isinstance(decoder_blocks(loaded)[2][1].mlp, PEER)
    assert loaded.config.peer == model.config.peer
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    prompt = ids[:2, :5]
    cached = loaded.generate(prompt, max_new_tokens=6, do_sample=False)
    uncached = loaded.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape[1] > 5 and torch.equal(cached, uncached)
    assert torch.equal(cached, model.generate(prompt, max_new_tokens=6, do_sample=False))
    # what the README warns of: transformers' own loader builds the plain model, a new MLP in block 1
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert not isinstance(decoder_blocks(plain)[2][1].mlp, PEER)


def test_peer_follows_model_dtype():
    model = tiny_model("llama").to(torch.bfloat16)
    peerify(model, blocks=[0], **PEER_KW)
    peer = decoder_blocks(model)[2][0].mlp
    assert peer.down.dtype == torch.bfloat16
    out = model(input_ids=pattern_batch(2)).logits
    assert torch.isfinite(out.float()).all()


def test_unsupported_model_is_one_clear_error():
    import transformers as tf

    bert = tf.BertModel(
        tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=64)
    )
    with pytest.raises(ValueError, match=r"does not recognise BertModel.*GPT-2.*Llama/Qwen2"):
        peerify(bert, blocks=[0], **PEER_KW)
    with pytest.raises(ValueError, match="does not recognise Linear"):
        peerify(nn.Linear(2, 2), blocks=[0])


def test_bad_blocks_and_settings():
    model = tiny_model("gpt2")
    msg = r"block index 2 is out of range: this GPT-2 model has 2 decoder blocks \(0..1\)"
    with pytest.raises(ValueError, match=msg):
        peerify(model, blocks=[2], **PEER_KW)
    with pytest.raises(ValueError, match="out of range"):
        peerify(model, blocks=[-1], **PEER_KW)
    with pytest.raises(TypeError, match="non-empty list"):
        peerify(model, blocks=[], **PEER_KW)
    with pytest.raises(TypeError, match=r"unknown PEER setting\(s\) \['n_expert'\]"):
        peerify(model, blocks=[0], n_expert=64)
    with pytest.raises(ValueError, match="perfect square"):
        peerify(model, blocks=[0], n_experts=60)
    assert not getattr(model.config, "peer", None)  # nothing changed by the failed calls
    with pytest.raises(TypeError, match='"middle" or "all"'):
        peerify(model, blocks="last", **PEER_KW)
    peerify(model, blocks=0, **PEER_KW)
    with pytest.raises(ValueError, match="already peerified"):
        peerify(model, blocks=[1], **PEER_KW)


@pytest.mark.parametrize("blocks, expected", [("middle", [1]), ("all", [0, 1])])
def test_blocks_by_placement_name(blocks, expected):
    """blocks="middle" / "all" as the LM configs' placement: block n // 2 (the paper's) or every block."""
    model = peerify(tiny_model("gpt2"), blocks=blocks, **PEER_KW)
    assert model.config.peer["blocks"] == expected
    _, _, layers = decoder_blocks(model)
    assert [i for i, b in enumerate(layers) if isinstance(b.mlp, PEER)] == expected


def test_without_transformers_one_import_error(monkeypatch, tmp_path):
    import torchpeer.hf as hf

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[hf\]'"):
        hf.from_pretrained(str(tmp_path))
    with pytest.raises(ImportError, match=r"pip install -e '\.\[hf\]'"):
        hf.export_hf(str(tmp_path), str(tmp_path / "out"))


def test_recognised_by_structure_base_models_and_mistral():
    import transformers as tf

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    sizes.update(num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=64)
    cases = [
        (tf.GPT2Model(tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=64)), "GPT-2", "h"),
        (tf.LlamaModel(tf.LlamaConfig(**sizes)), "Llama/Qwen2", "layers"),
        (tf.MistralForCausalLM(tf.MistralConfig(**sizes)), "Llama/Qwen2", "model.layers"),
    ]
    for model, family, path in cases:
        assert decoder_blocks(model)[:2] == (family, path)
        peerify(model, blocks=[1], **PEER_KW)
        assert isinstance(decoder_blocks(model)[2][1].mlp, PEER)
        out = model(input_ids=pattern_batch(2))
        y = out.logits if "logits" in out else out.last_hidden_state
        assert y.shape[:2] == (2, 16) and torch.isfinite(y).all()
