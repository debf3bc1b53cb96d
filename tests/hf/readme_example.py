# The PEER-in-transformers example of README.md, verbatim (tests/hf/test_readme_example.py runs it).
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from torchpeer.hf import from_pretrained, peerify

config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
model = LlamaForCausalLM(config)
peerify(model, blocks=[1], n_experts=32**2, heads=4, top_k=8, d_key=32)  # block 1's MLP -> PEER

opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.randint(0, 256, (4, 32))
for step in range(3):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"step {step}: loss {loss.item():.3f}")

model.save_pretrained("peer-llama")  # config.json records config.peer = {"blocks": [1], ...}
model = from_pretrained("peer-llama")
print(model.generate(ids[:1, :8], max_new_tokens=8, do_sample=False))
