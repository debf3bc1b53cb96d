"""The LM head and cross-entropy in token chunks, so the (tokens, vocab) logits never exist whole.

With batch 8 x 4096 tokens and a 16k vocabulary the fp32 logits, their log-softmax and both their
gradients take ~9 GiB, a third of a gpu-peer-small training step's memory (torchpeer.lm.memory); that
is what kept a third 1.1B-parameter run off an 80 GB GPU. Here each chunk's logits are made, turned
into its loss and into the gradients of the head's input and weight at once, and dropped: the
forward keeps only those gradients (tokens x d and vocab x d), and the backward scales them by the
incoming gradient. Same FLOPs as the plain head (one product forward, two for the gradients).

Numerics follow the plain path (TransformerLM: ``F.cross_entropy(F.linear(h, w)`` promoted to at least
fp32 ``, targets)``) under autocast:
the products run in the dtype the head's inputs are given in (bf16 under autocast, cast by the
caller), the log-softmax in fp32 (float64 for float64 inputs), the logits' gradient rounded to the
products' dtype before its two products (as autograd's cast back does). The weight gradient is summed
over chunks in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # F.cross_entropy's default: targets equal to it add no loss and no gradient


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk: int) -> torch.Tensor:
        n_valid = (targets != IGNORE_INDEX).sum().clamp(min=1)
        grad_h = torch.empty_like(h)
        acc = torch.promote_types(h.dtype, torch.float32)  # fp32, or float64 for float64 inputs
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        grad_b = None if bias is None else torch.zeros(bias.shape, dtype=acc, device=bias.device)
        loss = torch.zeros((), dtype=acc, device=h.device)
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s : s + chunk], targets[s : s + chunk]
            logits = F.linear(hc, weight, bias).to(acc)
            keep = tc != IGNORE_INDEX
            safe = torch.where(keep, tc, 0).unsqueeze(1)
            lse = torch.logsumexp(logits, dim=1)
            loss += ((lse - logits.gather(1, safe).squeeze(1)) * keep.to(acc)).sum()
            # d(mean loss)/d logits = (softmax - one_hot) / n_valid on kept rows, 0 on ignored ones
            g = logits.sub_(lse.unsqueeze(1)).exp_()  # in place: one (chunk, vocab) fp32 buffer, not two
            g.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=g.dtype))
            g.mul_((keep.to(acc) / n_valid.to(acc)).unsqueeze(1))
            g = g.to(h.dtype)
            grad_h[s : s + chunk] = g @ weight
            grad_w += (g.t() @ hc).to(acc)
            if grad_b is not None:
                grad_b += g.sum(0, dtype=acc)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype), None if grad_b is None else grad_b.to(bias.dtype))
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        # scaled in fp32 (or wider), then rounded once: a bf16 copy of e.g. 1 / grad_accum (1/3 ->
        # 0.33398) would bias the whole gradient by its rounding error
        acc = torch.promote_types(grad_out.dtype, torch.float32)

        def scaled(g):
            return None if g is None else (g.to(acc) * grad_out).to(g.dtype)

        return scaled(grad_h), scaled(grad_w), scaled(grad_b), None, None


def chunked_linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy of ``F.linear(h, weight, bias)`` against ``targets``, ``chunk`` tokens at a time.

    h: (T, d); weight: (V, d), the LM head's; targets: (T,) int64 (IGNORE_INDEX rows skipped);
    chunk: tokens per chunk (> 0); bias: (V,) or None (the head's, model.logit_prior). -> scalar loss
    (fp32; float64 for float64 inputs); gradients reach h, weight and bias. Under autocast, h, weight
    and bias are cast to the autocast dtype first (those casts carry the gradients back to fp32).
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"h must be (tokens, d) and weight (vocab, d); got {tuple(h.shape)} and {tuple(weight.shape)}")
    if targets.shape != h.shape[:1]:
        raise ValueError(f"targets must be (tokens,) = {tuple(h.shape[:1])}, got {tuple(targets.shape)}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk!r}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be (vocab,) = {tuple(weight.shape[:1])}, got {tuple(bias.shape)}")
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        h, weight = h.to(dt), weight.to(dt)
    with torch.autocast(dev, enabled=False):
        b = None if bias is None else bias.to(h.dtype)
        return _ChunkedLinearCrossEntropy.apply(h, weight.to(h.dtype), b, targets, chunk)
