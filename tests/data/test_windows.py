"""Window samplers: RandomWindows (shift, determinism, resume) and sequential_windows (every target once)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from torchpeer.data import (
    IGNORE_INDEX,
    RandomWindows,
    num_sequential_batches,
    sequential_windows,
)


def _tokens(n=1000, seed=0):
    return np.random.default_rng(seed).integers(0, 257, size=n).astype(np.uint16)


def test_random_windows_shift_determinism_and_resume():
    tokens = _tokens()
    it = RandomWindows(tokens, batch_size=4, seq_len=16, seed=7)
    batches = [next(it) for _ in range(6)]
    for x, y in batches:
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        for row_x, row_y in zip(x, y):  # each row is a real window of the token array, y = x shifted
            o = _find(tokens, row_x.numpy())
            assert np.array_equal(row_y.numpy(), tokens[o + 1 : o + 17])
    again = [next(RandomWindows(tokens, 4, 16, seed=7)) for _ in range(1)]
    assert torch.equal(again[0][0], batches[0][0])
    other = next(RandomWindows(tokens, 4, 16, seed=8))
    assert not torch.equal(other[0], batches[0][0])
    assert len({tuple(b[0][:, 0].tolist()) for b in batches}) == 6  # batches differ from each other

    # resume: a fresh sampler loaded from a state after 3 batches yields batches 4..6
    first = RandomWindows(tokens, 4, 16, seed=7)
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON-able state
    resumed = RandomWindows(tokens, 4, 16, seed=0)
    resumed.load_state_dict(state)
    for x, y in batches[3:]:
        rx, ry = next(resumed)
        assert torch.equal(rx, x) and torch.equal(ry, y)
    with pytest.raises(ValueError, match="same batch_size"):
        RandomWindows(tokens, 8, 16).load_state_dict(state)

    # ranks split one global batch; a torch tensor of tokens gives the same windows
    (gx, _), (x0, _), (x1, _) = (
        next(RandomWindows(tokens, 8, 16, seed=3)),
        next(RandomWindows(tokens, 8, 16, seed=3, rank=0, world_size=2)),
        next(RandomWindows(torch.from_numpy(tokens.astype(np.int64)), 8, 16, seed=3, rank=1, world_size=2)),
    )
    assert x0.shape == (4, 16) and torch.equal(gx, torch.cat([x0, x1]))
    # the state is the global position: a 2-rank sampler's state resumes a 1-rank one and back
    two = RandomWindows(tokens, 8, 16, seed=3, rank=1, world_size=2)
    next(two)
    one = RandomWindows(tokens, 8, 16, seed=3)
    one.load_state_dict(two.state_dict())
    assert torch.equal(next(one)[0][4:], next(two)[0])
    with pytest.raises(ValueError, match="train.batch_size=6 is not divisible by the 4 processes"):
        RandomWindows(tokens, 6, 16, world_size=4)
    # every offset (the last included) is reachable
    small = np.arange(20, dtype=np.uint16)
    seen = {int(x[i, 0]) for x, _ in (next(RandomWindows(small, 16, 4, seed=s)) for s in range(20)) for i in range(16)}
    assert seen == set(range(16))
    with pytest.raises(ValueError, match="at least 17 tokens"):
        RandomWindows(tokens[:16], 1, 16)


def _find(tokens, row):
    hits = [o for o in range(len(tokens) - len(row) + 1) if np.array_equal(tokens[o : o + len(row)], row)]
    assert hits
    return hits[0]


@pytest.mark.parametrize("n", [2, 17, 64, 65, 1000])
@pytest.mark.parametrize("pad", [False, True])
def test_sequential_windows_cover_every_token(n, pad):
    tokens = _tokens(n)
    batches = list(sequential_windows(tokens, batch_size=3, seq_len=16, pad=pad))
    assert len(batches) == num_sequential_batches(n, 3, 16, pad=pad)
    xs, ys = [], []
    for x, y in batches:
        assert x.shape == y.shape and x.dtype == torch.int64
        if pad:
            assert x.shape == (3, 16)
        keep = y != IGNORE_INDEX
        assert torch.equal(x[:, 1:][keep[:, 1:]], y[:, :-1][keep[:, 1:]])  # y is x shifted by one
        xs.append(x[keep])
        ys.append(y[keep])
    assert torch.equal(torch.cat(ys), torch.from_numpy(tokens[1:].astype(np.int64)))  # each target once, in order
    assert torch.equal(torch.cat(xs), torch.from_numpy(tokens[:-1].astype(np.int64)))
    assert len(list(sequential_windows(tokens, 3, 16, max_batches=1, pad=pad))) == 1


def test_a_train_split_shorter_than_one_window_names_the_split_and_the_fields(tmp_path):
    """A train file shorter than one window said "the split has 11" without saying which split (the
    valid sets are tokenised before it is read) or which settings to change; a token file names its
    split and source, and the config fields."""
    from torchpeer.data import DataConfig, prepare_split

    (tmp_path / "tiny.txt").write_text("tiny text")
    cfg = DataConfig(train=str(tmp_path / "tiny.txt"), cache_dir=str(tmp_path / "cache"))
    tf = prepare_split(cfg, cfg.train, "train", progress=False)
    with pytest.raises(ValueError) as e:
        RandomWindows(tf, batch_size=2, seq_len=16)
    assert str(e.value) == (
        f"the train split ({tmp_path / 'tiny.txt'}) has 10 tokens, fewer than one training window of model.seq_len "
        "16 + 1 = 17; use a shorter model.seq_len or more text in data.train"
    )
    with pytest.raises(ValueError, match="needs at least 17 tokens, the split has 10"):
        RandomWindows(tf.tokens, batch_size=2, seq_len=16)  # a bare array: no names to give
    assert next(RandomWindows(tf, batch_size=2, seq_len=9))[0].shape == (2, 9)
