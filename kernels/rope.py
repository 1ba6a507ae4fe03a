"""RoPE apply for Z-Image's 3-axis rotary embedding, in ZSingleStreamAttnProcessor's complex form.

Z-Image concatenates the per-axis (frame, height, width) frequencies into one complex vector per token,
`freqs_cis` (B, S, Dh/2), and rotates every head's interleaved pairs of q and k by it:

    out[..., 2p] + i out[..., 2p+1] = (x[..., 2p] + i x[..., 2p+1]) * freqs_cis[b, s, p]

computed in fp32 and returned in x's dtype. The 3-axis structure lives entirely in `freqs_cis` (built by
diffusers' RopeEmbedder), so one kernel serves any split of the axes. One program per token handles all
heads ([heads, pairs] tile); the backward rotates by the conjugate, and when `freqs_cis` requires grad also
reduces over the heads: dfr = sum_h (dor xr + doi xi), dfi = sum_h (doi xr - dor xi).
"""
import torch

from . import reference
from ._common import (acc_dtype, acc_torch_dtype, block_size, device_fn, num_warps_for, rows_per_tile, tl, triton,
                      use_triton)


@device_fn
def _rope_offsets(tok0, n_tok, S, H, P, f_batched, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_P: tl.constexpr):
    """Offsets and masks of a [tokens, heads, pairs] tile: x (real part), freqs (real part)."""
    toks = tok0 + tl.arange(0, BLOCK_T)
    tt = toks[:, None, None]
    hh = tl.arange(0, BLOCK_H)[None, :, None]
    pp = tl.arange(0, BLOCK_P)[None, None, :]
    tmask = tt < n_tok
    x_mask = tmask & (hh < H) & (pp < P)
    f_rows = tl.where(f_batched != 0, tt, tt % S)
    return tt * (H * 2 * P) + hh * (2 * P) + 2 * pp, f_rows * (2 * P) + 2 * pp, x_mask, tmask & (pp < P)


@triton.jit
def _rope_fwd_kernel(X, F, Y, n_tok, S, H, P, f_batched, ACC: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    tok0 = tl.program_id(0).to(tl.int64) * BLOCK_T
    x_off, f_off, mask, f_mask = _rope_offsets(tok0, n_tok, S, H, P, f_batched, BLOCK_T, BLOCK_H, BLOCK_P)
    xr = tl.load(X + x_off, mask=mask, other=0.0).to(ACC)
    xi = tl.load(X + x_off + 1, mask=mask, other=0.0).to(ACC)
    fr = tl.load(F + f_off, mask=f_mask, other=0.0).to(ACC)
    fi = tl.load(F + f_off + 1, mask=f_mask, other=0.0).to(ACC)
    tl.store(Y + x_off, (xr * fr - xi * fi).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + x_off + 1, (xr * fi + xi * fr).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_bwd_kernel(DY, X, F, DX, DF, n_tok, S, H, P, f_batched, NEED_DF: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    tok0 = tl.program_id(0).to(tl.int64) * BLOCK_T
    x_off, f_off, mask, f_mask = _rope_offsets(tok0, n_tok, S, H, P, f_batched, BLOCK_T, BLOCK_H, BLOCK_P)
    dr = tl.load(DY + x_off, mask=mask, other=0.0).to(ACC)
    di = tl.load(DY + x_off + 1, mask=mask, other=0.0).to(ACC)
    fr = tl.load(F + f_off, mask=f_mask, other=0.0).to(ACC)
    fi = tl.load(F + f_off + 1, mask=f_mask, other=0.0).to(ACC)
    tl.store(DX + x_off, (dr * fr + di * fi).to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + x_off + 1, (di * fr - dr * fi).to(DX.dtype.element_ty), mask=mask)
    if NEED_DF:
        xr = tl.load(X + x_off, mask=mask, other=0.0).to(ACC)
        xi = tl.load(X + x_off + 1, mask=mask, other=0.0).to(ACC)
        dfr = tl.sum(dr * xr + di * xi, axis=1)
        dfi = tl.sum(di * xr - dr * xi, axis=1)
        toks = tok0 + tl.arange(0, BLOCK_T)
        pp = tl.arange(0, BLOCK_P)
        df_off = toks[:, None] * (2 * P) + 2 * pp[None, :]
        df_mask = (toks < n_tok)[:, None] & (pp < P)[None, :]
        tl.store(DF + df_off, dfr.to(DF.dtype.element_ty), mask=df_mask)
        tl.store(DF + df_off + 1, dfi.to(DF.dtype.element_ty), mask=df_mask)


def _launch_args(x: torch.Tensor):
    B, S, H, Dh = x.shape
    P = Dh // 2
    bh, bp = triton.next_power_of_2(H), block_size(P)
    bt = rows_per_tile(bh * bp)
    return B, S, H, P, bt, bh, bp, num_warps_for(bt * bh * bp)


@torch.library.triton_op("dopsd::rope_apply_fwd", mutates_args=())
def _fwd_op(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x (B, S, H, Dh); freqs real (1 or B, S, Dh/2, 2). Returns the rotated x in x's dtype."""
    xc = x.contiguous()
    fc = freqs.contiguous()
    B, S, H, P, bt, bh, bp, warps = _launch_args(x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.library.wrap_triton(_rope_fwd_kernel)[(triton.cdiv(B * S, bt),)](
        xc, fc, y, B * S, S, H, P, 1 if freqs.shape[0] > 1 else 0, ACC=acc_dtype(x, freqs), BLOCK_T=bt, BLOCK_H=bh,
        BLOCK_P=bp, num_warps=warps)
    return y


@torch.library.triton_op("dopsd::rope_apply_bwd", mutates_args=())
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, freqs: torch.Tensor, need_dfreqs: bool
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dx, dfreqs (freqs' shape and dtype) or empty)."""
    dyc = dy.contiguous()
    fc = freqs.contiguous()
    B, S, H, P, bt, bh, bp, warps = _launch_args(dy)
    dx = torch.empty(dy.shape, dtype=x.dtype, device=dy.device)
    acc_t = acc_torch_dtype(x, freqs)
    df = torch.empty((B, S, P, 2) if need_dfreqs else (0,), dtype=acc_t, device=dy.device)
    torch.library.wrap_triton(_rope_bwd_kernel)[(triton.cdiv(B * S, bt),)](
        dyc, x.contiguous() if need_dfreqs else dyc, fc, dx, df, B * S, S, H, P, 1 if freqs.shape[0] > 1 else 0,
        NEED_DF=need_dfreqs, ACC=acc_dtype(x, freqs), BLOCK_T=bt, BLOCK_H=bh, BLOCK_P=bp, num_warps=warps)
    if need_dfreqs:
        if freqs.shape[0] == 1:
            df = df.sum(0, keepdim=True)
        df = df.to(freqs.dtype)
    return dx, df


def _setup(ctx, inputs, output):
    x, freqs = inputs
    ctx.need_df = bool(ctx.needs_input_grad[1])
    ctx.save_for_backward(x if ctx.need_df else None, freqs)
    ctx.x_dtype = x.dtype


def _backward(ctx, dy):
    x, freqs = ctx.saved_tensors
    if dy is None:
        return None, None
    if x is None:
        x = torch.empty(0, dtype=ctx.x_dtype, device=dy.device)
    dx, df = _bwd_op(dy, x, freqs, ctx.need_df)
    return (dx if ctx.needs_input_grad[0] else None), (df if ctx.need_df else None)


_fwd_op.register_autograd(_backward, setup_context=_setup)


def rope_apply(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, S, H, Dh) by complex `freqs_cis` (B, S, Dh/2) or (S, Dh/2), like Z-Image's processor."""
    ok = (x.dim() == 4 and x.shape[-1] % 2 == 0 and x.numel() > 0 and freqs_cis.is_complex()
          and use_triton(x, freqs_cis))
    if ok:
        B, S, H, Dh = x.shape
        f = freqs_cis if freqs_cis.dim() == 3 else freqs_cis.unsqueeze(0)
        ok = f.dim() == 3 and f.shape[0] in (1, B) and f.shape[1:] == (S, Dh // 2)
    if not ok:
        return reference.rope_apply(x, freqs_cis)
    if f.dtype == torch.complex32:
        f = f.to(torch.complex64)
    return _fwd_op(x, torch.view_as_real(f))
