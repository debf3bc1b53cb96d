"""Hugging Face transformers interop (optional extra: ``pip install -e '.[hf]'``).

- ``peerify(model, blocks=[...], **peer_kwargs)``: PEER layers in place of the MLPs of chosen
  decoder blocks of a transformers causal LM (GPT-2 and Llama/Qwen2 layouts);
  ``from_pretrained(DIR)`` loads such a model back after ``save_pretrained``.
- ``export_hf(RUN_DIR, OUT_DIR)`` (CLI ``torchpeer export-hf``): a torchpeer LM checkpoint as a
  transformers model folder (remote code, safetensors, tokenizer) for
  ``AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)``.
- ``load_exported(OUT_DIR) -> (TransformerLM, tokenizer, RunConfig)``: and back into torchpeer;
  ``continue_from_exported(OUT_DIR, overrides) -> (RunConfig, init_from)``: continued training
  (``torchpeer train OUT_DIR``).

Importing this package never imports transformers; the functions that need it raise one
ImportError naming the extra when it is missing. torchpeer core never imports this package.
"""

from torchpeer.lazy import lazy_exports

# loaded on first use (torchpeer/lazy.py): the command line imports torchpeer.hf.export for its parser
_EXPORTS = {
    "continue_from_exported": "torchpeer.hf.exported",
    "decoder_blocks": "torchpeer.hf.peerify",
    "export_hf": "torchpeer.hf.export",
    "from_pretrained": "torchpeer.hf.peerify",
    "is_exported_folder": "torchpeer.hf.exported",
    "load_exported": "torchpeer.hf.exported",
    "peerify": "torchpeer.hf.peerify",
    "supported_families": "torchpeer.hf.peerify",
}

__all__ = [
    "continue_from_exported",
    "decoder_blocks",
    "export_hf",
    "from_pretrained",
    "is_exported_folder",
    "load_exported",
    "peerify",
    "supported_families",
]

lazy_exports(__name__)
