"""Segmented two-adapter LoRA linear for the fused dual forward in LoRA mode.

Teacher and student share one frozen base linear and differ only in their LoRA adapters. The packed input
holds both roles along dim 0, teacher entries first: x[:n_teacher] are teacher rows, x[n_teacher:] student
rows (dim 0 is rows for a 2-D x, samples for a (B, ..., in) x). Per row, with seg the row's adapter:

    y = x W^T + b + scale * (x A_seg^T) B_seg^T          A (r, in), B (out, r), scale = alpha / r

exactly peft's `Linear.forward` per segment (`base(x) + lora_B(lora_A(x)) * scaling`, x cast to the adapters'
dtype for the LoRA branch, the result cast back to the base output's dtype).

Autograd: the teacher segment is outside autograd. Only the student rows carry gradient: dx of the student
rows, dA_s, dB_s, and dW / dbias from the student rows when the base requires grad (LoRA mode freezes it:
requires_grad=False, then nothing is computed for it). Teacher rows of dx are zero; A_t and B_t never get a
gradient (they are detached). For backward the op saves the student rows of x (copied out of the packed input
when it holds teacher rows: a view would keep their storage), the student's x A_s^T (n_student, r), W, A_s and B_s: nothing whose size depends on the teacher
segment, and nothing at all for the x rows when neither dA_s nor dW is wanted.

What runs where: the base GEMM x W^T + b (and g W, g^T x in the backward) is cuBLAS through torch, which a
hand Triton GEMM does not beat at DiT sizes. The low-rank part is Triton, with the same three kernels reused:
  shrink  T[rows] = alpha * X[rows] A_seg^T       both segments in one launch: row tiles never straddle the
                                                  split; each tile picks its segment's adapter and output
  expand  Y[rows] += alpha * T[rows] B_seg^T      in place into the base output (no (N, out) LoRA temporary,
                                                  no separate scale, add and concatenation passes)
  reduce  P[c] = alpha * sum_rows U^T V           row-chunked, partials summed after (deterministic)
forward: shrink(x, A_t | A_s) -> xa, expand(xa, B_t | B_s) into y.  backward (student rows, g = dy[n_t:]):
dxa = shrink(g, B_s^T, scale); dx_s = g W (torch) then expand(dxa, A_s^T) into it; dA_s = reduce(dxa, x_s);
dB_s = reduce(xa_s, g, scale)^T. The rank is one tile (r <= 128). Accumulation in fp32 (fp64 for fp64
inputs); tl.dot operands in the adapters' dtype on a GPU (tensor cores for bf16/fp16, as eager rounds there),
upcast to fp32 in the interpreter, whose half-precision arithmetic is wrong.

Falls back to `reference.segmented_lora_linear` when Triton cannot run, under autocast, for mixed base
dtypes, fp64 mixed with lower precisions, empty inputs or ranks above 128.
"""
import math
import struct
from typing import Optional

import torch
import torch.nn.functional as F

from . import reference
from ._common import INTERPRET, acc_torch_dtype, split_rows, tl, triton, use_triton

MAX_RANK = 128
_HALF = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# (BLOCK_M, BLOCK_K, BLOCK_N): one config (the interpreter cannot autotune several), read at every launch. The
# interpreter defaults to 16 (tl.dot's minimum), so that small test shapes span several tiles; whole-model tests
# set the GPU's 64s (tests/conftest.py `gpu_tiles`), which run 16x fewer interpreted programs.
TILES = (16, 16, 16) if INTERPRET else (64, 64, 64)
_WARPS = 1 if INTERPRET else 4


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _segment_tile(pid, split, n_rows, BLOCK_M: tl.constexpr):
    """Which segment row tile `pid` covers: rows [0, split) are segment 0 and [split, n_rows) segment 1; the
    first cdiv(split, BLOCK_M) programs tile segment 0, the rest segment 1 (a tile never crosses the split).
    Returns (in segment 1, rows local to the segment, global rows, row mask)."""
    tiles0 = tl.cdiv(split, BLOCK_M)
    in1 = pid >= tiles0
    seg_start = tl.where(in1, split, 0).to(tl.int64)
    seg_end = tl.where(in1, n_rows, split).to(tl.int64)
    local = tl.where(in1, pid - tiles0, pid).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = seg_start + local
    return in1, local, rows, rows < seg_end


@triton.jit
def _shrink_kernel(X, A0, A1, OUT0, OUT1, split, n_rows, K, R, sxm, sxk, sar, sak, alpha_hi, alpha_lo,
                   ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    """OUT_seg[local rows] = alpha * X[rows] @ A_seg^T (A_seg (R, K) read through strides sar, sak).

    Rows [0, split) are segment 0 and [split, n_rows) segment 1; the first cdiv(split, BLOCK_M) programs
    tile segment 0, the rest segment 1. OUT_seg is (segment rows, R) contiguous in ACC.
    """
    pid = tl.program_id(0)
    in1, local, rows, rmask = _segment_tile(pid, split, n_rows, BLOCK_M)
    if in1:
        A = A1
        OUT = OUT1
    else:
        A = A0
        OUT = OUT0
    rr = tl.arange(0, BLOCK_R)
    rrmask = rr < R
    acc = tl.zeros([BLOCK_M, BLOCK_R], ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        x = tl.load(X + rows[:, None] * sxm + ks[None, :] * sxk, mask=rmask[:, None] & kmask[None, :], other=0.0)
        at = tl.load(A + ks[:, None] * sak + rr[None, :] * sar, mask=kmask[:, None] & rrmask[None, :], other=0.0)
        acc += tl.dot(x.to(DOT), at.to(DOT), input_precision="ieee").to(ACC)
    acc = acc * (tl.cast(alpha_hi, ACC) + tl.cast(alpha_lo, ACC))
    tl.store(OUT + local[:, None] * R + rr[None, :], acc, mask=rmask[:, None] & rrmask[None, :])


@triton.jit
def _expand_kernel(Y, T0, T1, B0, B1, split, n_rows, NOUT, R, sym, sbn, sbr, alpha_hi, alpha_lo,
                   ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    """Y[rows, cols] += alpha * T_seg[local rows] @ B_seg[cols]^T, in place (B_seg (NOUT, R) via sbn, sbr).

    Segments as in `_shrink_kernel`; T_seg (segment rows, R) contiguous in ACC; Y rows of stride sym, unit
    column stride. Grid (row tiles of both segments, column tiles).
    """
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    in1, local, rows, rmask = _segment_tile(pid, split, n_rows, BLOCK_M)
    if in1:
        T = T1
        B = B1
    else:
        T = T0
        B = B0
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < NOUT
    rr = tl.arange(0, BLOCK_R)
    rrmask = rr < R
    t = tl.load(T + local[:, None] * R + rr[None, :], mask=rmask[:, None] & rrmask[None, :], other=0.0)
    bt = tl.load(B + rr[:, None] * sbr + cols[None, :] * sbn, mask=rrmask[:, None] & cmask[None, :], other=0.0)
    d = tl.dot(t.to(DOT), bt.to(DOT), input_precision="ieee").to(ACC)
    d = d * (tl.cast(alpha_hi, ACC) + tl.cast(alpha_lo, ACC))
    offs = rows[:, None] * sym + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    y = tl.load(Y + offs, mask=mask, other=0.0).to(ACC)
    tl.store(Y + offs, (y + d).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_kernel(U, V, PART, n_rows, K, R, rows_per_prog, svm, svk, alpha_hi, alpha_lo,
                   ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   BLOCK_R: tl.constexpr):
    """PART[c, :, cols] = alpha * U[rows_c]^T @ V[rows_c, cols] over chunk c of the rows.

    U (n_rows, R) contiguous in ACC; V (n_rows, K) via strides svm, svk; PART (chunks, R, K) in ACC.
    Grid (column tiles, chunks).
    """
    pid_k = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)
    ks = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    rr = tl.arange(0, BLOCK_R)
    rrmask = rr < R
    acc = tl.zeros([BLOCK_R, BLOCK_K], ACC)
    start = c * rows_per_prog
    end = tl.minimum(start + rows_per_prog, n_rows)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < end
        ut = tl.load(U + rows[None, :] * R + rr[:, None], mask=rrmask[:, None] & rmask[None, :], other=0.0)
        v = tl.load(V + rows[:, None] * svm + ks[None, :] * svk, mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc += tl.dot(ut.to(DOT), v.to(DOT), input_precision="ieee").to(ACC)
    acc = acc * (tl.cast(alpha_hi, ACC) + tl.cast(alpha_lo, ACC))
    tl.store(PART + c * R * K + rr[:, None] * K + ks[None, :], acc, mask=rrmask[:, None] & kmask[None, :])


# ---------------------------------------------------------------------------------------------- launches
_TL = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float64: "float64"}


def _tl_dtype(dtype: torch.dtype):
    return getattr(tl, _TL[dtype])


def _dtypes(x_dtype: torch.dtype, lora_dtype: torch.dtype):
    """(accumulator, tl.dot operand dtype). The LoRA branch runs in the adapters' dtype, as peft casts x to it;
    in the interpreter half operands are upcast to fp32 (its bf16 arithmetic is wrong)."""
    acc = torch.float64 if torch.float64 in (x_dtype, lora_dtype) else torch.float32
    dot = lora_dtype
    if acc == torch.float64 or (INTERPRET and dot in _HALF):
        dot = acc
    return _tl_dtype(acc), _tl_dtype(dot)


def _split_scalar(v: float) -> tuple[float, float]:
    """A Python float as fp32 hi + lo (Triton passes float arguments as fp32; fp64 kernels add both)."""
    hi = struct.unpack("f", struct.pack("f", v))[0]
    return hi, float(v - hi)


def _block_r(r: int) -> int:
    return max(16, triton.next_power_of_2(int(r)))


def _shrink(x, a0, a1, out0, out1, split, alpha, sar, sak, acc, dot):
    _BM, _BK, _BN = TILES
    n_rows, K = x.shape
    R = out0.shape[1] if out0.numel() else out1.shape[1]
    grid = (triton.cdiv(split, _BM) + triton.cdiv(n_rows - split, _BM),)
    hi, lo = _split_scalar(alpha)
    torch.library.wrap_triton(_shrink_kernel)[grid](
        x, a0, a1, out0 if out0.numel() else out1, out1 if out1.numel() else out0, split, n_rows, K, R,
        x.stride(0), x.stride(1), sar, sak, hi, lo, ACC=acc, DOT=dot, BLOCK_M=_BM, BLOCK_K=_BK,
        BLOCK_R=_block_r(R), num_warps=_WARPS)


def _expand(y, t0, t1, b0, b1, split, alpha, sbn, sbr, acc, dot):
    _BM, _BK, _BN = TILES
    n_rows, NOUT = y.shape
    R = t0.shape[1] if t0.numel() else t1.shape[1]
    grid = (triton.cdiv(split, _BM) + triton.cdiv(n_rows - split, _BM), triton.cdiv(NOUT, _BN))
    hi, lo = _split_scalar(alpha)
    torch.library.wrap_triton(_expand_kernel)[grid](
        y, t0 if t0.numel() else t1, t1 if t1.numel() else t0, b0, b1, split, n_rows, NOUT, R, y.stride(0),
        sbn, sbr, hi, lo, ACC=acc, DOT=dot, BLOCK_M=_BM, BLOCK_N=_BN, BLOCK_R=_block_r(R), num_warps=_WARPS)


def _reduce(u, v, alpha, acc, dot):
    """alpha * u^T v: u (n, R) contiguous, v (n, K) -> (R, K) in u's dtype (the accumulator)."""
    _BM, _BK, _BN = TILES
    n_rows, R = u.shape
    K = v.shape[1]
    k_tiles = triton.cdiv(K, _BK)
    chunks, per_prog = split_rows(n_rows, k_tiles, u.device, _BM)
    part = torch.empty((chunks, R, K), dtype=u.dtype, device=u.device)
    hi, lo = _split_scalar(alpha)
    torch.library.wrap_triton(_reduce_kernel)[(k_tiles, chunks)](
        u, v, part, n_rows, K, R, per_prog, v.stride(0), v.stride(1), hi, lo, ACC=acc, DOT=dot, BLOCK_M=_BM,
        BLOCK_K=_BK, BLOCK_R=_block_r(R), num_warps=_WARPS)
    return part.sum(0)


def _empty(ref: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=ref.dtype, device=ref.device)


# ---------------------------------------------------------------------------------------------- ops
@torch.library.triton_op("dopsd::segmented_lora_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], a_t: torch.Tensor,
            b_t: torch.Tensor, a_s: torch.Tensor, b_s: torch.Tensor, scale: float, n_teacher: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, in) packed rows, the first n_teacher the teacher's. Returns (y (N, out), x_s A_s^T (N - n_t, r)
    in the accumulator dtype: saved for dB_s)."""
    n_rows = x.shape[0]
    r = a_s.shape[0]
    acc_t = acc_torch_dtype(x, a_s)
    acc, dot = _dtypes(x.dtype, a_s.dtype)
    y = F.linear(x, weight, bias).contiguous()
    xa_t = torch.empty((n_teacher, r), dtype=acc_t, device=x.device)  # freed when the op returns
    xa_s = torch.empty((n_rows - n_teacher, r), dtype=acc_t, device=x.device)
    _shrink(x, a_t, a_s, xa_t, xa_s, n_teacher, 1.0, a_s.stride(0), a_s.stride(1), acc, dot)
    _expand(y, xa_t, xa_s, b_t, b_s, n_teacher, scale, b_s.stride(0), b_s.stride(1), acc, dot)
    return y, xa_s


@torch.library.triton_op("dopsd::segmented_lora_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x_s: Optional[torch.Tensor], xa_s: Optional[torch.Tensor], weight: torch.Tensor,
            a_s: torch.Tensor, b_s: torch.Tensor, scale: float, n_teacher: int, need_dx: bool, need_dw: bool,
            need_dbias: bool, need_da: bool, need_db: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the student segment: (dx (N, in; teacher rows zero), dW, dbias, dA_s, dB_s), each empty
    when not asked for. dy (N, out); x_s (N - n_t, in) when dA_s or dW is asked; xa_s when dB_s is."""
    n_rows = dy.shape[0]
    n_s = n_rows - n_teacher
    r, d_in = a_s.shape
    acc_t = acc_torch_dtype(dy, a_s)
    acc, dot = _dtypes(dy.dtype, a_s.dtype)
    g = dy[n_teacher:]
    dx, dw, dbias, da, db = (_empty(dy) for _ in range(5))  # distinct tensors: outputs must not alias
    if need_dx:
        dx = torch.empty((n_rows, d_in), dtype=weight.dtype, device=dy.device)
        dx[:n_teacher].zero_()
    if n_s == 0:  # no student rows: every student gradient is zero
        if need_dx:
            dx.zero_()
        zeros = [torch.zeros_like(t) if need else _empty(dy)
                 for t, need in ((weight, need_dw), (weight[:, 0], need_dbias), (a_s, need_da), (b_s, need_db))]
        return (dx, *zeros)
    if need_dx or need_da:  # dxa = scale * g B_s: B_s (out, r) read as B_s^T (r, out)
        dxa = torch.empty((n_s, r), dtype=acc_t, device=dy.device)
        _shrink(g, b_s, b_s, dxa, dxa, 0, scale, b_s.stride(1), b_s.stride(0), acc, dot)
        if need_dx:  # dx_s = g W + dxa A_s: A_s (r, in) read as A_s^T (in, r)
            dx_s = dx[n_teacher:]
            torch.mm(g, weight, out=dx_s)
            _expand(dx_s, dxa, dxa, a_s, a_s, 0, 1.0, a_s.stride(1), a_s.stride(0), acc, dot)
        if need_da:
            da = _reduce(dxa, x_s, 1.0, acc, dot).to(a_s.dtype)
    if need_db:
        db = _reduce(xa_s, g, scale, acc, dot).t().contiguous().to(b_s.dtype)
    if need_dw:
        dw = torch.mm(g.t(), x_s)
    if need_dbias:
        dbias = g.sum(0)
    return dx, dw, dbias, da, db


def _setup(ctx, inputs, output):
    x, weight, bias, a_t, b_t, a_s, b_s, scale, n_teacher = inputs
    _, xa_s = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(xa_s)
    need = ctx.needs_input_grad
    ctx.flags = (bool(need[0]), bool(need[1]), bias is not None and bool(need[2]), bool(need[5]), bool(need[6]))
    need_dx, need_dw, _, need_da, need_db = ctx.flags
    # the student rows only, in storage of their own when there are teacher rows (a view would keep the whole
    # packed input, teacher rows included, alive until the backward); nothing of the teacher segment is kept
    x_s = None
    if need_da or need_dw:
        x_s = x[n_teacher:].clone() if n_teacher else x
    ctx.save_for_backward(x_s, xa_s if need_db else None, weight, a_s, b_s)
    ctx.scale, ctx.n_teacher = scale, n_teacher


def _backward(ctx, dy, _dxa):
    if dy is None:
        return (None,) * 9
    x_s, xa_s, weight, a_s, b_s = ctx.saved_tensors
    need_dx, need_dw, need_dbias, need_da, need_db = ctx.flags
    dx, dw, dbias, da, db = _bwd_op(dy, x_s, xa_s, weight, a_s, b_s, ctx.scale, ctx.n_teacher, *ctx.flags)
    return (dx if need_dx else None, dw if need_dw else None, dbias if need_dbias else None, None, None,
            da if need_da else None, db if need_db else None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup)


# ---------------------------------------------------------------------------------------------- public op
def _check_args(x, weight, bias, a_t, b_t, a_s, b_s, n_teacher):
    if x.dim() < 2:
        raise ValueError(f"segmented_lora_linear: x must be (N, in) or (B, ..., in), got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"segmented_lora_linear: weight {tuple(weight.shape)} does not take inputs of "
                         f"{x.shape[-1]} features")
    d_out, d_in = weight.shape
    if bias is not None and bias.shape != (d_out,):
        raise ValueError(f"segmented_lora_linear: bias {tuple(bias.shape)} is not ({d_out},)")
    r = a_s.shape[0]
    for name, t, shape in (("a_teacher", a_t, (r, d_in)), ("b_teacher", b_t, (d_out, r)),
                           ("a_student", a_s, (r, d_in)), ("b_student", b_s, (d_out, r))):
        if tuple(t.shape) != shape:
            raise ValueError(f"segmented_lora_linear: {name} is {tuple(t.shape)}, expected {shape} "
                             "(A (r, in), B (out, r), the same rank for both adapters)")
    if not 0 <= int(n_teacher) <= x.shape[0]:
        raise ValueError(f"segmented_lora_linear: n_teacher={n_teacher} outside [0, {x.shape[0]}]")


def _kernel_ok(x, weight, bias, a_t, b_t, a_s, b_s) -> bool:
    if x.numel() == 0 or a_s.shape[0] == 0 or a_s.shape[0] > MAX_RANK or weight.shape[0] == 0:
        return False
    if not use_triton(x, weight, bias, a_t, b_t, a_s, b_s) or torch.is_autocast_enabled(x.device.type):
        return False
    base = {x.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    lora = {a_t.dtype, b_t.dtype, a_s.dtype, b_s.dtype}
    if len(base) != 1 or len(lora) != 1:
        return False
    xd, ld = x.dtype, a_s.dtype
    return xd in _FLOATS and ld in _FLOATS and ((xd == torch.float64) == (ld == torch.float64))


def segmented_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          a_teacher: torch.Tensor, b_teacher: torch.Tensor, a_student: torch.Tensor,
                          b_student: torch.Tensor, scale: float, n_teacher: int) -> torch.Tensor:
    """Base linear on all rows plus each role's LoRA on its own rows; see the module docstring.

    x (N, in) or (B, ..., in) with the first `n_teacher` entries of dim 0 the teacher's; weight (out, in);
    bias (out,) or None; A (r, in), B (out, r) per adapter; scale = lora_alpha / r. Returns (..., out) in
    the base output's dtype. Gradient flows only through the student rows (and to W / bias only if they
    require grad, from the student rows); the teacher adapter is detached.
    """
    _check_args(x, weight, bias, a_teacher, b_teacher, a_student, b_student, n_teacher)
    if not _kernel_ok(x, weight, bias, a_teacher, b_teacher, a_student, b_student):
        return reference.segmented_lora_linear(x, weight, bias, a_teacher, b_teacher, a_student, b_student, scale,
                                               n_teacher)
    d_in = x.shape[-1]
    rows_per_entry = math.prod(x.shape[1:-1])
    y, _ = _fwd_op(x.reshape(-1, d_in), weight, bias, a_teacher.detach().contiguous(),
                   b_teacher.detach().contiguous(), a_student.contiguous(), b_student.contiguous(), float(scale),
                   int(n_teacher) * rows_per_entry)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])
