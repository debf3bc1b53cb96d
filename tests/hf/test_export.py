"""export-hf: a tiny torchpeer run as a transformers model folder, loaded back both ways, offline."""

import json
import os
import shutil

import pytest
import torch

from torchpeer.hf import export_hf, is_exported_folder, load_exported
from torchpeer.lm import generate, load_model_from_checkpoint

PROMPTS = ["the cat sat", "a dog ran f"]  # equal byte lengths: one unpadded batch


@pytest.fixture(scope="module")
def exported(make_run, tmp_path_factory):
    """(run dir, export folder) of the tiny PEER run."""
    run = make_run("peer")
    out = str(tmp_path_factory.mktemp("export") / "tiny-peer")
    export_hf(run, out)
    return run, out


def load_hf(out):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()


def prompt_ids(texts) -> torch.Tensor:
    return torch.tensor([[256] + list(t.encode()) for t in texts])  # byte tokenizer, eot first


def test_folder_layout(exported):
    _, out = exported
    names = set(os.listdir(out))
    expected = {"config.json", "configuration_torchpeer.py", "modeling_torchpeer.py", "model.safetensors"}
    assert expected | {"tokenizer.json", "tokenizer_config.json", "torchpeer_tokenizer"} <= names
    assert not [n for n in os.listdir(os.path.dirname(out)) if n.endswith(".tmp")]
    with open(os.path.join(out, "config.json")) as fh:
        cfg = json.load(fh)
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_torchpeer.TorchpeerForCausalLM"
    assert cfg["model_type"] == "torchpeer" and cfg["torchpeer"]["model"]["ffw"] == "peer"
    assert cfg["eos_token_id"] == 256 and is_exported_folder(out)
    # safetensors writes 0600: the weights get the mode of every other file (others can load the model)
    modes = {name: os.stat(os.path.join(out, name)).st_mode & 0o777 for name in ("config.json", "model.safetensors")}
    assert modes["model.safetensors"] == modes["config.json"], modes


def test_logits_equal_torchpeer_with_and_without_cache(exported):
    from transformers import DynamicCache

    run, out = exported
    ref, _, _ = load_model_from_checkpoint(run)
    hf = load_hf(out)
    assert sorted(hf.state_dict()) == sorted("model." + k for k in ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(hf.state_dict()["model." + k], v), k
    ids = prompt_ids(PROMPTS)
    with torch.no_grad():
        want = ref(ids)[0]
        assert torch.allclose(hf(ids).logits, want, atol=1e-5, rtol=0)
        assert torch.allclose(hf(ids, use_cache=True).logits, want, atol=1e-5, rtol=0)
        # Incremental decoding through the transformers Cache: prefill 4 tokens, then one at a time.
        cache = DynamicCache()
        steps = [hf(ids[:, :4], cache=cache, use_cache=True).logits]
        for t in range(4, ids.shape[1]):
            steps.append(hf(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
        assert cache.get_seq_length() == ids.shape[1]
        assert torch.allclose(torch.cat(steps, 1), want, atol=1e-5, rtol=0)
        labels = ids.clone()
        loss = hf(ids, labels=labels).loss
        want_loss = torch.nn.functional.cross_entropy(want[:, :-1].reshape(-1, want.shape[-1]), ids[:, 1:].reshape(-1))
        assert torch.allclose(loss, want_loss, atol=1e-6)


def test_padding_mask_matches_unpadded(exported):
    _, out = exported
    hf = load_hf(out)
    ids = prompt_ids(["the cat"])
    padded = torch.cat([torch.full((1, 3), 256), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    with torch.no_grad():
        # Left padding shifts absolute positions (RoPE is relative in q.k), so the logits agree.
        a = hf(padded, attention_mask=mask).logits[:, 3:]
        b = hf(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_greedy_generate_equals_torchpeer(exported):
    run, out = exported
    ref, _, _ = load_model_from_checkpoint(run)
    hf = load_hf(out)
    ids = prompt_ids(PROMPTS)
    want = generate(ref, ids, 20, temperature=0, stop_token=256)
    got = hf.generate(ids, max_new_tokens=20, do_sample=False)
    assert got.shape[1] > ids.shape[1]
    assert torch.equal(got, want)
    assert torch.equal(hf.generate(ids, max_new_tokens=20, do_sample=False, use_cache=False), want)


def test_auto_tokenizer_matches_byte_tokenizer(exported):
    from transformers import AutoTokenizer

    from torchpeer.data import ByteTokenizer

    _, out = exported
    tok = AutoTokenizer.from_pretrained(out)
    byte = ByteTokenizer()
    text = "naïve café — 日本 <b>x</b>\n  two  spaces"
    assert tok(text)["input_ids"] == byte.encode(text)
    assert tok.eos_token_id == 256 and len(tok) == 257
    ids = [256] + byte.encode(text)
    assert tok.decode(ids) == byte.decode(ids)


def test_bpe_tokenizer_files(tmp_path):
    from transformers import AutoTokenizer

    from torchpeer.data.tokenizer import EOT_TEXT, HFTokenizer, train_bpe
    from torchpeer.hf.tokenizer_files import write_tokenizer

    docs = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 20
    tp_tok = HFTokenizer(train_bpe(docs, 300, progress=False), "bpe-300", EOT_TEXT)
    write_tokenizer(str(tmp_path), tp_tok, seq_len=64)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "the cat and the dog sat"
    assert tok(text)["input_ids"] == tp_tok.encode(text)
    assert len(tp_tok.encode(text)) < len(text)  # merges were learnt and kept
    assert tok.eos_token_id == tp_tok.eot_id
    assert tok.decode(tp_tok.encode(text)) == text


@pytest.mark.parametrize("ffw", ["dense", "pkm", "moe"])
def test_other_ffw_kinds_export_with_equal_logits(ffw, make_run, tmp_path):
    run = make_run(ffw)
    out = str(tmp_path / "out")
    export_hf(run, out)
    ref, _, _ = load_model_from_checkpoint(run)
    hf = load_hf(out)
    ids = prompt_ids(PROMPTS)
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ref(ids)[0], atol=1e-5, rtol=0)
    assert hf.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, ids.shape[1] + 3)
    tied = hf.model.lm_head.weight is hf.model.tok_emb.weight
    assert tied == ref.cfg.tie_embeddings == (ffw != "dense")  # the dense run is the untied one


def test_a_logit_prior_exports_as_the_heads_bias(train_file, tmp_path):
    """model.logit_prior: the head's bias travels as model.lm_head.bias; the transformers model's logits
    equal torchpeer's with and without its cache (the cached path calls the head itself), and loading
    the export back into torchpeer keeps the bias."""
    from transformers import DynamicCache

    from tests.hf.conftest import tiny_run_config
    from torchpeer.lm import RunConfig, train

    raw = tiny_run_config(train_file, str(tmp_path / "cache"), "peer")
    raw["model"]["logit_prior"] = "unigram"
    run, out = str(tmp_path / "run"), str(tmp_path / "out")
    train(RunConfig.from_dict(raw), run, progress=False)
    export_hf(run, out)
    ref, _, _ = load_model_from_checkpoint(run)
    assert ref.lm_head.bias is not None and ref.lm_head.bias.std() > 1  # log frequencies, not zeros
    hf = load_hf(out)
    assert torch.equal(hf.state_dict()["model.lm_head.bias"], ref.lm_head.bias)
    ids = prompt_ids(PROMPTS)
    with torch.no_grad():
        want = ref(ids)[0]
        assert torch.allclose(hf(ids).logits, want, atol=1e-5, rtol=0)
        cache = DynamicCache()
        steps = [hf(ids[:, :4], cache=cache, use_cache=True).logits]
        steps += [hf(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(4, ids.shape[1])]
        assert torch.allclose(torch.cat(steps, 1), want, atol=1e-5, rtol=0)
        model, _, _ = load_exported(out)
        assert torch.equal(model(ids)[0], want)


def test_load_exported_back_into_torchpeer(exported):
    from torchpeer.data import ByteTokenizer
    from torchpeer.lm import TransformerLM

    run, out = exported
    ref, ref_cfg, _ = load_model_from_checkpoint(run)
    model, tok, cfg = load_exported(out)
    assert isinstance(model, TransformerLM) and not model.training
    assert isinstance(tok, ByteTokenizer) and cfg.model == ref_cfg.model
    ids = prompt_ids(PROMPTS)
    with torch.no_grad():
        assert torch.equal(model(ids)[0], ref(ids)[0])
    assert model.lm_head.weight is model.tok_emb.weight  # tied embeddings stay tied


def test_bad_inputs(tmp_path, exported):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        export_hf(str(empty), str(tmp_path / "o1"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_hf(str(tmp_path / "missing"), str(tmp_path / "o2"))
    run, out = exported
    with pytest.raises(FileExistsError, match="already exists"):
        export_hf(run, out)
    export_hf(run, out, overwrite=True)
    assert is_exported_folder(out)
    assert not [n for n in os.listdir(os.path.dirname(out)) if n.endswith((".tmp", ".old"))]
    assert not is_exported_folder(str(empty)) and not is_exported_folder(run)
    with pytest.raises(ValueError, match="not an exported torchpeer model"):
        load_exported(run)  # a run folder's config.json has no "torchpeer" section
    from torchpeer.hf import from_pretrained  # (for peerified models): names the two loaders of an export,

    # instead of transformers asking on stdin whether to run the folder's code, then a ValueError
    with pytest.raises(ValueError, match=r"is a torchpeer export-hf folder, not a peerified .*hf\.load_exported\("):
        from_pretrained(out)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_exported_model_fine_tunes_with_trainer_and_saves(exported, tmp_path):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    _, out = exported
    hf = load_hf(out)
    ids = prompt_ids(["the cat sat on a mat"] * 8)
    data = [{"input_ids": row, "labels": row} for row in ids]
    with torch.no_grad():
        before = hf(ids, labels=ids).loss.item()
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    Trainer(model=hf, args=args, train_dataset=data).train()
    hf.eval()
    with torch.no_grad():
        after = hf(ids, labels=ids).loss
        assert after.item() < before
        saved = str(tmp_path / "tuned")
        hf.save_pretrained(saved)
        assert {"modeling_torchpeer.py", "configuration_torchpeer.py"} <= set(os.listdir(saved))
        again = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True).eval()
        assert torch.equal(again(ids).logits, hf(ids).logits)
        model, _, _ = load_exported(saved)  # and back into torchpeer after fine-tuning
        assert torch.allclose(model(ids)[0], hf(ids).logits, atol=1e-5, rtol=0)


def test_continued_training_from_export(exported, tmp_path):
    from torchpeer.hf import continue_from_exported
    from torchpeer.lm import train

    _, out = exported
    exported_model, _, _ = load_exported(out)
    cfg, init_from = continue_from_exported(out, ["--train.max_steps", "1", "--train.lr", "1e-12"])
    assert cfg.train.max_steps == 1  # tiny lr: the one step keeps the initial weights
    run = str(tmp_path / "continued")
    train(cfg, run, progress=False, init_from=init_from)
    continued, _, _ = load_model_from_checkpoint(run)
    for k, v in exported_model.state_dict().items():
        # query-norm running statistics update in a training step
        stats = ("running_mean", "running_var", "running_cov", "whitener", "num_batches_tracked", "num_updates")
        if not k.endswith(stats):
            assert torch.allclose(continued.state_dict()[k], v, atol=1e-8, rtol=0), k
    with pytest.raises(ValueError, match="different model"):
        continue_from_exported(out, ["--model.d_model", "64"])


def test_continued_training_keeps_a_bpe_tokenizer(tmp_path, train_file):
    from tests.hf.conftest import tiny_run_config
    from torchpeer.hf import continue_from_exported
    from torchpeer.lm import RunConfig, train
    from torchpeer.lm.checkpoint import latest_checkpoint, load_checkpoint_tokenizer

    raw = tiny_run_config(train_file, str(tmp_path / "cache"), "dense", steps=1)
    raw["data"].update(tokenizer="bpe", vocab_size=300)
    train(RunConfig.from_dict(raw), str(tmp_path / "run"), progress=False)
    out = str(tmp_path / "export")
    export_hf(str(tmp_path / "run"), out)
    _, tok, _ = load_exported(out)
    cfg, init_from = continue_from_exported(out)
    assert cfg.data.tokenizer.startswith("gpt2:")  # read from the export, not retrained
    summary = train(cfg, str(tmp_path / "more"), progress=False, init_from=init_from)
    assert summary["steps"] == 1
    assert load_checkpoint_tokenizer(latest_checkpoint(str(tmp_path / "more"))).fingerprint == tok.fingerprint


def test_left_padded_batch_generate_equals_one_by_one(exported):
    from transformers import AutoTokenizer

    _, out = exported
    hf = load_hf(out)
    tok = AutoTokenizer.from_pretrained(out, padding_side="left")
    texts = ["<|endoftext|>the cat", "<|endoftext|>a dog ran far"]
    batch = tok(texts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0  # the short prompt is padded
    got = hf.generate(**batch, max_new_tokens=10, do_sample=False)
    for row, text in zip(got, texts):
        single = tok(text, return_tensors="pt")
        want = hf.generate(**single, max_new_tokens=10, do_sample=False)[0]
        n = single["input_ids"].shape[1]
        new = row[batch["input_ids"].shape[1] :]
        assert torch.equal(new[: len(want) - n], want[n:])


def test_exported_peer_layers_run_torchpeer_triton_kernels(exported, tmp_path):
    """The remote code builds torchpeer's own layers, so the kernel choice is torchpeer's: "auto" is
    Triton on CUDA; here "triton" is asked for explicitly and runs in the Triton interpreter."""
    from torchpeer.layers import backend_report

    run, out = exported
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA)")
    folder = str(tmp_path / "triton")
    shutil.copytree(out, folder)
    with open(os.path.join(folder, "config.json")) as fh:
        cfg = json.load(fh)
    cfg["torchpeer"]["model"]["peer"]["backend"] = "triton"
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    hf = load_hf(folder)
    assert backend_report(hf.model)["blocks.1.ffw"] == {"product_key_topk": "triton", "expert_mix": "triton"}
    ref, _, _ = load_model_from_checkpoint(run)
    assert set(backend_report(ref)["blocks.1.ffw"].values()) == {"torch"}
    ids = prompt_ids(PROMPTS[:1])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ref(ids)[0], atol=1e-5, rtol=0)
