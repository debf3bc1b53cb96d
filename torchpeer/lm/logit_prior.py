"""``model.logit_prior = "unigram"``: the LM head's bias starts at the train split's log unigram frequencies.

Why: an LM's first lesson is the unigram distribution. Without an output bias the model can only learn
it through the residual stream (the same direction added to every token, written mostly by the dense
FFWs), and for tens of steps that direction dominates every later layer's input; a PEER router fed
one direction sends every token to the same few experts, and its own learning then holds the collapse
(docs/research/beyond_paper.md, thirtieth session: probes P30-a..g). Given the prior at step 0 the
router's input keeps its spread. The bias stays a parameter (no_decay group, train.lr): the model may
move it, e.g. towards the conditional frequencies it ends up not explaining.

The counts are made once, at the start of a new run, from the run's train token file; the bias is
then part of the weights (checkpoints, export-hf) and a resumed run never recounts.
"""

from __future__ import annotations

import numpy as np
import torch

# Add-k smoothing of the counts: a token id absent from the train split (the tokenizer may know ids the
# corpus never uses) gets log(0.5 / total) rather than -inf, which would make its loss infinite.
SMOOTHING = 0.5
_CHUNK = 1 << 24  # tokens counted at a time: a 1e9-token memmap is never read into memory whole


def unigram_log_frequencies(tokens: np.ndarray, vocab_size: int, smoothing: float = SMOOTHING) -> torch.Tensor:
    """(vocab_size,) float32 log frequencies of the ids in ``tokens`` (1-D ints, e.g. a TokenFile's
    memmap), each count plus ``smoothing``, so that every id has a finite log frequency; computed in
    float64 and rounded once. A token id outside 0..vocab_size-1 is a ValueError."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    if not smoothing > 0:
        raise ValueError(f"smoothing must be > 0 (a zero count would give log 0 = -inf), got {smoothing!r}")
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D array of integer ids, got shape {tokens.shape} dtype {tokens.dtype}")
    counts = np.zeros(vocab_size, dtype=np.float64)
    for s in range(0, len(tokens), _CHUNK):
        part = np.asarray(tokens[s : s + _CHUNK], dtype=np.int64)
        if part.size and (part.min() < 0 or part.max() >= vocab_size):
            bad = int(part.max()) if part.max() >= vocab_size else int(part.min())
            raise ValueError(f"token id {bad} is outside the vocabulary 0..{vocab_size - 1}")
        counts += np.bincount(part, minlength=vocab_size)
    counts += smoothing
    return torch.from_numpy(np.log(counts / counts.sum())).float()


@torch.no_grad()
def init_logit_prior(model: torch.nn.Module, tokens: np.ndarray) -> None:
    """Set ``model.lm_head.bias`` (a TransformerLM built with model.logit_prior "unigram") to the log
    unigram frequencies of ``tokens``. The bias's rows past the counted ids (a model.vocab_size larger
    than the tokenizer's) get the smoothing count too."""
    bias = getattr(model.lm_head, "bias", None)
    if bias is None:
        raise ValueError("the model's LM head has no bias: build it with model.logit_prior = 'unigram'")
    prior = unigram_log_frequencies(tokens, bias.shape[0])
    bias.copy_(prior.to(device=bias.device, dtype=bias.dtype))
