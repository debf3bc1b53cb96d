"""scripts/measure_readme.py, its parsing and formatting parts: the numbers of a real tiny
`torchpeer train` run are read from its printed lines and summary.json, agree, and are written to
the JSON + markdown record with the machine's description (the full ~5 min main job is not run)."""

import importlib.util
import json
import os

import pytest
import torch

from torchpeer.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def measure():
    spec = importlib.util.spec_from_file_location("measure_readme", os.path.join(REPO, "scripts", "measure_readme.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_numbers_of_a_real_tiny_run(measure, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("".join(f"a small corpus, line {i} of it.\n" for i in range(800)))
    run_dir = tmp_path / "run"
    overrides = [
        *"--model.d_model 32 --model.n_layers 2 --model.n_heads 2 --model.seq_len 32".split(),
        *"--model.peer.n_experts 64 --model.peer.heads 2 --model.peer.top_k 4 --model.peer.d_key 16".split(),
        *"--train.device cpu --train.batch_size 4 --train.max_steps 4 --train.warmup_steps 1".split(),
        *"--train.checkpoint false --train.tensorboard false --data.tokenizer byte".split(),
        *("--data.train", str(tmp_path / "t.txt"), "--data.cache_dir", str(tmp_path / "cache")),
        *("--data.valid.ptb", str(tmp_path / "t.txt"), "--data.valid.other", str(tmp_path / "t.txt")),
    ]
    assert main(["train", *overrides, "--run-dir", str(run_dir), "--no-progress"]) == 0
    printed = measure.parse_train_stdout(capsys.readouterr().out)
    summary = json.loads((run_dir / "summary.json").read_text())
    numbers = measure.numbers_from_summary(summary)
    assert set(printed) == set(numbers["valid"]) == {"ptb", "other"}
    for name, p in printed.items():
        s = numbers["valid"][name]
        assert abs(p["ppl"] - s["ppl"]) < 0.006 and abs(p["bpb"] - s["bpb"]) < 6e-5
        assert 1 < s["ppl"] < 300 and s["bpb"] > 0
        ((layer, u),) = s["layers"].items()
        assert layer.startswith("blocks.1") and 0 < u["usage_pct"] <= 100 and u["kl"] >= 0
    assert numbers["steps"] == 4 and numbers["tokens"] == 4 * 4 * 32 and numbers["train_seconds"] > 0

    rec = {
        "date": "2026-12-01",
        "started": "2026-12-01T17:40:00+00:00",
        "machine": measure.machine_info(),
        "commit": "abc1234",
        "load_before": 1.5,
        "load_after": 1.75,
        "install_seconds": 65.0,
        "main_job": {"command": "torchpeer train", "threads": "default", "wall_seconds": 216.4, **numbers},
    }
    assert rec["machine"]["torch"] == torch.__version__ and rec["machine"]["cores"] >= 1 and rec["machine"]["cpu"]
    json_path, md_path = measure.write_results(rec, str(tmp_path / "results"))
    assert os.path.basename(json_path) == "readme_numbers_2026-12-01.json"
    assert json.loads(open(json_path).read()) == json.loads(json.dumps(rec))
    md = open(md_path).read()
    ptb = numbers["valid"]["ptb"]
    assert f"| validation perplexity (ptb) | {ptb['ppl']:.2f} |" in md
    assert "3.6 min (216 s)" in md and "| install (`pip install torch==2.13.0 -e .`, new venv) | 65 s |" in md
    assert rec["machine"]["cpu"] in md and "1.50 / 1.75" in md
    text = measure.readme_paragraph(rec)
    assert f"validation perplexity {ptb['ppl']:.2f} per BPE token ({ptb['bpb']:.3f} bits per byte)" in text
    assert "ran 3.6 minutes" in text and "install 65 s" in text and "expert usage" in text
    assert not [f for f in os.listdir(tmp_path / "results") if f.endswith(".tmp")]


def test_printed_line_format(measure):
    text = "step 1\nvalidation perplexity (ptb): 95.51 per token, 1.6228 bits per byte\nother\n"
    assert measure.parse_train_stdout(text) == {"ptb": {"ppl": 95.51, "bpb": 1.6228}}
    assert measure.parse_train_stdout("no numbers here") == {}
