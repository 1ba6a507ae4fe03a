"""FLUX.2 gated residual, optionally fused with the next modulated LayerNorm.

    x' = x + gate * y                                   (gate: one row per sample, or absent)
    h  = LayerNorm(x') * (1 + scale) + shift            (optional, when `norm`)

FLUX.2's double block does `x = x + gate_msa * attn; h = norm2(x) * (1 + scale_mlp) + shift_mlp` and, after
the MLP, `x = x + gate_mlp * ff` (the unfused form, `norm=False`). The normalisation uses x' before it is
rounded to its storage dtype.

Backward: dx' = dx'_out + LayerNorm-modulation backward of dh;  dx = dx';  dy = dx' gate;
dgate_b = sum over sample b of dx' y;  dscale_b = sum dh n;  dshift_b = sum dh.
"""
from typing import Optional

import torch

from . import reference
from ._common import (acc_dtype, acc_torch_dtype, block_size, layer_norm_out_dtype, num_warps_for,
                      param_layout_ok, per_sample_rows, promote, rows_per_tile, split_rows, tl, triton, use_triton)
from .layer_norm import _ln_bwd_rows, _ln_modulate_store, reduce_sample_partials
from .rms_norm import _load_param, _load_param_rows, _tile


@triton.jit
def _res_ln_fwd_kernel(X, Y, G, S, SH, XO, H, MEAN, RSTD, n_rows, rows_per_sample, D, g_stride, s_stride, sh_stride,
                       eps, HAS_G: tl.constexpr, HAS_NORM: tl.constexpr, HAS_S: tl.constexpr, HAS_SH: tl.constexpr,
                       ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    b = rows // rows_per_sample
    offs, mask = _tile(rows, rmask, D, BLOCK_D)
    y = tl.load(Y + offs, mask=mask, other=0.0).to(ACC)
    if HAS_G:
        y = y * _load_param_rows(G, b * g_stride, mask, BLOCK_M, BLOCK_D, ACC, True, 0.0)
    xo = tl.load(X + offs, mask=mask, other=0.0).to(ACC) + y
    tl.store(XO + offs, xo.to(XO.dtype.element_ty), mask=mask)
    if HAS_NORM:
        _ln_modulate_store(xo, mask, rmask, rows, b, S, SH, H, MEAN, RSTD, D, s_stride, sh_stride, eps,
                           HAS_S, HAS_SH, ACC, BLOCK_M, BLOCK_D, offs)


@triton.jit
def _res_ln_bwd_kernel(Y, G, S, XO, MEAN, RSTD, DXO, DH, DX, DY, DG_PART, DS_PART, DSH_PART,
                       rows_per_sample, rows_per_prog, D, g_stride, s_stride,
                       HAS_G: tl.constexpr, HAS_NORM: tl.constexpr, HAS_S: tl.constexpr, HAS_SH: tl.constexpr,
                       HAS_DXO: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    g = _load_param(G, b * g_stride, D, BLOCK_D, ACC, HAS_G, 1.0)[None, :]
    s1 = (1.0 + _load_param(S, b * s_stride, D, BLOCK_D, ACC, HAS_S, 0.0))[None, :]
    dg_acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    ds_acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    dsh_acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    start = b * rows_per_sample + c * rows_per_prog
    end = tl.minimum(start + rows_per_prog, (b + 1) * rows_per_sample)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rmask = rows < end
        offs, mask = _tile(rows, rmask, D, BLOCK_D)
        if HAS_DXO:
            dxo = tl.load(DXO + offs, mask=mask, other=0.0).to(ACC)
        else:
            dxo = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        if HAS_NORM:
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0).to(ACC)[:, None]
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0).to(ACC)[:, None]
            n = tl.where(mask, (tl.load(XO + offs, mask=mask, other=0.0).to(ACC) - mean) * rstd, 0.0)
            dh = tl.load(DH + offs, mask=mask, other=0.0).to(ACC)
            ds_acc += dh * n
            dsh_acc += dh
            dxo += _ln_bwd_rows(dh, n, rstd, s1, D)
        tl.store(DX + offs, dxo.to(DX.dtype.element_ty), mask=mask)
        if HAS_G:
            dg_acc += dxo * tl.load(Y + offs, mask=mask, other=0.0).to(ACC)
        tl.store(DY + offs, (dxo * g).to(DY.dtype.element_ty), mask=mask)
    part = (b * tl.num_programs(1) + c) * D + cols
    if HAS_G:
        tl.store(DG_PART + part, tl.sum(dg_acc, axis=0), mask=cmask)
    if HAS_NORM and HAS_S:
        tl.store(DS_PART + part, tl.sum(ds_acc, axis=0), mask=cmask)
    if HAS_NORM and HAS_SH:
        tl.store(DSH_PART + part, tl.sum(dsh_acc, axis=0), mask=cmask)


def _stride(p: Optional[torch.Tensor]) -> int:
    return p.shape[-1] if p is not None and p.shape[0] > 1 else 0


@torch.library.triton_op("dopsd::gated_residual_layer_norm_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor], scale: Optional[torch.Tensor],
            shift: Optional[torch.Tensor], eps: float, norm: bool, batch: int, out_dtype: torch.dtype,
            norm_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (x', h or empty, mean or empty, rstd or empty)."""
    D = x.shape[-1]
    xc, yc = x.contiguous(), y.contiguous()
    rows = xc.numel() // D
    acc_t = acc_torch_dtype(x, y, gate, scale, shift)
    xo = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    h = torch.empty(x.shape if norm else (0,), dtype=norm_dtype, device=x.device)
    mean = torch.empty(rows if norm else 0, dtype=acc_t, device=x.device)
    rstd = torch.empty(rows if norm else 0, dtype=acc_t, device=x.device)
    block = block_size(D)
    tile = rows_per_tile(block)
    torch.library.wrap_triton(_res_ln_fwd_kernel)[(triton.cdiv(rows, tile),)](
        xc, yc, gate if gate is not None else xc, scale if scale is not None else xc,
        shift if shift is not None else xc, xo, h, mean, rstd, rows, rows // batch, D, _stride(gate),
        _stride(scale), _stride(shift), eps, HAS_G=gate is not None, HAS_NORM=norm, HAS_S=norm and scale is not None,
        HAS_SH=norm and shift is not None, ACC=acc_dtype(x, y, gate, scale, shift), BLOCK_M=tile, BLOCK_D=block,
        num_warps=num_warps_for(block * tile))
    return xo, h, mean, rstd


@torch.library.triton_op("dopsd::gated_residual_layer_norm_bwd", mutates_args=())
def _bwd_op(dxo: Optional[torch.Tensor], dh: Optional[torch.Tensor], y: torch.Tensor, gate: Optional[torch.Tensor],
            scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], xo: torch.Tensor, mean: torch.Tensor,
            rstd: torch.Tensor, batch: int, x_dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dy, dgate, dscale, dshift); absent parameters get empty tensors (zeros if dh is None)."""
    D = y.shape[-1]
    yc = y.contiguous()
    rows = yc.numel() // D
    rows_per_sample = rows // batch
    block = block_size(D)
    tile = rows_per_tile(block)
    chunks, per_prog = split_rows(rows_per_sample, batch, y.device, tile)
    acc_t = acc_torch_dtype(y, gate, scale, shift, rstd)
    use_norm = dh is not None

    def part(p, on=True):
        return torch.empty((batch * chunks, D) if (p is not None and on) else (0,), dtype=acc_t, device=y.device)

    dx = torch.empty(y.shape, dtype=x_dtype, device=y.device)
    dyy = torch.empty(y.shape, dtype=y.dtype, device=y.device)
    dg_p, ds_p, dsh_p = part(gate), part(scale, use_norm), part(shift, use_norm)
    torch.library.wrap_triton(_res_ln_bwd_kernel)[(batch, chunks)](
        yc, gate if gate is not None else yc, scale if scale is not None else yc, xo, mean, rstd,
        dxo.contiguous() if dxo is not None else yc, dh.contiguous() if dh is not None else yc, dx, dyy,
        dg_p, ds_p, dsh_p, rows_per_sample, per_prog, D, _stride(gate), _stride(scale),
        HAS_G=gate is not None, HAS_NORM=use_norm, HAS_S=scale is not None, HAS_SH=shift is not None,
        HAS_DXO=dxo is not None, ACC=acc_dtype(y, gate, scale, shift, rstd), BLOCK_M=tile, BLOCK_D=block,
        num_warps=num_warps_for(block * tile))
    dg = reduce_sample_partials(dg_p, gate, batch, chunks, y)
    if use_norm:
        ds = reduce_sample_partials(ds_p, scale, batch, chunks, y)
        dsh = reduce_sample_partials(dsh_p, shift, batch, chunks, y)
    else:
        ds = torch.zeros_like(scale) if scale is not None else torch.empty(0, dtype=y.dtype, device=y.device)
        dsh = torch.zeros_like(shift) if shift is not None else torch.empty(0, dtype=y.dtype, device=y.device)
    return dx, dyy, dg, ds, dsh


def _setup(ctx, inputs, output):
    x, y, gate, scale, shift, eps, norm, batch, _, _ = inputs
    xo, h, mean, rstd = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(y, gate, scale, shift, xo if norm else None, mean, rstd)
    ctx.norm = norm
    ctx.batch = batch
    ctx.x_dtype = x.dtype


def _backward(ctx, dxo, dh, _dm, _dr):
    y, gate, scale, shift, xo, mean, rstd = ctx.saved_tensors
    if dxo is None and (dh is None or not ctx.norm):
        return (None,) * 10
    dx, dy, dg, ds, dsh = _bwd_op(dxo, dh if ctx.norm else None, y, gate, scale, shift,
                                  xo if xo is not None else y, mean, rstd, ctx.batch, ctx.x_dtype)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, dy if need[1] else None, dg if gate is not None and need[2] else None,
            ds if scale is not None and need[3] else None, dsh if shift is not None and need[4] else None,
            None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup)


def gated_residual_layer_norm(x: torch.Tensor, y: torch.Tensor, gate: Optional[torch.Tensor] = None,
                              scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                              eps: float = 1e-6, norm: bool = True):
    """`x' = x + gate * y`; with `norm`, also `h = LayerNorm(x') * (1 + scale) + shift`. Returns (x', h) or x'."""
    ok = (x.dim() >= 2 and x.shape == y.shape and x.numel() > 0 and use_triton(x, y, gate, scale, shift)
          and param_layout_ok(gate, x) and param_layout_ok(scale, x) and param_layout_ok(shift, x))
    if not ok:
        return reference.gated_residual_layer_norm(x, y, gate, scale, shift, eps, norm)
    D = x.shape[-1]
    g2, g_stride = per_sample_rows(gate, x.shape[0], D)
    s2, s_stride = per_sample_rows(scale if norm else None, x.shape[0], D)
    sh2, sh_stride = per_sample_rows(shift if norm else None, x.shape[0], D)
    batch = x.shape[0] if (g_stride or s_stride or sh_stride) else 1
    out_dtype = promote(x.dtype, y.dtype, None if gate is None else gate.dtype)
    norm_dtype = out_dtype
    if norm:
        probe = x.new_empty((0, D), dtype=out_dtype)  # x' as the eager LayerNorm would see it
        norm_dtype = promote(layer_norm_out_dtype(probe), None if scale is None else scale.dtype,
                             None if shift is None else shift.dtype)
    xo, h, _, _ = _fwd_op(x, y, g2, s2, sh2, float(eps), norm, batch, out_dtype, norm_dtype)
    return (xo, h) if norm else xo
