"""transformers model class of an exported torchpeer LM (``torchpeer export-hf``).

This file is copied verbatim into every exported model folder (transformers remote code). It wraps
``torchpeer.lm.TransformerLM`` (so PEER/PKM/MoE layers are torchpeer's own, with the Triton kernels
on CUDA; the torchpeer package must be installed where the folder is loaded) and adds what
transformers expects: labels -> shifted loss, a ``Cache`` for ``generate()``, padding masks.

Without a cache and padding the forward is ``TransformerLM.forward`` itself, so logits equal
torchpeer's. With a cache (``generate``) the blocks are run here step by step with the keys and
values kept in the transformers ``Cache`` (``cache.update(k, v, layer)``); the arithmetic is the
same as torchpeer's own KV-cache decoding. Positions are absolute (cache length + offset) like in
torchpeer; unlike ``torchpeer.lm.generate`` there is no sliding window past ``seq_len``.
transformers 5.x renamed ``past_key_values`` to ``cache``; both are accepted, the output uses the
name of the installed version.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_torchpeer import TorchpeerConfig

# transformers 5.x renamed the output field past_key_values -> cache (and refuses both at once).
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _attention_mask(padding: torch.Tensor | None, start: int, T: int, device) -> torch.Tensor:
    """Boolean (B or 1, 1, T, start+T): query i (position start+i) sees key j <= start+i that is
    not padding. A query always sees itself, so a padded row has no all-masked softmax (no NaN)."""
    q_pos = torch.arange(start, start + T, device=device)[:, None]
    k_pos = torch.arange(start + T, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]
    if padding is not None:
        allowed = allowed & padding[:, None, None, -(start + T) :].bool()
        allowed = allowed | (k_pos == q_pos)[None, None]
    return allowed


class TorchpeerForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = TorchpeerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"model.lm_head.weight": "model.tok_emb.weight"}

    def __init__(self, config: TorchpeerConfig, model=None):
        """model: an already built TransformerLM of ``config`` (export-hf passes the checkpoint's)."""
        super().__init__(config)
        from torchpeer.lm.config import RunConfig
        from torchpeer.lm.model import TransformerLM

        self.run_config = RunConfig.from_dict(config.torchpeer)
        self.model = model if model is not None else TransformerLM(self.run_config.model)
        self.post_init()

    def _init_weights(self, module):
        pass  # TransformerLM initialises itself; exported weights overwrite everything anyway

    def get_input_embeddings(self):
        return self.model.tok_emb

    def set_input_embeddings(self, value):
        self.model.tok_emb = value

    def get_output_embeddings(self):
        return self.model.lm_head

    def set_output_embeddings(self, value):
        self.model.lm_head = value

    def _attend(self, attn, x, cache, layer: int, start: int, mask) -> torch.Tensor:
        """torchpeer CausalSelfAttention with the keys/values kept in a transformers Cache."""
        B, T, _ = x.shape
        q, k, v = attn.qkv(x).view(B, T, 3, attn.n_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # (B,H,T,hd)
        q, k = attn.rotary(q, start), attn.rotary(k, start)
        if cache is not None:
            k, v = cache.update(k, v, layer)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        return attn.proj(y.transpose(1, 2).reshape(B, T, attn.d_model))

    def _hidden_states(self, input_ids, cache, padding) -> torch.Tensor:
        """Final hidden states (B, T, d) with the cache appended to; padding (B, S) or None."""
        m = self.model
        T = input_ids.shape[1]
        start = cache.get_seq_length() if cache is not None else 0
        mask = None
        if start > 0 or padding is not None:
            mask = _attention_mask(padding, start, T, input_ids.device)
        x = m.tok_emb(input_ids)
        for i, blk in enumerate(m.blocks):
            x = x + self._attend(blk.attn, blk.norm1(x), cache, i, start, mask)
            x = x + blk.ffw(blk.norm2(x))
        return m.norm_f(x)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache=None,
        past_key_values=None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        num_items_in_batch=None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids (B, T) -> logits (B, T, V) (the last ``logits_to_keep`` positions if > 0).

        labels (B, T): next-token targets are labels shifted by one (transformers convention),
        -100 ignored. attention_mask (B, past + T): 0 marks padding.
        """
        if input_ids is None:
            raise ValueError("TorchpeerForCausalLM needs input_ids (inputs_embeds are not supported)")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, time), got shape {tuple(input_ids.shape)}")
        cache = cache if cache is not None else past_key_values
        if cache is None and use_cache:
            cache = DynamicCache()
        padding = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        if cache is None and padding is None:
            logits, _ = self.model(input_ids)  # exactly torchpeer's forward
            if logits_to_keep:
                logits = logits[:, -logits_to_keep:]
        else:
            h = self._hidden_states(input_ids, cache, padding)
            if logits_to_keep:
                h = h[:, -logits_to_keep:]
            logits = self.model.lm_head(h).float()
        loss = None
        if labels is not None:
            targets = labels[:, 1:].reshape(-1)
            flat = logits[:, :-1].reshape(-1, logits.shape[-1])
            if num_items_in_batch is not None:  # transformers Trainer: mean over all tokens of the accumulated batch
                loss = F.cross_entropy(flat, targets, ignore_index=-100, reduction="sum") / num_items_in_batch
            else:
                loss = F.cross_entropy(flat, targets, ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
