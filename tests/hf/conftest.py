"""Fixtures of the transformers interop tests: offline hub, tiny torchpeer runs trained locally.

The hub is switched off (and remote code cached in a temporary folder, not the user's home) for
the tests of this folder only. transformers is first imported inside these tests, so
huggingface_hub, which reads these variables at import, sees them.
"""

import random

import pytest

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
def hf_modules_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hf-modules"))


@pytest.fixture(scope="module", autouse=True)
def offline_hub(hf_modules_cache):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setenv("HF_MODULES_CACHE", hf_modules_cache)
        yield


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
