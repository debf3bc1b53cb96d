"""scripts/probe_router_input.py with the unigram prior given to the model for free: a fixed logit bias,
the log unigram frequencies of the run's train split (add-0.5 smoothed), added to every logit by a
forward hook on the LM head (beyond_paper.md, thirtieth session, P30-f). A diagnostic, not an option:
does the router's early collapse go away when the FFWs need not write the unigram direction into the
residual stream?

    python scripts/probe_unigram_prior.py --out experiments/results/2026-12-07-router-collapse-cpu/unigram-prior-ema

Same CLI and outputs as probe_router_input.py (probe.jsonl, input_stats.jsonl, the run). The bias is a
buffer, not a parameter: the optimizer never sees it, and the run needs train.loss_chunk_tokens 0 (the
default: the chunked loss never calls the head module, so the hook would not apply). The frequencies
are model.logit_prior's (torchpeer.lm.logit_prior.unigram_log_frequencies); that option makes them a
trained head bias instead.
"""

from __future__ import annotations

import os
import sys

from torchpeer.lm.logit_prior import unigram_log_frequencies

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # its siblings
from probe_router_input import DiagProbe  # noqa: E402
from probe_router_input import main as input_probe_main  # noqa: E402


class UnigramPriorProbe(DiagProbe):
    def on_train_start(self, trainer):
        if trainer.cfg.train.loss_chunk_tokens:
            raise ValueError("probe_unigram_prior.py needs train.loss_chunk_tokens 0 (the hook is on the head)")
        head = trainer.model.lm_head
        bias = unigram_log_frequencies(trainer._train_file.tokens, head.weight.shape[0]).to(head.weight.device)
        head.register_forward_hook(lambda m, a, out: out + bias.to(out.dtype))
        print(f"unigram prior: entropy {float(-(bias.exp() * bias).sum()):.3f} nats over {bias.numel()} ids")
        super().on_train_start(trainer)


def main() -> None:
    input_probe_main(UnigramPriorProbe, __doc__)


if __name__ == "__main__":
    main()
