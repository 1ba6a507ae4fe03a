"""Every Triton kernel compiles for a real GPU target (sm_90: TTIR -> TTGIR -> LLVM -> PTX -> cubin) on a
machine without one.

The interpreter runs the kernels' Python semantics; this catches what only the compiler sees (types,
constexpr branches, layouts, loops with runtime bounds). It runs in a subprocess because the test session
imports dopsd_kernels in interpreter mode.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r'''
import itertools, os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as tcompile
from dopsd_kernels import distill, layer_norm, layer_norm_residual, rms_norm, rms_norm_residual, rope

TARGET = GPUTarget("cuda", 90, 32)
count = 0


INTS = {"D", "n_rows", "rows_per_sample", "rows_per_prog", "s_stride", "g_stride", "sh_stride"}


def build(fn, dtype, constexprs, acc_ptrs=(), scalars=(), num_warps=8, ints=INTS):
    """Compile `fn`: constexprs as given, `scalars` fp32, `ints` i32, every other argument a pointer."""
    global count
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in scalars:
            sig[name] = "fp32"
        elif name in ints:
            sig[name] = "i32"
        else:
            sig[name] = "*" + ("fp32" if name in acc_ptrs or name.endswith("_PART") else dtype)
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    assert tcompile(src, target=TARGET, options={"num_warps": num_warps}).asm["cubin"]
    count += 1


ACC = tl.float32
for dt in ("bf16",):  # fp32 differs only in the load/store conversions
    for w, s in itertools.product((True, False), repeat=2):
        c = dict(HAS_W=w, HAS_S=s, ACC=ACC, BLOCK_M=1, BLOCK_D=4096)
        build(rms_norm._rms_mod_fwd_kernel, dt, c, ("RSTD",), ("eps",))
        build(rms_norm._rms_mod_bwd_kernel, dt, dict(c, BLOCK_M=32, BLOCK_D=128), ("RSTD",), num_warps=4)
    for g, nxt in itertools.product((True, False), repeat=2):
        c = dict(HAS_WY=True, HAS_G=g, HAS_NEXT=nxt, HAS_WN=nxt, HAS_SN=nxt, ACC=ACC, BLOCK_M=1, BLOCK_D=4096)
        build(rms_norm_residual._boundary_fwd_kernel, dt, c, ("RSTD_Y", "RSTD_X"), ("eps_y", "eps_n"))
        build(rms_norm_residual._boundary_bwd_kernel, dt, dict(c, HAS_DXO=True), ("RSTD_Y", "RSTD_X"))
    c = dict(HAS_S=True, HAS_SH=True, ACC=ACC, BLOCK_M=1, BLOCK_D=4096)
    build(layer_norm._ln_mod_fwd_kernel, dt, c, ("MEAN", "RSTD"), ("eps",))
    build(layer_norm._ln_mod_bwd_kernel, dt, c, ("MEAN", "RSTD"))
    for norm in (True, False):
        c = dict(HAS_G=True, HAS_NORM=norm, HAS_S=norm, HAS_SH=norm, ACC=ACC, BLOCK_M=1, BLOCK_D=4096)
        build(layer_norm_residual._res_ln_fwd_kernel, dt, c, ("MEAN", "RSTD"), ("eps",))
        build(layer_norm_residual._res_ln_bwd_kernel, dt, dict(c, HAS_DXO=True), ("MEAN", "RSTD"))
    c = dict(ACC=ACC, BLOCK_T=2, BLOCK_H=32, BLOCK_P=64)
    rope_ints = {"n_tok", "S", "H", "P", "f_batched"}
    build(rope._rope_fwd_kernel, dt, c, ("F",), ints=rope_ints)
    build(rope._rope_bwd_kernel, dt, dict(c, NEED_DF=True), ("F", "DF"), ints=rope_ints)
    build(distill._distill_fwd_kernel, dt, dict(COMPUTE_GRAD=True, ACC=ACC, BLOCK=1024), ("W", "PART", "GRAD"),
          ("inv_n",), num_warps=4, ints={"per_sample", "n_blocks"})
build(rms_norm_residual._boundary_bwd_kernel, "fp64",
      dict(HAS_WY=True, HAS_G=True, HAS_NEXT=True, HAS_WN=True, HAS_SN=True, HAS_DXO=True, ACC=tl.float64,
           BLOCK_M=4, BLOCK_D=64), ("RSTD_Y", "RSTD_X"), num_warps=2)
print("compiled", count)
'''


def test_all_kernels_compile_for_sm90_without_a_gpu():
    triton = pytest.importorskip("triton")
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr[-4000:]
    assert "compiled" in res.stdout, res.stdout
    del triton
