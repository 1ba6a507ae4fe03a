"""Fused Z-Image block boundary: gated RMSNorm residual, then the next modulated RMSNorm.

    x' = x + tanh(g) * RMSNorm_wy(y)                 (g: raw adaLN gate, one row per sample, or absent)
    h  = RMSNorm_wn(x') * (1 + s)                    (optional: "the next norm")

Z-Image's block computes, per sub-block, `x = x + tanh(gate) * norm2(branch)` and then `norm1'(x) * scale'`
for the next sub-block; fused, y and x are read once, x' and h written once (eager: ~8 full passes).
tanh is built from the sigmoid (no libdevice): tanh(g) = 2 sigmoid(2g) - 1. h is normalised from x' before
it is rounded to its storage dtype (the eager code normalises the rounded x'; the difference is one
rounding of a half-precision residual).

Backward (per program: one run of one sample's rows; parameter gradients reduced in registers):
    dx' = dx'_out + rstd_x (dnx - nx mean(dnx nx)),  dnx = dh wn (1 + s)     (nx = x' rstd_x)
    dwn += dh nx (1 + s);  ds += dh nx wn
    dx = dx';  dwy += dx' t ny;  dt += dx' wy ny;  dg = dt (1 - t^2)
    dy = rstd_y (dny - ny mean(dny ny)),  dny = dx' t wy                     (ny = y rstd_y, t = tanh g)
"""
from typing import Optional

import torch

from . import reference
from ._common import (acc_dtype, acc_torch_dtype, block_size, device_fn, num_warps_for, param_layout_ok,
                      per_sample_rows, promote, rms_out_dtype, rows_per_tile, split_rows, tl, triton, use_triton)
from .rms_norm import _load_param, _load_param_rows, _rstd_rows, _tile


@device_fn
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _boundary_fwd_kernel(X, Y, WY, G, WN, SN, XO, H, RSTD_Y, RSTD_X, n_rows, rows_per_sample, D, g_stride, s_stride,
                         eps_y, eps_n, HAS_WY: tl.constexpr, HAS_G: tl.constexpr, HAS_NEXT: tl.constexpr,
                         HAS_WN: tl.constexpr, HAS_SN: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    b = rows // rows_per_sample
    offs, mask = _tile(rows, rmask, D, BLOCK_D)
    y = tl.load(Y + offs, mask=mask, other=0.0).to(ACC)
    rstd_y = _rstd_rows(y, D, eps_y)
    branch = y * rstd_y[:, None]
    if HAS_WY:
        branch = branch * _load_param(WY, 0, D, BLOCK_D, ACC, True, 1.0)[None, :]
    if HAS_G:
        branch = branch * _tanh(_load_param_rows(G, b * g_stride, mask, BLOCK_M, BLOCK_D, ACC, True, 0.0))
    xo = tl.load(X + offs, mask=mask, other=0.0).to(ACC) + branch
    tl.store(XO + offs, xo.to(XO.dtype.element_ty), mask=mask)
    tl.store(RSTD_Y + rows, rstd_y, mask=rmask)
    if HAS_NEXT:
        rstd_x = _rstd_rows(xo, D, eps_n)
        h = xo * rstd_x[:, None]
        if HAS_WN:
            h = h * _load_param(WN, 0, D, BLOCK_D, ACC, True, 1.0)[None, :]
        if HAS_SN:
            h = h * (1.0 + _load_param_rows(SN, b * s_stride, mask, BLOCK_M, BLOCK_D, ACC, True, 0.0))
        tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)
        tl.store(RSTD_X + rows, rstd_x, mask=rmask)


@triton.jit
def _boundary_bwd_kernel(Y, WY, G, WN, SN, XO, RSTD_Y, RSTD_X, DXO, DH, DX, DY,
                         DWY_PART, DG_PART, DWN_PART, DSN_PART,
                         rows_per_sample, rows_per_prog, D, g_stride, s_stride,
                         HAS_WY: tl.constexpr, HAS_G: tl.constexpr, HAS_NEXT: tl.constexpr,
                         HAS_WN: tl.constexpr, HAS_SN: tl.constexpr, HAS_DXO: tl.constexpr,
                         ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    # one sample per program: its gate and next scale are constant rows, factored out of the row sums
    wy = _load_param(WY, 0, D, BLOCK_D, ACC, HAS_WY, 1.0)
    if HAS_G:
        t = _tanh(_load_param(G, b * g_stride, D, BLOCK_D, ACC, True, 0.0))
    else:
        t = tl.full([BLOCK_D], 1.0, ACC)
    wn = _load_param(WN, 0, D, BLOCK_D, ACC, HAS_WN, 1.0)
    s1 = 1.0 + _load_param(SN, b * s_stride, D, BLOCK_D, ACC, HAS_SN, 0.0)
    twy = (t * wy)[None, :]
    wns = (wn * s1)[None, :]
    dxn_acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)  # sum dx' * ny  -> dwy = . * t, dt = . * wy
    dhn_acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)  # sum dh * nx   -> dwn = . * (1 + s), ds = . * wn
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
        if HAS_NEXT:
            rstd_x = tl.load(RSTD_X + rows, mask=rmask, other=0.0).to(ACC)[:, None]
            nx = tl.load(XO + offs, mask=mask, other=0.0).to(ACC) * rstd_x
            dh = tl.load(DH + offs, mask=mask, other=0.0).to(ACC)
            dhn_acc += dh * nx
            dnx = dh * wns
            dxo += rstd_x * (dnx - nx * (tl.sum(dnx * nx, axis=1) / D)[:, None])
        tl.store(DX + offs, dxo.to(DX.dtype.element_ty), mask=mask)
        rstd_y = tl.load(RSTD_Y + rows, mask=rmask, other=0.0).to(ACC)[:, None]
        ny = tl.load(Y + offs, mask=mask, other=0.0).to(ACC) * rstd_y
        dxn_acc += dxo * ny
        dny = dxo * twy
        dy = rstd_y * (dny - ny * (tl.sum(dny * ny, axis=1) / D)[:, None])
        tl.store(DY + offs, dy.to(DY.dtype.element_ty), mask=mask)
    dxn = tl.sum(dxn_acc, axis=0)
    part = (b * tl.num_programs(1) + c) * D + cols
    if HAS_WY:
        tl.store(DWY_PART + part, dxn * t, mask=cmask)
    if HAS_G:
        tl.store(DG_PART + part, dxn * wy * (1.0 - t * t), mask=cmask)
    if HAS_NEXT:
        dhn = tl.sum(dhn_acc, axis=0)
        if HAS_WN:
            tl.store(DWN_PART + part, dhn * s1, mask=cmask)
        if HAS_SN:
            tl.store(DSN_PART + part, dhn * wn, mask=cmask)


def _stride(p: Optional[torch.Tensor]) -> int:
    return p.shape[-1] if p is not None and p.shape[0] > 1 else 0


@torch.library.triton_op("dopsd::gated_rms_norm_residual_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, y: torch.Tensor, weight: Optional[torch.Tensor], gate: Optional[torch.Tensor],
            next_weight: Optional[torch.Tensor], next_scale: Optional[torch.Tensor], eps: float, next_eps: float,
            has_next: bool, batch: int, out_dtype: torch.dtype, next_dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (x', h or empty, rstd_y, rstd_x or empty). Parameters are (rows, D) contiguous."""
    D = x.shape[-1]
    xc, yc = x.contiguous(), y.contiguous()
    rows = xc.numel() // D
    acc_t = acc_torch_dtype(x, y, weight, gate, next_weight, next_scale)
    xo = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    h = torch.empty(x.shape if has_next else (0,), dtype=next_dtype, device=x.device)
    rstd_y = torch.empty(rows, dtype=acc_t, device=x.device)
    rstd_x = torch.empty(rows if has_next else 0, dtype=acc_t, device=x.device)
    block = block_size(D)
    tile = rows_per_tile(block)
    torch.library.wrap_triton(_boundary_fwd_kernel)[(triton.cdiv(rows, tile),)](
        xc, yc, weight if weight is not None else xc, gate if gate is not None else xc,
        next_weight if next_weight is not None else xc, next_scale if next_scale is not None else xc,
        xo, h, rstd_y, rstd_x, rows, rows // batch, D, _stride(gate), _stride(next_scale), eps, next_eps,
        HAS_WY=weight is not None, HAS_G=gate is not None, HAS_NEXT=has_next,
        HAS_WN=has_next and next_weight is not None, HAS_SN=has_next and next_scale is not None,
        ACC=acc_dtype(x, y, weight, gate, next_weight, next_scale), BLOCK_M=tile, BLOCK_D=block,
        num_warps=num_warps_for(block * tile))
    return xo, h, rstd_y, rstd_x


@torch.library.triton_op("dopsd::gated_rms_norm_residual_bwd", mutates_args=())
def _bwd_op(dxo: Optional[torch.Tensor], dh: Optional[torch.Tensor], y: torch.Tensor, weight: Optional[torch.Tensor],
            gate: Optional[torch.Tensor], next_weight: Optional[torch.Tensor], next_scale: Optional[torch.Tensor],
            xo: torch.Tensor, rstd_y: torch.Tensor, rstd_x: torch.Tensor, has_next: bool, batch: int,
            x_dtype: torch.dtype
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dy, dweight, dgate, dnext_weight, dnext_scale); absent parameters get empty tensors."""
    D = y.shape[-1]
    yc = y.contiguous()
    rows = yc.numel() // D
    rows_per_sample = rows // batch
    block = block_size(D)
    tile = rows_per_tile(block)
    chunks, per_prog = split_rows(rows_per_sample, batch, y.device, tile)
    acc_t = rstd_y.dtype
    dx = torch.empty(y.shape, dtype=x_dtype, device=y.device)
    dyy = torch.empty(y.shape, dtype=y.dtype, device=y.device)

    def part(p):
        return torch.empty((batch * chunks, D) if p is not None else (0,), dtype=acc_t, device=y.device)

    use_next = has_next and dh is not None
    dwy_p, dg_p = part(weight), part(gate)
    dwn_p = part(next_weight if use_next else None)
    dsn_p = part(next_scale if use_next else None)
    dxo_c = dxo.contiguous() if dxo is not None else yc
    dh_c = dh.contiguous() if dh is not None else yc
    torch.library.wrap_triton(_boundary_bwd_kernel)[(batch, chunks)](
        yc, weight if weight is not None else yc, gate if gate is not None else yc,
        next_weight if next_weight is not None else yc, next_scale if next_scale is not None else yc,
        xo, rstd_y, rstd_x if has_next else rstd_y, dxo_c, dh_c, dx, dyy, dwy_p, dg_p, dwn_p, dsn_p,
        rows_per_sample, per_prog, D, _stride(gate), _stride(next_scale),
        HAS_WY=weight is not None, HAS_G=gate is not None, HAS_NEXT=use_next,
        HAS_WN=use_next and next_weight is not None, HAS_SN=use_next and next_scale is not None,
        HAS_DXO=dxo is not None, ACC=acc_dtype(y, weight, gate, next_weight, next_scale, rstd_y), BLOCK_M=tile,
        BLOCK_D=block, num_warps=num_warps_for(block * tile))

    def reduce_w(p_part, p):
        if p is None:
            return torch.empty(0, dtype=y.dtype, device=y.device)
        return p_part.sum(0).to(p.dtype)

    def reduce_s(p_part, p):
        if p is None:
            return torch.empty(0, dtype=y.dtype, device=y.device)
        r = p_part.view(batch, chunks, D).sum(1)
        if p.shape[0] == 1:
            r = r.sum(0, keepdim=True)
        return r.to(p.dtype)

    def zeros(p):  # h was not used: no gradient reaches the next norm's parameters
        return torch.zeros_like(p) if p is not None else torch.empty(0, dtype=y.dtype, device=y.device)

    dwy = reduce_w(dwy_p, weight)
    dg = reduce_s(dg_p, gate)
    if use_next:
        dwn, dsn = reduce_w(dwn_p, next_weight), reduce_s(dsn_p, next_scale)
    else:
        dwn, dsn = zeros(next_weight), zeros(next_scale)
    return dx, dyy, dwy, dg, dwn, dsn


def _setup(ctx, inputs, output):
    x, y, weight, gate, next_weight, next_scale, eps, next_eps, has_next, batch, _, _ = inputs
    xo, h, rstd_y, rstd_x = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(rstd_y, rstd_x)
    ctx.save_for_backward(y, weight, gate, next_weight, next_scale, xo, rstd_y, rstd_x)
    ctx.has_next = has_next
    ctx.batch = batch
    ctx.x_dtype = x.dtype


def _backward(ctx, dxo, dh, _d1, _d2):
    y, weight, gate, next_weight, next_scale, xo, rstd_y, rstd_x = ctx.saved_tensors
    if dxo is None and dh is None:
        return (None,) * 12
    dx, dy, dwy, dg, dwn, dsn = _bwd_op(dxo, dh if ctx.has_next else None, y, weight, gate, next_weight,
                                        next_scale, xo, rstd_y, rstd_x, ctx.has_next, ctx.batch, ctx.x_dtype)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, dy if need[1] else None,
            dwy if weight is not None and need[2] else None, dg if gate is not None and need[3] else None,
            dwn if next_weight is not None and need[4] else None, dsn if next_scale is not None and need[5] else None,
            None, None, None, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup)


def gated_rms_norm_residual(x: torch.Tensor, y: torch.Tensor, weight: Optional[torch.Tensor],
                            gate: Optional[torch.Tensor] = None, next_weight: Optional[torch.Tensor] = None,
                            next_scale: Optional[torch.Tensor] = None, eps: float = 1e-5,
                            next_eps: Optional[float] = None, has_next: Optional[bool] = None):
    """`x' = x + tanh(gate) * RMSNorm_weight(y)`; with the next norm also `h = RMSNorm_next(x') * (1 + s)`.

    Returns (x', h) when `has_next` (default: `next_weight is not None`), else x'. gate and next_scale are
    (B, D), (B, 1, D), (D,) or None; weights (D,) or None. Output dtypes follow the eager code's promotion.
    """
    if has_next is None:
        has_next = next_weight is not None
    next_eps = eps if next_eps is None else next_eps
    D = x.shape[-1] if x.dim() else 0
    ok = (x.dim() >= 2 and x.shape == y.shape and x.numel() > 0
          and use_triton(x, y, weight, gate, next_weight, next_scale)
          and all(w is None or w.shape == (D,) for w in (weight, next_weight))
          and param_layout_ok(gate, x) and param_layout_ok(next_scale, x))
    if not ok:
        return reference.gated_rms_norm_residual(x, y, weight, gate, next_weight, next_scale, eps, next_eps,
                                                 has_next)
    g2, g_stride = per_sample_rows(gate, x.shape[0], D)
    s2, s_stride = per_sample_rows(next_scale if has_next else None, x.shape[0], D)
    batch = x.shape[0] if (g_stride or s_stride) else 1
    branch = rms_out_dtype(y.dtype, None if weight is None else weight.dtype)
    out_dtype = promote(x.dtype, branch, None if gate is None else gate.dtype)
    next_dtype = promote(rms_out_dtype(out_dtype, None if next_weight is None else next_weight.dtype),
                         None if next_scale is None else next_scale.dtype) if has_next else out_dtype
    xo, h, _, _ = _fwd_op(x, y, weight, g2, next_weight if has_next else None, s2, float(eps), float(next_eps),
                          has_next, batch, out_dtype, next_dtype)
    return (xo, h) if has_next else xo
