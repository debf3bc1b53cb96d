"""Test-session setup: without a GPU, Triton kernels run in the interpreter (TRITON_INTERPRET=1).

It must be set before any kernel module is imported (triton.jit reads it when a kernel is defined),
so it is set here, once, for the whole session.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _skip_repatching_in_helper_calls() -> None:
    """Speed only; what is interpreted does not change.

    Triton's interpreter patches triton.language (inspect.getmembers over tl, tl.core, tl.tensor,
    tl.math) when a kernel is launched, and again at every call of a @triton.jit helper from inside
    the kernel, once per program of the grid, although the launch's patch is still in place (the
    helper's own patch is never restored; it only re-wraps what is already wrapped). With helpers
    such as the retrieval's unpack and pair stage, that repeat was ~30 % of the interpreted time.
    Here a helper call whose triton.language is already patched gets an empty patch scope; a call
    with anything unpatched goes to Triton's own code. If the interpreter's internals are not the
    ones this was written against (triton 3.9), nothing is changed."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_type is None or not hasattr(tl.core, "is_builtin"):
        return

    def patched(lang) -> bool:
        probes = [lang.program_id, lang.tensor.to] + ([lang.math.exp] if lang is tl else [])
        return not any(tl.core.is_builtin(p) for p in probes)

    def launched(fn):
        langs = [v for v in fn.__globals__.values() if v is tl or v is tl.core]
        return langs and all(patched(lang) for lang in langs)

    def patch_lang(fn):
        return scope_type() if launched(fn) else original(fn)

    interpreter._patch_lang = patch_lang


if os.environ.get("TRITON_INTERPRET") == "1":
    _skip_repatching_in_helper_calls()
