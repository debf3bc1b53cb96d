"""Sampling and generation: filters, cached vs uncached decoding, `torchpeer eval` / `generate`
on a trained run (seeded, greedy, streamed), and one clear error per bad sampling option."""

import json
import os
import select
import time

import pytest
import torch

from tests.lm.helpers import cli_subprocess
from tests.lm.test_model import tiny
from torchpeer.cli import main
from torchpeer.lm.generate import generate, sample_next
from torchpeer.lm.model import TransformerLM


@pytest.mark.parametrize("ffw", ["dense", "peer"])
def test_greedy_generation_with_cache_equals_without(ffw):
    torch.manual_seed(4)
    model = TransformerLM(tiny(ffw)).eval()
    prompt = torch.randint(0, 50, (2, 3))
    with_cache = generate(model, prompt, 13, temperature=0, use_cache=True)  # fills seq_len = 16
    without = generate(model, prompt, 13, temperature=0, use_cache=False)
    assert with_cache.shape == (2, 16)
    assert torch.equal(with_cache, without)
    # beyond seq_len the cache slides; generation keeps going
    longer = generate(model, prompt, 30, temperature=0)
    assert longer.shape == (2, 33) and torch.equal(longer[:, :16], with_cache)


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}
    # top_p: p = softmax = [.64, .24, .09, .03, .01]; 0.8 keeps the first two tokens
    draws = {sample_next(logits, 1.0, top_p=0.8, generator=g).item() for _ in range(200)}
    assert draws == {0, 1}
    assert sample_next(logits, 0).item() == 0
    with pytest.raises(ValueError, match="temperature"):
        sample_next(logits, -1.0)


def test_eval_cli(trained, capsys, tmp_path):
    root, cfg, run = trained
    out = str(tmp_path / "e.json")
    args = ["eval", run, "--data", f"a={root}/valid.txt", "--data", f"b={root}/train.txt", "--out", out]
    assert main([*args, "--max-batches", "3", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "blocks.1.ffw" in text and "bpb" in text
    # the routing diagnostics: a table, one row per statistic and one column per set and layer
    lines = text.splitlines()
    head = lines.index(next(line for line in lines if line.startswith("routing ")))
    assert lines[head].split() == ["routing", "a", "blocks.1.ffw", "b", "blocks.1.ffw"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[head + 2 :] if not line.startswith("wrote ")}
    assert {"head_overlap", "query_eff_rank", "gate_entropy"} <= set(rows) and all(len(v) == 2 for v in rows.values())
    assert max(len(line) for line in lines) < 100  # no ~500-character line
    res = json.load(open(out))["results"]
    overlap = res["a"]["routing"]["blocks.1.ffw"]["head_overlap"]
    assert float(rows["head_overlap"][0]) == pytest.approx(overlap, rel=1e-3)
    assert set(res) == {"a", "b"} and 0 < res["a"]["routing"]["blocks.1.ffw"]["usage_pct"] <= 100
    assert res["a"]["tokens"] == 3 * 8 * 32 and not res["a"]["complete"]
    summary = json.load(open(os.path.join(run, "summary.json")))
    assert main(["eval", run, "--out", out, "--no-progress"]) == 0  # default: the config's valid sets
    full = json.load(open(out))["results"]["v"]
    assert full["loss"] == pytest.approx(summary["valid"]["v"]["loss"], rel=1e-6)


def test_generate_cli(trained, capsys):
    root, cfg, run = trained
    args = ["generate", run, "--prompt", "the cat", "--max-new-tokens", "40", "--seed", "3"]
    assert main(args) == 0
    a, err = capsys.readouterr()
    assert a.startswith("the cat") and len(a) > len("the cat") + 10
    # 1 + 7 prompt tokens + 40 > seq_len 32: it says that it goes on with a sliding window
    assert err == (
        "note: the prompt (8 tokens) and up to 40 new ones exceed the model's context (seq_len 32, the longest it "
        "was trained on); beyond it each new token sees only the last 16-32 tokens (a sliding window)\n"
    )
    assert main([*args[:5], "24", "--no-cache"]) == 0  # 8 + 24 fits: no note
    assert capsys.readouterr().err == ""
    assert main([*args[:5], "25", "--no-cache"]) == 0
    assert "sees only the last 32 tokens (a sliding window)" in capsys.readouterr().err
    assert main(args) == 0
    assert capsys.readouterr().out == a  # seeded
    assert main(["generate", run, "--prompt", "the", "--temperature", "0", "--max-new-tokens", "20"]) == 0
    greedy = capsys.readouterr().out
    assert main(["generate", run, "--prompt", "the", "--temperature", "0", "--max-new-tokens", "20", "--no-cache"]) == 0
    assert capsys.readouterr().out == greedy
    # the fixed-shape step a CUDA graph replays (decode_graph.py), run eagerly: the same text
    assert (
        main(["generate", run, "--prompt", "the", "--temperature", "0", "--max-new-tokens", "20", "--decode", "static"])
        == 0
    )
    assert capsys.readouterr().out == greedy


def test_a_prompt_that_is_no_tensor_of_token_ids_is_one_clear_error():
    """A list (tok.encode's), float ids or an id past the vocabulary gave AttributeError "'list' object
    has no attribute 'dim'", the embedding's dtype error or "index out of range in self"."""
    model = TransformerLM(tiny("dense")).eval()
    vocab = model.cfg.vocab_size
    with pytest.raises(TypeError, match="got a list: torch.tensor"):
        generate(model, [1, 2, 3], 2)
    with pytest.raises(TypeError, match="integer token ids"):
        generate(model, torch.ones(1, 3), 2)
    with pytest.raises(ValueError, match=rf"token ids 1..{vocab}, outside the model's vocabulary 0..{vocab - 1}"):
        generate(model, torch.tensor([[1, vocab]]), 2)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(model, torch.tensor([[-1, 2]]), 2)
    assert generate(model, torch.tensor([[1, vocab - 1]], dtype=torch.int32), 2, temperature=0).shape == (1, 4)


def test_generate_calls_on_token_with_each_new_column():
    torch.manual_seed(5)
    model = TransformerLM(tiny("dense")).eval()
    prompt = torch.randint(0, 50, (2, 3))
    seen = []
    out = generate(model, prompt, 7, temperature=0, on_token=lambda nxt: seen.append(nxt.clone()))
    assert len(seen) == 7 and all(s.shape == (2, 1) for s in seen)
    assert torch.equal(torch.cat([prompt, *seen], dim=1), out)
    with pytest.raises(ValueError, match="idx must be"):
        generate(model, prompt[:0], 3)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="top_k must be a positive integer"):
            sample_next(torch.zeros(1, 5), 1.0, top_k=bad)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-samples", "0"], "--num-samples must be >= 1, got 0"),
        (["--top-k", "0"], "--top-k must be >= 1, got 0 (omit --top-k"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
        (["--temperature", "-0.5"], "--temperature must be >= 0"),
        (["--decode", "static", "--no-cache"], "--decode static decodes on the KV cache: drop --no-cache"),
        (["--decode", "graph", "--device", "cpu"], "--decode graph needs a CUDA device (this run is on cpu)"),
    ],
)
def test_generate_rejects_bad_options(trained, capsys, flags, message):
    root, cfg, run = trained
    assert main(["generate", run, *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {err[7:]}" and message in err and err.count("\n") == 1


def test_generate_streams_text_as_it_comes(trained):
    """With a budget that takes long to finish, text arrives on the pipe while generation is running."""
    root, cfg, run = trained
    p = cli_subprocess("generate", run, "--prompt", "the cat", "--max-new-tokens", "1000000", "--device", "cpu")
    try:
        got, deadline = b"", time.time() + 60
        while time.time() < deadline and len(got) < len("the cat") + 20:
            ready, _, _ = select.select([p.stdout], [], [], 1.0)
            if ready:
                got += os.read(p.stdout.fileno(), 4096)
        assert p.poll() is None, "generation finished: nothing shows streaming"
        assert got.startswith(b"the cat") and len(got) >= len("the cat") + 20
    finally:
        p.kill()
        p.wait()


def test_ctrl_c_while_streaming_ends_the_text_line(trained, capsys, monkeypatch):
    """Ctrl-C mid-generation: the streamed text gets its line break, then "interrupted" on a line of
    its own (not glued to the last word), exit status 130."""
    import importlib

    lm_generate = importlib.import_module("torchpeer.lm.generate")  # the module (torchpeer.lm.generate is the function)
    root, cfg, run = trained

    def interrupted_generate(model, idx, *args, on_token=None, **kw):
        for t in (ord("a"), ord("b")):  # byte tokenizer: two characters arrive, then Ctrl-C
            on_token(torch.tensor([[t]]))
        raise KeyboardInterrupt

    monkeypatch.setattr(lm_generate, "generate", interrupted_generate)
    assert main(["generate", run, "--prompt", "the cat ", "--max-new-tokens", "10"]) == 130
    out, err = capsys.readouterr()
    assert out == "the cat ab\n" and err == "interrupted\n"


def test_the_readme_python_lines_that_load_a_run(trained, capsys):
    """The README's `py` block that loads a trained run, run on the tiny run as written."""
    import re

    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "README.md")
    with open(readme, encoding="utf-8") as fh:
        blocks = re.findall(r"```py\n(.*?)```", fh.read(), flags=re.S)
    code = next(b for b in blocks if "load_model_from_checkpoint" in b)
    root, cfg, run = trained
    exec(compile(code.replace('"runs/ptb-tiny"', repr(run)), "README.md", "exec"), {})
    text = capsys.readouterr().out
    assert len(text) > 10  # 20 greedy tokens of the byte tokenizer, and a line break
    # the same greedy continuation as the command line's
    assert main(["generate", run, "--prompt", "the company said", "--temperature", "0", "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out == "the company said" + text


def test_the_context_note_counts_one_token_as_one():
    """`torchpeer generate RUN` without --prompt (the prompt is the start token alone) said "the
    prompt (1 tokens) and up to 200 new ones"."""
    from torchpeer.lm.generate import context_note

    assert context_note(1, 200, 128).startswith("note: the prompt (1 token) and up to 200 new ones exceed")
    assert context_note(128, 1, 128).startswith("note: the prompt (128 tokens) and up to 1 new one exceed")
    assert context_note(1, 127, 128) is None
