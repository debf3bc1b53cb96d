"""Fixtures of the transformers interop tests: offline hub, tiny torchpeer runs trained locally.

The hub is switched off before transformers is imported (huggingface_hub reads these variables at
import), and remote code is cached in a temporary folder instead of the user's home.
"""

import os
import random
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="hf-modules-"))

import pytest  # noqa: E402

WORDS = "the cat sat on a mat and a dog ran far away while birds sing songs of joy".split()


def tiny_run_config(train_file: str, cache_dir: str, ffw: str, steps: int = 3) -> dict:
    """A torchpeer run config (as a dict) small enough to train in a second on one CPU core."""
    sections = {
        "peer": {"n_experts": 64, "heads": 2, "top_k": 4, "d_key": 16},
        "pkm": {"n_keys": 8, "heads": 2, "top_k": 4, "d_key": 16},
        "moe": {"n_experts": 4, "d_expert": 16, "routing": "token_choice", "top_k": 1},
        "dense": {},
    }
    model = {"d_model": 32, "n_layers": 2, "n_heads": 2, "seq_len": 32, "ffw": ffw, "placement": [1]}
    model["tie_embeddings"] = ffw != "dense"  # one untied model among the exports
    if sections[ffw]:
        model[ffw] = sections[ffw]
    return {
        "name": f"tiny-{ffw}",
        "model": model,
        "train": {
            "device": "cpu",
            "batch_size": 4,
            "max_steps": steps,
            "dtype": "fp32",
            "lr": 3e-3,
            "warmup_steps": 1,
            "tensorboard": False,
            "eval_interval": 1000,
            "ckpt_interval": 1000,
            "log_interval": 1000,
        },
        "data": {"train": train_file, "tokenizer": "byte", "cache_dir": cache_dir, "valid": {}},
    }


@pytest.fixture(scope="session")
def train_file(tmp_path_factory) -> str:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(200)), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def make_run(tmp_path_factory, train_file):
    """make_run(ffw) -> run folder of a tiny torchpeer LM trained for a few steps (cached per kind)."""
    from torchpeer.lm import RunConfig, train

    runs: dict[str, str] = {}

    def make(ffw: str = "peer") -> str:
        if ffw not in runs:
            root = tmp_path_factory.mktemp(f"run-{ffw}")
            cfg = RunConfig.from_dict(tiny_run_config(train_file, str(root / "cache"), ffw))
            train(cfg, str(root / "run"), progress=False)
            runs[ffw] = str(root / "run")
        return runs[ffw]

    return make
