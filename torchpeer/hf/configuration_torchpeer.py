"""transformers config of an exported torchpeer LM (``torchpeer export-hf``).

This file is copied verbatim into every exported model folder (transformers remote code), so it
imports only transformers. ``torchpeer`` holds the whole torchpeer run config (model, train, data
sections, as ``RunConfig.to_dict()``); the standard fields mirror its model section so that
transformers utilities (caches, generation) find the sizes they look for.
"""

from transformers import PretrainedConfig


class TorchpeerConfig(PretrainedConfig):
    model_type = "torchpeer"

    def __init__(self, torchpeer: dict | None = None, tie_word_embeddings: bool | None = None, **kwargs):
        self.torchpeer = torchpeer
        model = (torchpeer or {}).get("model", {})
        self.vocab_size = model.get("vocab_size")
        self.hidden_size = model.get("d_model")
        self.num_hidden_layers = model.get("n_layers")
        self.num_attention_heads = model.get("n_heads")
        self.max_position_embeddings = model.get("seq_len")
        if tie_word_embeddings is None:
            tie_word_embeddings = model.get("tie_embeddings", True)
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
            kwargs.pop(key, None)  # always derived from the torchpeer section
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
