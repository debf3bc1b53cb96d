"""Two changes to Triton's interpreter (TRITON_INTERPRET=1) that tests/conftest.py makes for the test
session, and that a test running a script in a subprocess makes there (``python -c "import
tests.triton_interpreter as t; t.setup(); ..."``): one for speed, one for bitwise-reproducible dots."""

import os


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


def _dots_independent_of_tile_shape() -> None:
    """Make the interpreter's float tl.dot a function of each element's row and column alone.

    The interpreter's tl.dot is np.matmul, i.e. OpenBLAS, whose float32 kernels round an element's
    sum differently by its place in the kernel's register block and by the CPU's kernel set: the
    retrieval forwards, each with its own tile shape, are tested bit-equal to one another, and on an
    AVX2-only host two of them differed in the last bit (2.4e-7) where an AVX-512 host gave equal
    bits (2026-12-07). Here every product is formed in float64 (exact for float32, bf16 and fp16
    inputs), summed in order of k, and rounded once to the accumulator's type before the accumulator
    is added, as np.matmul's result was; integer and fp8 dots keep Triton's own code. bf16 operands are
    read as numbers (Triton 3.9's interpreter multiplied their uint16 bits: kernels here cast to fp32
    before a dot in the interpreter, see dot_fp32, so none depended on it). Only the last bit of a
    float32 dot can change, and the same way in every kernel; tests compare against float64 anyway."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "create_dot", None)
    handle = getattr(interpreter, "TensorHandle", None)
    if original is None or handle is None:
        return

    def as_float64(x):  # None: not a float of 16 bits or more
        if x.dtype.scalar == tl.bfloat16:  # stored as its uint16 bits (Triton's own dot multiplied the bits)
            return (x.data.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        if np.issubdtype(x.data.dtype, np.floating) and x.dtype.primitive_bitwidth >= 16:
            return x.data.astype(np.float64)
        return None

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        out_type = d.data.dtype
        a64, b64 = as_float64(a), as_float64(b)
        if a64 is None or b64 is None or not np.issubdtype(out_type, np.floating):
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        products = a64[..., :, :, None] * b64[..., None, :, :]
        total = np.add.reduce(products, axis=-2)  # [..., M, N]: a non-innermost axis is summed in order
        return handle(total.astype(out_type) + d.data, d.dtype.scalar)

    builder.create_dot = create_dot


def setup() -> None:
    """Both changes, when kernels run in the interpreter (TRITON_INTERPRET=1); nothing otherwise."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        _skip_repatching_in_helper_calls()
        _dots_independent_of_tile_shape()
