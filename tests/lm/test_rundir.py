"""A read-only or full disk: one error line and exit status 2 from train, resume and eval, checked
before the work starts where it can be; existing checkpoints stay intact.

Tests run as root, which chmod does not stop, so a read-only file system is emulated in-process:
every call that creates, opens for writing, renames or deletes a path under the folder raises
OSError(EROFS), as the kernel would. A full disk is torch's writer failing mid-checkpoint.
"""

import builtins
import errno
import hashlib
import os
import shutil

import pytest

import torchpeer.lm.checkpoint as ckpt_module
from tests.lm.helpers import losses, write_config, write_corpus
from torchpeer.cli import main
from torchpeer.lm.checkpoint import latest_checkpoint_step, list_checkpoints


@pytest.fixture
def read_only(monkeypatch):
    """read_only(folder): from now on, writes under ``folder`` fail with EROFS."""
    roots = []

    def blocked(path) -> bool:
        path = os.path.abspath(os.fsdecode(path))
        return any(path == r or path.startswith(r + os.sep) for r in roots)

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

    real = {name: getattr(os, name) for name in ("open", "mkdir", "replace", "rename", "remove", "unlink", "rmdir")}
    real_open = builtins.open

    def guard(name):
        def fn(path, *args, **kw):
            if name == "open" and not (args[0] if args else kw.get("flags", 0)) & (os.O_WRONLY | os.O_RDWR):
                return real[name](path, *args, **kw)  # reading is fine
            if blocked(path) or (name in ("replace", "rename") and blocked(args[0])):
                refuse(path)
            return real[name](path, *args, **kw)

        return fn

    for name in real:
        monkeypatch.setattr(os, name, guard(name))

    def open_(file, mode="r", *args, **kw):
        if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and blocked(file):
            refuse(file)
        return real_open(file, mode, *args, **kw)

    monkeypatch.setattr(builtins, "open", open_)
    return lambda folder: roots.append(os.path.abspath(str(folder)))


def _digest(folder) -> dict:
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out[os.path.relpath(os.path.join(dirpath, f), folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_train_into_a_read_only_folder(tmp_path, capsys, read_only):
    write_corpus(tmp_path)
    cfg = write_config(tmp_path, max_steps=4)
    (tmp_path / "ro").mkdir()  # the mount point of a read-only file system
    read_only(tmp_path / "ro")
    assert main(["train", cfg, "--run-dir", str(tmp_path / "ro" / "run")]) == 2
    err = _one_error(capsys)
    assert f"cannot write run folder {tmp_path / 'ro' / 'run'}: Read-only file system" in err
    assert os.listdir(tmp_path / "ro") == []
    # a run folder that is a file
    (tmp_path / "afile").write_text("x")
    assert main(["train", cfg, "--run-dir", str(tmp_path / "afile" / "run")]) == 2
    assert "is a file, not a directory" in _one_error(capsys)


def test_resume_and_eval_on_a_read_only_run_keep_everything(trained, tmp_path, capsys, read_only):
    root, cfg, run = trained
    copy = str(tmp_path / "copy")
    shutil.copytree(run, copy)
    before = _digest(copy)
    read_only(copy)
    assert main(["train", cfg, "--run-dir", copy, "--resume", "--train.max_steps", "80"]) == 2
    err = _one_error(capsys)
    assert f"cannot write run folder {copy}: Read-only file system" in err
    assert main(["eval", copy, "--no-progress"]) == 2  # the default output goes into the run folder
    err = _one_error(capsys)
    assert "cannot write run folder" in err and "Read-only file system" in err and "choose another --out" in err
    assert _digest(copy) == before


def test_full_disk_mid_checkpoint(tmp_path, capsys, monkeypatch):
    """torch's writer fails at the second checkpoint: one line, exit 2, the first checkpoint intact,
    no temporary left; resuming once there is space again finishes the run."""
    write_corpus(tmp_path)
    cfg = write_config(tmp_path, max_steps=30)
    run = tmp_path / "run"
    real_save = ckpt_module.save_model
    calls = []

    def fill_disk(model, path, *args, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: "
                "file write failed\nmore C++ context"
            )
        return real_save(model, path, *args, **kw)

    monkeypatch.setattr(ckpt_module, "save_model", fill_disk)
    assert main(["train", cfg, "--run-dir", str(run), "--no-progress"]) == 2
    err = _one_error(capsys)
    assert f"cannot write checkpoint {run / 'checkpoints' / 'step_00000020'}" in err
    assert "file write failed, is the disk full?" in err and "existing checkpoints are intact" in err
    assert os.listdir(run / "checkpoints") == ["step_00000010"]
    monkeypatch.setattr(ckpt_module, "save_model", real_save)
    assert main(["train", cfg, "--run-dir", str(run), "--resume", "--no-progress"]) == 0
    assert [s for s, _ in losses(run)] == list(range(1, 31))
    assert [os.path.basename(p) for p in list_checkpoints(run)] == ["step_00000020", "step_00000030"]
    assert latest_checkpoint_step(str(run)) == 30
    assert latest_checkpoint_step(str(tmp_path / "no-such-run")) is None


def test_no_space_for_the_metrics_log(tmp_path, capsys, monkeypatch):
    write_corpus(tmp_path)
    cfg = write_config(tmp_path, max_steps=4)
    real_open = builtins.open

    def open_(file, mode="r", *args, **kw):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kw)

    monkeypatch.setattr(builtins, "open", open_)
    assert main(["train", cfg, "--run-dir", str(tmp_path / "run")]) == 2
    err = _one_error(capsys)
    assert "metrics.jsonl: no space left on the device" in err


def test_full_disk_while_writing_the_weights(tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk as SafetensorError('... (os error 28) ...'): the same one line."""
    from safetensors import SafetensorError

    write_corpus(tmp_path)
    cfg = write_config(tmp_path, max_steps=10)

    def full(model, path, *args, **kw):
        msg = f'Error while serializing: I/O error: No space left on device (os error 28) at path "{path}"'
        raise SafetensorError(msg)

    monkeypatch.setattr(ckpt_module, "save_model", full)
    assert main(["train", cfg, "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    err = _one_error(capsys)
    assert "cannot write checkpoint" in err and "step_00000010: no space left on the device" in err
    assert os.listdir(tmp_path / "run" / "checkpoints") == []  # the temporary folder is gone
