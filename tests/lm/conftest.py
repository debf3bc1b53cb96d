"""The one tiny trained run that the eval / generate / resume-error tests share."""

import pytest

from tests.lm.helpers import write_config, write_corpus
from torchpeer.cli import main


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One tiny PEER run of 60 steps (in-process): (root, config path, run dir)."""
    root = tmp_path_factory.mktemp("lm")
    write_corpus(root)
    cfg = write_config(root)
    run = str(root / "run")
    assert main(["train", cfg, "--run-dir", run, "--no-progress"]) == 0
    return root, cfg, run
