"""Modulated LayerNorm as FLUX.2 uses it: `h = LayerNorm(x) * (1 + scale) + shift` (no affine weight).

FLUX.2's `norm1`/`norm2`/`norm_out` and Z-Image's final `norm_final` are `nn.LayerNorm(elementwise_affine
=False)` followed by a per-sample modulation; `scale` and `shift` are each (B, D), (B, 1, D), (D,) or None.
One program per tile of rows in the forward (it stores each row's mean and rstd); (B, chunks) programs in the
backward with the scale/shift gradients reduced in registers, then summed over the partial rows.

Gradients (n = (x - mean) rstd):  dn = dh (1 + s);  dx = rstd (dn - mean(dn) - n mean(dn n));
ds_b = sum over sample b of dh n;  dshift_b = sum over sample b of dh.
"""
from typing import Optional

import torch

from . import reference
from ._common import (acc_dtype, acc_torch_dtype, block_size, device_fn, layer_norm_out_dtype, num_warps_for,
                      param_layout_ok, per_sample_rows, promote, rows_per_tile, split_rows, tl, triton, use_triton)
from .rms_norm import _load_param, _load_param_rows, _tile


@device_fn
def _ln_stats(x, cmask, D, eps):
    """Per-row mean and rstd [BLOCK_M] of a tile whose padding columns are 0; also the centred tile."""
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(cmask, x - mean[:, None], 0.0)
    return mean, 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps), xc


@device_fn
def _ln_modulate_store(x, mask, rmask, rows, b, S, SH, Y, MEAN, RSTD, D, s_stride, sh_stride, eps,
                       HAS_S: tl.constexpr, HAS_SH: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_D: tl.constexpr, offs):
    """LayerNorm(x) * (1 + scale) + shift stored to Y, with each row's mean and rstd (shared by the plain op
    and the fused residual op)."""
    mean, rstd, xc = _ln_stats(x, mask, D, eps)
    h = xc * rstd[:, None]
    if HAS_S:
        h = h * (1.0 + _load_param_rows(S, b * s_stride, mask, BLOCK_M, BLOCK_D, ACC, True, 0.0))
    if HAS_SH:
        h = h + _load_param_rows(SH, b * sh_stride, mask, BLOCK_M, BLOCK_D, ACC, True, 0.0)
    tl.store(Y + offs, h.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _ln_mod_fwd_kernel(X, S, SH, Y, MEAN, RSTD, n_rows, rows_per_sample, D, s_stride, sh_stride, eps,
                       HAS_S: tl.constexpr, HAS_SH: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    b = rows // rows_per_sample
    offs, mask = _tile(rows, rmask, D, BLOCK_D)
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    _ln_modulate_store(x, mask, rmask, rows, b, S, SH, Y, MEAN, RSTD, D, s_stride, sh_stride, eps,
                       HAS_S, HAS_SH, ACC, BLOCK_M, BLOCK_D, offs)


@device_fn
def _ln_bwd_rows(dh, n, rstd, s1, D):
    """dx of `h = n * (1 + s) + shift` for a tile (n = normalised rows, 0 in padding columns)."""
    dn = dh * s1
    return rstd * (dn - (tl.sum(dn, axis=1) / D)[:, None] - n * (tl.sum(dn * n, axis=1) / D)[:, None])


@triton.jit
def _ln_mod_bwd_kernel(X, S, DY, MEAN, RSTD, DX, DS_PART, DSH_PART, rows_per_sample, rows_per_prog, D, s_stride,
                       HAS_S: tl.constexpr, HAS_SH: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    s1 = (1.0 + _load_param(S, b * s_stride, D, BLOCK_D, ACC, HAS_S, 0.0))[None, :]
    ds_acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    dsh_acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    start = b * rows_per_sample + c * rows_per_prog
    end = tl.minimum(start + rows_per_prog, (b + 1) * rows_per_sample)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < end
        offs, mask = _tile(rows, rmask, D, BLOCK_D)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0).to(ACC)[:, None]
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0).to(ACC)[:, None]
        n = tl.where(mask, (tl.load(X + offs, mask=mask, other=0.0).to(ACC) - mean) * rstd, 0.0)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        ds_acc += dy * n
        dsh_acc += dy
        tl.store(DX + offs, _ln_bwd_rows(dy, n, rstd, s1, D).to(DX.dtype.element_ty), mask=mask)
    part = (b * tl.num_programs(1) + c) * D + cols
    if HAS_S:
        tl.store(DS_PART + part, tl.sum(ds_acc, axis=0), mask=cols < D)
    if HAS_SH:
        tl.store(DSH_PART + part, tl.sum(dsh_acc, axis=0), mask=cols < D)


def _stride(p: Optional[torch.Tensor]) -> int:
    return p.shape[-1] if p is not None and p.shape[0] > 1 else 0


def reduce_sample_partials(part: torch.Tensor, p: Optional[torch.Tensor], batch: int, chunks: int,
                           like: torch.Tensor) -> torch.Tensor:
    """Sum (batch * chunks, D) partial rows into p's (1 or batch, D) rows, in p's dtype (empty if p is None)."""
    if p is None:
        return torch.empty(0, dtype=like.dtype, device=like.device)
    r = part.view(batch, chunks, -1).sum(1)
    if p.shape[0] == 1:
        r = r.sum(0, keepdim=True)
    return r.to(p.dtype)


@torch.library.triton_op("dopsd::layer_norm_mod_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], eps: float, batch: int,
            out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (h, mean per row, rstd per row); scale/shift are (1 or B, D) contiguous."""
    D = x.shape[-1]
    xc = x.contiguous()
    rows = xc.numel() // D
    acc_t = acc_torch_dtype(x, scale, shift)
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(rows, dtype=acc_t, device=x.device)
    rstd = torch.empty(rows, dtype=acc_t, device=x.device)
    block = block_size(D)
    tile = rows_per_tile(block)
    torch.library.wrap_triton(_ln_mod_fwd_kernel)[(triton.cdiv(rows, tile),)](
        xc, scale if scale is not None else xc, shift if shift is not None else xc, y, mean, rstd,
        rows, rows // batch, D, _stride(scale), _stride(shift), eps,
        HAS_S=scale is not None, HAS_SH=shift is not None, ACC=acc_dtype(x, scale, shift), BLOCK_M=tile,
        BLOCK_D=block, num_warps=num_warps_for(block * tile))
    return y, mean, rstd


@torch.library.triton_op("dopsd::layer_norm_mod_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
            mean: torch.Tensor, rstd: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dscale or empty, dshift or empty)."""
    D = x.shape[-1]
    xc, dyc = x.contiguous(), dy.contiguous()
    rows = xc.numel() // D
    rows_per_sample = rows // batch
    block = block_size(D)
    tile = rows_per_tile(block)
    chunks, per_prog = split_rows(rows_per_sample, batch, x.device, tile)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ds_p = torch.empty((batch * chunks, D) if scale is not None else (0,), dtype=rstd.dtype, device=x.device)
    dsh_p = torch.empty((batch * chunks, D) if shift is not None else (0,), dtype=rstd.dtype, device=x.device)
    torch.library.wrap_triton(_ln_mod_bwd_kernel)[(batch, chunks)](
        xc, scale if scale is not None else xc, dyc, mean, rstd, dx, ds_p, dsh_p, rows_per_sample, per_prog, D,
        _stride(scale), HAS_S=scale is not None, HAS_SH=shift is not None, ACC=acc_dtype(x, scale, shift, rstd),
        BLOCK_M=tile, BLOCK_D=block, num_warps=num_warps_for(block * tile))
    return (dx, reduce_sample_partials(ds_p, scale, batch, chunks, x),
            reduce_sample_partials(dsh_p, shift, batch, chunks, x))


def _setup(ctx, inputs, output):
    x, scale, shift, eps, batch, _ = inputs
    _, mean, rstd = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, scale, shift, mean, rstd)
    ctx.batch = batch


def _backward(ctx, dh, _dm, _dr):
    x, scale, shift, mean, rstd = ctx.saved_tensors
    if dh is None:
        return (None,) * 6
    dx, ds, dsh = _bwd_op(dh, x, scale, shift, mean, rstd, ctx.batch)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, ds if scale is not None and need[1] else None,
            dsh if shift is not None and need[2] else None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup)


def layer_norm_modulated(x: torch.Tensor, scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                         eps: float = 1e-6) -> torch.Tensor:
    """`LayerNorm(x) * (1 + scale) + shift` without affine weight; dtypes follow the eager code."""
    if (x.dim() < 2 or x.numel() == 0 or not use_triton(x, scale, shift)
            or not param_layout_ok(scale, x) or not param_layout_ok(shift, x)):
        return reference.layer_norm_modulated(x, scale, shift, eps)
    D = x.shape[-1]
    s2, s_stride = per_sample_rows(scale, x.shape[0], D)
    sh2, sh_stride = per_sample_rows(shift, x.shape[0], D)
    batch = x.shape[0] if (s_stride or sh_stride) else 1
    out_dtype = promote(layer_norm_out_dtype(x), None if scale is None else scale.dtype,
                        None if shift is None else shift.dtype)
    h, _, _ = _fwd_op(x, s2, sh2, float(eps), batch, out_dtype)
    return h
