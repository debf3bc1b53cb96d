"""Damaged checkpoints, with real files: the newest checkpoint of a trained run truncated or with one
flipped bit, in its weights (model.safetensors) or its trainer state (trainer.pt). eval, generate
and resume name the damaged file in one line and fall back to the intact older checkpoint (resume
then equals the uninterrupted run); a damaged checkpoint given by name, or a run without any
intact checkpoint, is one error line with exit status 2 and nothing is changed. Checkpoints
written before checksums.json existed still load, and their damage is still caught."""

import hashlib
import os
import shutil

import pytest

from tests.lm.helpers import losses
from torchpeer.cli import main

DAMAGE = [
    ("model.safetensors", "truncated"),
    ("model.safetensors", "bit-flipped"),
    ("trainer.pt", "truncated"),
    ("trainer.pt", "bit-flipped"),
]
WHY = {"truncated": "is truncated (", "bit-flipped": "differs from what was written (SHA-256 mismatch"}


def damage(path: str, how: str) -> None:
    """Cut a file to half its size, or flip one bit three quarters in (inside the tensor data, past
    the headers: safetensors and torch.load would read such a file without complaint)."""
    data = bytearray(open(path, "rb").read())
    if how == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) * 3 // 4] ^= 0x10
    with open(path, "wb") as fh:
        fh.write(bytes(data))


def sha(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def tree(folder) -> dict:
    """{relative path: sha256} of every file under ``folder``."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            out[os.path.relpath(os.path.join(dirpath, f), folder)] = sha(os.path.join(dirpath, f))
    return out


@pytest.fixture
def damaged_run(trained, tmp_path, request):
    """A copy of the trained run (checkpoints step_50, step_60) with step_60's ``file`` damaged."""
    file, how = request.param
    run = str(tmp_path / "run")
    shutil.copytree(trained[2], run)
    damage(os.path.join(run, "checkpoints", "step_00000060", file), how)
    return run, file, how


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


@pytest.mark.parametrize("damaged_run", DAMAGE, indirect=True, ids=[f"{f}-{h}" for f, h in DAMAGE])
def test_eval_and_generate_name_the_damage_and_use_the_intact_checkpoint(damaged_run, tmp_path, capsys, monkeypatch):
    run, file, how = damaged_run
    bad, good = (os.path.join(run, "checkpoints", f"step_000000{s}0") for s in (6, 5))
    out = str(tmp_path / "eval.json")
    assert main(["eval", run, "--max-batches", "1", "--device", "cpu", "--out", out, "--no-progress"]) == 0
    captured = capsys.readouterr()
    note = _one_line(captured.err)
    assert note.startswith(f"checkpoint {bad} is damaged: {file} {WHY[how]}")
    assert note.endswith("; using step_00000050, the newest intact one")
    assert f"checkpoint {good}\n" in captured.out

    argv = ["generate", run, "--prompt", "the cat", "--max-new-tokens", "8", "--temperature", "0", "--device", "cpu"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert _one_line(captured.err) == note and captured.out.startswith("the cat")

    # the damaged folder itself, by name: one error line that offers the intact one beside it
    assert main(["eval", bad, "--max-batches", "1", "--device", "cpu", "--out", out]) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith(f"error: checkpoint {bad} is damaged: {file} {WHY[how]}")
    assert err.endswith(f"the older checkpoint {good} beside it is intact, use that")
    with monkeypatch.context() as m:  # named relative to the current folder, the offer is too (it was absolute)
        m.chdir(run)
        assert main(["eval", os.path.relpath(bad, run), "--max-batches", "1", "--device", "cpu", "--out", out]) == 2
        err = _one_line(capsys.readouterr().err)
        assert err.endswith(f"the older checkpoint {os.path.relpath(good, run)} beside it is intact, use that")
    assert main([*argv[:1], bad, *argv[2:]]) == 2
    assert _one_line(capsys.readouterr().err).startswith(f"error: checkpoint {bad} is damaged: {file}")


@pytest.mark.parametrize("damaged_run", DAMAGE, indirect=True, ids=[f"{f}-{h}" for f, h in DAMAGE])
def test_resume_moves_the_damaged_checkpoint_aside_and_continues_exactly(trained, damaged_run, capsys):
    """The resumed run retrains steps 51..60 from step_50 and logs the losses of the uninterrupted run;
    the damaged folder is kept (renamed), not read, pruned or overwritten."""
    _, cfg, ref = trained
    run, file, how = damaged_run
    damaged_bytes = sha(os.path.join(run, "checkpoints", "step_00000060", file))
    assert main(["train", cfg, "--run-dir", run, "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {run}/checkpoints/step_00000060 is damaged: {file} {WHY[how]}" in out
    assert "moved it to step_00000060.damaged and resuming from step_00000050, the newest intact one" in out
    assert "from step_00000050: step 50/60" in out
    assert losses(run) == losses(ref)
    final = [os.path.join(d, "checkpoints", "step_00000060", "model.safetensors") for d in (run, ref)]
    assert sha(final[0]) == sha(final[1])
    assert sha(os.path.join(run, "checkpoints", "step_00000060.damaged", file)) == damaged_bytes


def test_no_intact_checkpoint_is_one_error_and_changes_nothing(trained, tmp_path, capsys):
    _, cfg, ref = trained
    run = str(tmp_path / "run")
    shutil.copytree(ref, run)
    damage(os.path.join(run, "checkpoints", "step_00000060", "model.safetensors"), "bit-flipped")
    damage(os.path.join(run, "checkpoints", "step_00000050", "trainer.pt"), "truncated")
    before = tree(run)
    assert main(["eval", run, "--max-batches", "1", "--device", "cpu"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith(f"error: no intact checkpoint in {run}: step_00000060: model.safetensors differs")
    assert "step_00000050: trainer.pt is truncated" in err
    assert main(["train", cfg, "--run-dir", run, "--resume"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith(f"error: cannot resume {run}: no intact checkpoint (step_00000060: ")
    assert main(["train", cfg, "--run-dir", run]) == 2  # nor can a fresh run start over it
    assert "already holds checkpoints" in capsys.readouterr().err
    assert tree(run) == before


@pytest.mark.parametrize(
    "file, how, why",
    [
        (None, None, None),
        ("model.safetensors", "truncated", "model.safetensors is truncated"),
        ("trainer.pt", "truncated", "trainer.pt is truncated or not a torch.save file"),
        ("trainer.pt", "bit-flipped", "trainer.pt is corrupted (its member"),
    ],
)
def test_checkpoints_without_checksums_load_and_their_damage_is_still_caught(trained, tmp_path, capsys, file, how, why):
    """Older checkpoints have no checksums.json: accepted unverified, checked as far as the formats
    allow (safetensors header vs size, the CRCs inside trainer.pt's zip)."""
    run = str(tmp_path / "run")
    shutil.copytree(trained[2], run)
    for step in ("50", "60"):
        os.remove(os.path.join(run, "checkpoints", f"step_000000{step}", "checksums.json"))
    if file is not None:
        damage(os.path.join(run, "checkpoints", "step_00000060", file), how)
    assert main(["eval", run, "--max-batches", "1", "--device", "cpu", "--out", str(tmp_path / "e.json")]) == 0
    captured = capsys.readouterr()
    used = "step_00000060" if file is None else "step_00000050"
    assert f"checkpoints/{used}\n" in captured.out
    if file is None:
        assert captured.err == ""
    else:
        assert _one_line(captured.err).startswith(f"checkpoint {run}/checkpoints/step_00000060 is damaged: {why}")


def test_every_checkpoint_carries_checksums_of_all_its_files(trained):
    import json

    ckpt = os.path.join(trained[2], "checkpoints", "step_00000060")
    with open(os.path.join(ckpt, "checksums.json")) as fh:
        files = json.load(fh)["files"]
    on_disk = {rel for rel in tree(ckpt) if rel != "checksums.json"}
    assert set(files) == on_disk and {"model.safetensors", "trainer.pt", "config.json"} <= on_disk
    for rel, entry in files.items():
        assert entry == {"bytes": os.path.getsize(os.path.join(ckpt, rel)), "sha256": sha(os.path.join(ckpt, rel))}
