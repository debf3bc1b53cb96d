"""The files of a checkpoint folder: readable by whoever can read the run folder, like every other
file torchpeer writes (safetensors creates its file 0600)."""

import os
import stat

from tests.lm.test_model import tiny
from torchpeer.lm.checkpoint import load_model_from_checkpoint, save_checkpoint
from torchpeer.lm.config import RunConfig
from torchpeer.lm.model import TransformerLM


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_checkpoint_weights_have_the_mode_of_the_other_files(tmp_path):
    cfg = RunConfig()
    cfg.model = tiny("peer")
    cfg.train.max_steps = 3
    model = TransformerLM(cfg.model)
    old = os.umask(0o022)
    try:
        ckpt = save_checkpoint(str(tmp_path / "run"), 3, model, {}, cfg)
    finally:
        os.umask(old)
    assert _mode(os.path.join(ckpt, "model.safetensors")) == 0o644
    assert _mode(os.path.join(ckpt, "model.safetensors")) == _mode(os.path.join(ckpt, "config.json"))
    loaded, _, _ = load_model_from_checkpoint(ckpt)  # still intact: the mode is set before checksums.json
    assert sorted(loaded.state_dict()) == sorted(model.state_dict())
