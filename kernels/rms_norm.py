"""Modulated RMSNorm as Z-Image uses it: `h = RMSNorm_w(x) * (1 + scale)`.

`RMSNorm_w(x) = x * rsqrt(mean(x^2) + eps) * w` (diffusers' RMSNorm, weight included); `scale` is one row
per sample ((B, D) or (B, 1, D), broadcast over that sample's tokens), one row for all ((D,)), or absent
(plain RMSNorm, e.g. the per-head q/k norms). One program per tile of rows in the forward (one row at large
D on a GPU), which also stores each row's rstd; the backward runs (B, chunks) programs, each over a
contiguous run of one sample's rows, with the weight and scale gradients accumulated in registers and
written as partial rows that are summed afterwards (deterministic, no atomics).

Gradients: dn = dh * w * (1 + s);  dx = rstd * (dn - n * mean(dn * n));  dw = sum dh * n * (1 + s);
ds_b = sum over sample b of dh * n * w    (n = x * rstd). A backward program covers rows of one sample
only, so it accumulates sum(dh * n) once and multiplies by (1 + s_b) or w at the end.
"""
from typing import Optional

import torch

from . import reference
from ._common import (acc_dtype, acc_torch_dtype, block_size, device_fn, num_warps_for, param_layout_ok,
                      per_sample_rows, promote, rms_out_dtype, rows_per_tile, split_rows, tl, triton, use_triton)


@device_fn
def _tile(rows, rmask, D, BLOCK_D: tl.constexpr):
    """Offsets and mask of the [BLOCK_M, BLOCK_D] tile of rows `rows` of a row-major (n_rows, D) tensor."""
    cols = tl.arange(0, BLOCK_D)
    return rows[:, None] * D + cols[None, :], rmask[:, None] & (cols < D)[None, :]


@device_fn
def _load_param(PTR, offset, D, BLOCK_D: tl.constexpr, ACC: tl.constexpr, PRESENT: tl.constexpr, DEFAULT: tl.constexpr):
    """One length-D parameter row [BLOCK_D] in ACC, or DEFAULT everywhere when the parameter is absent."""
    cols = tl.arange(0, BLOCK_D)
    if PRESENT:
        v = tl.load(PTR + offset + cols, mask=cols < D, other=0.0).to(ACC)
    else:
        v = tl.full([BLOCK_D], DEFAULT, ACC)
    return v


@device_fn
def _load_param_rows(PTR, offsets, mask, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr,
                     PRESENT: tl.constexpr, DEFAULT: tl.constexpr):
    """Per-row parameter rows [BLOCK_M, BLOCK_D] starting at `offsets` (one per tile row), or DEFAULT."""
    if PRESENT:
        v = tl.load(PTR + offsets[:, None] + tl.arange(0, BLOCK_D)[None, :], mask=mask, other=0.0).to(ACC)
    else:
        v = tl.full([BLOCK_M, BLOCK_D], DEFAULT, ACC)
    return v


@device_fn
def _rstd_rows(x, D, eps):
    return 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)


@triton.jit
def _rms_mod_fwd_kernel(X, W, S, Y, RSTD, n_rows, rows_per_sample, D, s_stride, eps,
                        HAS_W: tl.constexpr, HAS_S: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    offs, mask = _tile(rows, rmask, D, BLOCK_D)
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    rstd = _rstd_rows(x, D, eps)
    h = x * rstd[:, None]
    if HAS_W:
        h = h * _load_param(W, 0, D, BLOCK_D, ACC, True, 1.0)[None, :]
    if HAS_S:
        s_off = (rows // rows_per_sample) * s_stride
        h = h * (1.0 + _load_param_rows(S, s_off, mask, BLOCK_M, BLOCK_D, ACC, True, 0.0))
    tl.store(Y + offs, h.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _rms_mod_bwd_kernel(X, W, S, DY, RSTD, DX, DW_PART, DS_PART, rows_per_sample, rows_per_prog, D, s_stride,
                        HAS_W: tl.constexpr, HAS_S: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    w = _load_param(W, 0, D, BLOCK_D, ACC, HAS_W, 1.0)
    s1 = 1.0 + _load_param(S, b * s_stride, D, BLOCK_D, ACC, HAS_S, 0.0)
    ws = (w * s1)[None, :]
    dyn_acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)  # sum of dy * n; dw = that * (1 + s), ds = that * w
    start = b * rows_per_sample + c * rows_per_prog
    end = tl.minimum(start + rows_per_prog, (b + 1) * rows_per_sample)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < end
        offs, mask = _tile(rows, rmask, D, BLOCK_D)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0).to(ACC)[:, None]
        n = tl.load(X + offs, mask=mask, other=0.0).to(ACC) * rstd
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        dyn_acc += dy * n
        dn = dy * ws
        dx = rstd * (dn - n * (tl.sum(dn * n, axis=1) / D)[:, None])
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    dyn = tl.sum(dyn_acc, axis=0)
    part = (b * tl.num_programs(1) + c) * D + cols
    if HAS_W:
        tl.store(DW_PART + part, dyn * s1, mask=cols < D)
    if HAS_S:
        tl.store(DS_PART + part, dyn * w, mask=cols < D)


def _empty(ref: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=ref.dtype, device=ref.device)


@torch.library.triton_op("dopsd::rms_norm_mod_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, weight: Optional[torch.Tensor], scale: Optional[torch.Tensor], eps: float,
            batch: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, ..., D); weight (D,); scale (1 or B, D) contiguous. Returns (h, rstd per row)."""
    D = x.shape[-1]
    xc = x.contiguous()
    rows = xc.numel() // D
    acc_t = acc_torch_dtype(x, weight, scale)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rstd = torch.empty(rows, dtype=acc_t, device=x.device)
    block = block_size(D)
    tile = rows_per_tile(block)
    torch.library.wrap_triton(_rms_mod_fwd_kernel)[(triton.cdiv(rows, tile),)](
        xc, weight if weight is not None else xc, scale if scale is not None else xc, y, rstd,
        rows, rows // batch, D, D if scale is not None and scale.shape[0] > 1 else 0, eps,
        HAS_W=weight is not None, HAS_S=scale is not None, ACC=acc_dtype(x, weight, scale), BLOCK_M=tile,
        BLOCK_D=block, num_warps=num_warps_for(block * tile))
    return y, rstd


@torch.library.triton_op("dopsd::rms_norm_mod_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], scale: Optional[torch.Tensor],
            rstd: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dweight or empty, dscale (same rows as scale) or empty)."""
    D = x.shape[-1]
    xc = x.contiguous()
    dyc = dy.contiguous()
    rows = xc.numel() // D
    rows_per_sample = rows // batch
    block = block_size(D)
    tile = rows_per_tile(block)
    chunks, per_prog = split_rows(rows_per_sample, batch, x.device, tile)
    acc_t = rstd.dtype
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw_part = torch.empty((batch * chunks, D) if weight is not None else (0,), dtype=acc_t, device=x.device)
    ds_part = torch.empty((batch * chunks, D) if scale is not None else (0,), dtype=acc_t, device=x.device)
    torch.library.wrap_triton(_rms_mod_bwd_kernel)[(batch, chunks)](
        xc, weight if weight is not None else xc, scale if scale is not None else xc, dyc, rstd, dx,
        dw_part, ds_part, rows_per_sample, per_prog, D, D if scale is not None and scale.shape[0] > 1 else 0,
        HAS_W=weight is not None, HAS_S=scale is not None, ACC=acc_dtype(x, weight, scale), BLOCK_M=tile,
        BLOCK_D=block, num_warps=num_warps_for(block * tile))
    dw = dw_part.sum(0).to(weight.dtype) if weight is not None else _empty(x)
    if scale is not None:
        ds = ds_part.view(batch, chunks, D).sum(1)
        if scale.shape[0] == 1:
            ds = ds.sum(0, keepdim=True)
        ds = ds.to(scale.dtype)
    else:
        ds = _empty(x)
    return dx, dw, ds


def _setup(ctx, inputs, output):
    x, weight, scale, eps, batch, _ = inputs
    _, rstd = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, weight, scale, rstd)
    ctx.batch = batch


def _backward(ctx, dh, _drstd):
    x, weight, scale, rstd = ctx.saved_tensors
    if dh is None:
        return None, None, None, None, None, None
    dx, dw, ds = _bwd_op(dh, x, weight, scale, rstd, ctx.batch)
    return (dx if ctx.needs_input_grad[0] else None,
            dw if weight is not None and ctx.needs_input_grad[1] else None,
            ds if scale is not None and ctx.needs_input_grad[2] else None,
            None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup)


def rms_norm_modulated(x: torch.Tensor, weight: Optional[torch.Tensor], scale: Optional[torch.Tensor] = None,
                       eps: float = 1e-5) -> torch.Tensor:
    """`RMSNorm_weight(x) * (1 + scale)`; `scale` (B, D), (B, 1, D), (D,) or None. Same dtype rules as eager."""
    if (x.dim() < 2 or x.numel() == 0 or not use_triton(x, weight, scale)
            or (weight is not None and weight.shape != x.shape[-1:]) or not param_layout_ok(scale, x)):
        return reference.rms_norm_modulated(x, weight, scale, eps)
    D = x.shape[-1]
    s2, s_stride = per_sample_rows(scale, x.shape[0], D)
    batch = x.shape[0] if s_stride else 1
    out_dtype = promote(rms_out_dtype(x.dtype, None if weight is None else weight.dtype),
                        None if scale is None else scale.dtype)
    h, _ = _fwd_op(x, weight, s2, float(eps), batch, out_dtype)
    return h
