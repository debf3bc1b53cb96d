"""Compile Triton kernels ahead of time for sm_90 (H100/H200) without a GPU, so a kernel that the
interpreter accepts but the real compiler rejects is caught on the CPU.

- ``aot(fn, types, consts, num_warps)``: compile one kernel (returns the compiled kernel: ``.asm["ptx"]``).
- ``run_without_interpreter(*python_args)``: run a script or ``-c`` code with TRITON_INTERPRET unset and
  the repo importable (the real compiler), from a test: skips when this triton has no NVIDIA backend,
  asserts success, returns stdout. Kernel tests' scripts use ``from tests.ops.sm90_aot import aot``.
- As a script (tests/ops/test_sm90_aot.py runs it): this session's new kernels, one line each.
"""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


def aot(fn, types: dict, consts: dict, num_warps: int = 4, say: bool = True, aligned: tuple = ()):
    """types: {arg: triton type} (others i32); consts: {constexpr arg: value}. ``say``: print an "ok"
    line. ``aligned``: args the JIT would mark divisible by 16 (pointers 16-byte aligned, ints % 16 == 0:
    without it loads and stores of those pointers compile unvectorised, unlike a real launch; an int arg
    equal to 1, e.g. a unit stride, goes in ``consts`` as the JIT specialises it). Returns the compiled
    kernel."""
    sig = {a: "constexpr" if a in consts else types.get(a, "i32") for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(
        fn=fn, signature=sig, constexprs={(fn.arg_names.index(a),): v for a, v in consts.items()}, attrs=attrs
    )
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    if say:
        print(f"ok {fn.__name__} {types.get('x_ptr') or types.get('q_ptr')} {consts}", flush=True)
    return compiled


def run_without_interpreter(*python_args: str, timeout: float = 300) -> str:
    """stdout of ``python *python_args`` run with TRITON_INTERPRET unset and the repo on PYTHONPATH;
    pytest.skip when this triton build has no NVIDIA backend; asserts exit status 0."""
    import pytest

    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception as e:  # a triton build without the NVIDIA backend
        pytest.skip(f"no NVIDIA backend in this triton: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, *python_args], capture_output=True, text=True, env=env, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def main() -> None:
    from torchpeer.ops.query_norm import triton_kernels as qn
    from torchpeer.ops.retrieval import triton_backward_sorted as sb
    from torchpeer.ops.retrieval import triton_split as sp

    for xdt in ("bf16", "fp32"):
        t = {f"{a}_ptr": f"*{xdt}" for a in ("x", "y", "dy", "dx")}
        t.update({f"{a}_ptr": "*fp32" for a in ("w", "b", "rm", "rv", "dw", "db", "aux", "red")})
        t.update(n_ptr="*i64", eps="fp32", momentum="fp32")
        tiles = {"BLOCK_T": 64, "BLOCK_F": 64}
        aot(qn._fwd_kernel, t, {"STATS": True, **tiles})
        aot(qn._fwd_kernel, t, {"STATS": False, **tiles})
        aot(qn._update_kernel, t, {"P_PAD": 64, "BLOCK_F": 64})
        aot(qn._bwd_reduce_kernel, t, {"BN": True, "WRITE_DX": False, "P_PAD": 64, **tiles})
        aot(qn._bwd_reduce_kernel, t, {"BN": False, "WRITE_DX": True, "P_PAD": 64, **tiles})
        aot(qn._bwd_dx_kernel, t, {"P_PAD": 64, **tiles})
        rt = {"q_ptr": f"*{xdt}", "k_ptr": f"*{xdt}", "cand_ptr": "*i64", "scores_ptr": "*fp32", "idx_ptr": "*i64"}
        consts = {"PER_HEAD": False, "DH": 64, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_D": 64, "KP": 16}
        aot(sp._tile_topk_kernel, rt, {**consts, "DOT_FP32": xdt == "fp32"})
        st = {f"{a}_ptr": "*i64" for a in ("perm", "offsets", "seg_row", "seg_index")}
        st.update(ds_ptr="*fp32", q_ptr=f"*{xdt}", dk_ptr="*fp32", partial_ptr="*fp32", RK="i64", stride_qt="i64")
        aot(sb._dkeys_sorted_kernel, st, {"H": 8, "K": 16, "DH": 64, "BLOCK_S": 64, "BLOCK_D": 64})
    rd = {"hot_ptr": "*i64", "nseg_ptr": "*i64", "pbase_ptr": "*i64", "partial_ptr": "*fp32", "dk_ptr": "*fp32"}
    aot(sb._dkeys_reduce_kernel, rd, {"DH": 64, "BLOCK_D": 64}, num_warps=1)
    aot(sp._tile_merge_kernel, rt, {"KP": 16, "NC": 256, "BLOCK_R": 8})
    # the "packed" forward at the default bf16 launch, specialised as a real launch would be (aligned
    # pointers and 16-divisible ints, unit query stride): 255 registers, ~190 B of stack, like "onepass"
    from torchpeer.ops.retrieval import triton_packed as pk

    pt = {"q_ptr": "*bf16", "k_ptr": "*bf16", "pi_ptr": "*i32", "pj_ptr": "*i32", "scores_ptr": "*fp32"}
    pt.update(idx_ptr="*i64", scr_s_ptr="*fp32", scr_i_ptr="*i32", flag_ptr="*i32")
    pc = {"stride_qd": 1, "PER_HEAD": False, "DH": 64, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "KP": 16}
    pc.update(CAP=32, NCP=64, FB_BLOCK_N=64, DOT_FP32=False, EVEN_N=True)
    aligned = [a for a in pk._packed_kernel.arg_names if a.endswith("_ptr")] + ["n", "top_k", "n_work", "stride_qt"]
    aot(pk._packed_kernel, pt, pc, aligned=tuple(aligned))
    # the "queue" forward, same launch, D 4, 16 tiles (4 tile bits per key): 255 registers, ~340 B of stack
    # (spills in the queue-filling loop; NOTES_retrieval.md section 9)
    from torchpeer.ops.retrieval import triton_queue as tq

    aligned = [a for a in tq._queue_kernel.arg_names if a.endswith("_ptr")] + ["n", "top_k", "n_work", "stride_qt"]
    aot(tq._queue_kernel, pt, {**pc, "D": 4, "TBITS": 4}, aligned=tuple(aligned))


if __name__ == "__main__":
    main()
