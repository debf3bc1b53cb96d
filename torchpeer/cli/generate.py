"""``torchpeer generate CHECKPOINT [--prompt TEXT]``: sample text, streamed as it is generated."""

from __future__ import annotations

import sys


def add_parser(subparsers):
    from torchpeer.cli.common import HelpFormatter

    p = subparsers.add_parser(
        "generate",
        help="sample text from a checkpoint",
        description="Sample text from a checkpoint with a KV cache. Temperature 0 is greedy decoding. "
        "One sample is printed as it is generated; several are printed when all are done.",
        epilog='example:\n  torchpeer generate runs/ptb-tiny --prompt "the company said" --max-new-tokens 200',
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "checkpoint", help="checkpoint folder, run folder (its newest intact checkpoint) or export-hf folder"
    )
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per sample (default 200)")
    p.add_argument(
        "--temperature", type=float, default=0.8, help="divides the logits; 0 = greedy decoding (default 0.8)"
    )
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (omit: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling's random numbers (default 0)")
    p.add_argument(
        "--num-samples", type=int, default=1, help="samples of the same prompt, printed when all are done (default 1)"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto: cuda if available)")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every step")
    p.add_argument(
        "--decode",
        choices=("eager", "graph", "static"),
        default="eager",
        help="eager (default); graph: replay each one-token step from a CUDA graph (CUDA only, far fewer "
        "kernel launches per token); static: the graph's fixed-shape step without the graph",
    )
    p.add_argument("--stop-at-eot", action="store_true", help="stop at the end-of-text token")
    p.set_defaults(func=run)
    return p


def check_args(args) -> None:
    """One clear error per bad sampling option, before the checkpoint is loaded."""
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k} (omit --top-k to sample from all tokens)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.decode != "eager" and args.no_cache:
        raise ValueError(f"--decode {args.decode} decodes on the KV cache: drop --no-cache, or use --decode eager")


class TextStream:
    """Prints the text of token ids as they arrive. Decodes the tokens since the last printed line
    break, and holds back an incomplete UTF-8 character (decoded as U+FFFD) until it completes."""

    def __init__(self, tokenizer, out=None):
        self.tok, self.out = tokenizer, out if out is not None else sys.stdout
        self.pending: list[int] = []  # ids since the last line break
        self.printed = 0  # characters of decode(pending) already printed

    def push(self, token_id: int) -> None:
        self.pending.append(token_id)
        text = self.tok.decode(self.pending)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        if text.endswith("\n"):
            self.pending, self.printed = [], 0
        else:
            self.printed = len(text)

    def close(self) -> None:
        text = self.tok.decode(self.pending)
        self.out.write(text[self.printed :] + "\n")
        self.out.flush()


def run(args) -> int:
    import torch

    from torchpeer.cli.common import load_for_inference
    from torchpeer.lm.generate import context_note, generate
    from torchpeer.lm.runtime import resolve_device

    check_args(args)
    device = resolve_device(args.device, "--device")
    if args.decode == "graph" and device.type != "cuda":
        raise ValueError(f"--decode graph needs a CUDA device (this run is on {device}); use --decode eager")
    model, cfg, ckpt, tok = load_for_inference(args.checkpoint, device)
    ids = [tok.eot_id] + tok.encode(args.prompt)  # documents start after an end-of-text token
    note = context_note(len(ids), args.max_new_tokens, cfg.model.seq_len, use_cache=not args.no_cache)
    if note is not None:
        print(note, file=sys.stderr, flush=True)
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    stream = None
    if args.num_samples == 1:
        stream = TextStream(tok)
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
    try:
        out = generate(
            model,
            idx,
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.top_p,
            gen,
            use_cache=not args.no_cache,
            stop_token=tok.eot_id if args.stop_at_eot else None,
            on_token=(lambda nxt: stream.push(int(nxt[0, 0]))) if stream is not None else None,
            decode=args.decode,
        )
    except KeyboardInterrupt:
        if stream is not None:  # end the streamed line, so that "interrupted" starts a line of its own
            stream.close()
        raise
    if stream is not None:
        stream.close()
        return 0
    for i, row in enumerate(out.tolist()):
        print(f"--- sample {i}")
        print(args.prompt + tok.decode(row[len(ids) :]))
    return 0
