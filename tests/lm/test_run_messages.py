"""The lines a training run prints at its start (torchpeer/lm/run_messages.py)."""

from tests.lm.helpers import write_config, write_corpus
from torchpeer.cli import main
from torchpeer.lm.config import RunConfig
from torchpeer.lm.run_messages import noncausal_note


def test_expert_choice_moe_is_noted_as_not_causal():
    """`--model.ffw moe` trains expert-choice routing by default, which sees later tokens of the batch:
    its perplexity looked like any other model's (the isoFLOP table's expert-choice row is 61.9 against
    token-choice's 69.7) without a word at the start of the run."""
    cfg = RunConfig()
    assert noncausal_note(cfg) is None  # PEER
    cfg.model.ffw = "moe"
    assert noncausal_note(cfg).startswith('note: model.moe.routing = "expert_choice" is not causal')
    assert noncausal_note(cfg).endswith("for a causal MoE give --model.moe.routing token_choice")
    cfg.model.moe.routing = "token_choice"
    assert noncausal_note(cfg) is None


def test_a_moe_run_prints_the_note_at_its_start(tmp_path, capsys):
    write_corpus(tmp_path, train_lines=300, valid_lines=20)
    cfg = write_config(tmp_path, max_steps=1)
    args = ["train", cfg, "--model.ffw", "moe", "--model.moe.n_experts", "4", "--no-progress"]
    assert main([*args, "--run-dir", str(tmp_path / "ec")]) == 0
    assert 'note: model.moe.routing = "expert_choice" is not causal' in capsys.readouterr().out
    assert main([*args, "--model.moe.routing", "token_choice", "--run-dir", str(tmp_path / "tc")]) == 0
    assert "is not causal" not in capsys.readouterr().out
