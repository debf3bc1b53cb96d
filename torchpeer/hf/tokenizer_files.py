"""Tokenizer files of an exported model: a ``tokenizer.json`` that ``AutoTokenizer`` loads offline
(as ``PreTrainedTokenizerFast``) with the same ids as the torchpeer tokenizer.

- byte tokenizer (ids 0..255 = UTF-8 bytes, 256 = "<|endoftext|>"): a byte-level BPE with no merges
  whose vocabulary maps the GPT-2 byte-to-unicode symbol of byte b to id b, so every byte is
  one token with its own value as id; end-of-text is the special token 256.
- BPE trained with HF tokenizers, local GPT-2 files, hub tokenizers: their own tokenizer.json.

The torchpeer tokenizer itself is saved too (``torchpeer_tokenizer/``), for ``load_exported``.
"""

from __future__ import annotations

import json
import os

TORCHPEER_TOKENIZER_DIR = "torchpeer_tokenizer"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode symbol map (the ByteLevel pre-tokenizer's)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def byte_backend(eot_text: str):
    """A ``tokenizers.Tokenizer`` equal to torchpeer's ByteTokenizer (vocab 257)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {sym: b for b, sym in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(eot_text, special=True)])
    return tok


def write_tokenizer(directory: str, tokenizer, seq_len: int) -> None:
    """Write tokenizer.json + tokenizer_config.json (+ special tokens) and torchpeer_tokenizer/."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from torchpeer.data.tokenizer import EOT_TEXT, ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        eot_text, backend = EOT_TEXT, byte_backend(EOT_TEXT)
    else:
        eot_text, backend = tokenizer.eot_text, Tokenizer.from_str(tokenizer.tok.to_str())
    if backend.token_to_id(eot_text) != tokenizer.eot_id:
        raise ValueError(
            f"cannot export the tokenizer: {eot_text!r} does not map to the end-of-text id {tokenizer.eot_id}"
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=eot_text, eos_token=eot_text, pad_token=eot_text, model_max_length=seq_len
    )
    fast.save_pretrained(directory)
    # The generic class name, known to every transformers 5.x (newer ones write their backend's name).
    cfg_path = os.path.join(directory, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as fh:
        tok_cfg = json.load(fh)
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w", encoding="utf-8") as fh:
        json.dump(tok_cfg, fh, indent=2)
    tokenizer.save(os.path.join(directory, TORCHPEER_TOKENIZER_DIR))
