"""D-OPSD distillation loss with the student gradient computed in the forward pass.

    x0 space:  L = mean over all elements of (s_b * (v_S - v_T))^2      (= mse(x - s v_S, x - s v_T))
    v space:   L = mean of (v_S - v_T)^2

with s_b the noise level of sample b (a float or a (B,) tensor). The teacher target is detached. One pass
reads v_S and v_T once and writes per-(sample, block) partial sums of (v_S - v_T)^2 and, when the student
needs a gradient, dL/dv_S = 2 w_b (v_S - v_T) / N (w_b = s_b^2 or 1), kept in fp32 (latents are small; one
rounding to v_S's dtype at the end, like eager); the backward only scales it by the incoming gradient.
x does not enter the x0 form at all (its gradient is exactly zero), so it is never read. A sigma tensor
that requires grad gets dL/ds_b = 2 s_b sum_b (v_S - v_T)^2 / N.
"""
import torch

from . import reference
from ._common import acc_dtype, acc_torch_dtype, triton, tl, use_triton, INTERPRET

_BLOCK = 1024 if not INTERPRET else 256


@triton.jit
def _distill_fwd_kernel(VS, VT, W, PART, GRAD, per_sample, n_blocks, inv_n,
                        COMPUTE_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < per_sample
    base = b * per_sample
    vs = tl.load(VS + base + offs, mask=mask, other=0.0).to(ACC)
    vt = tl.load(VT + base + offs, mask=mask, other=0.0).to(ACC)
    d = vs - vt
    tl.store(PART + b * n_blocks + blk, tl.sum(d * d, axis=0))
    if COMPUTE_GRAD:
        w = tl.load(W + b).to(ACC)
        g = d * (2.0 * w * tl.cast(inv_n, ACC))
        tl.store(GRAD + base + offs, g.to(GRAD.dtype.element_ty), mask=mask)


@torch.library.triton_op("dopsd::distill_loss", mutates_args=())
def _distill_loss_op(x: torch.Tensor, v_student: torch.Tensor, v_teacher: torch.Tensor, weight: torch.Tensor,
                     compute_grad: bool, out_dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, per-sample sum of (v_S - v_T)^2, dloss/dv_S for a unit upstream gradient).

    x is an input only so that autograd gives it its (exactly zero) gradient; it is never read.
    """
    vs = v_student.contiguous()
    vt = v_teacher.contiguous()
    batch = weight.shape[0]
    per_sample = vs.numel() // batch
    acc_t = acc_torch_dtype(vs, vt, weight)
    n_blocks = triton.cdiv(per_sample, _BLOCK)
    part = torch.empty((batch, n_blocks), dtype=acc_t, device=vs.device)
    grad = torch.empty(vs.shape if compute_grad else (0,), dtype=acc_t, device=vs.device)
    w = weight.to(acc_t).contiguous()
    torch.library.wrap_triton(_distill_fwd_kernel)[(batch, n_blocks)](
        vs, vt, w, part, grad, per_sample, n_blocks, 1.0 / vs.numel(),
        COMPUTE_GRAD=compute_grad, ACC=acc_dtype(vs, vt, weight), BLOCK=_BLOCK,
        num_warps=1 if INTERPRET else 4)
    sums = part.sum(dim=1)
    loss = (sums * w).sum() / vs.numel()
    return loss.to(out_dtype), sums, (grad.view(v_student.shape) if compute_grad else grad)


def _setup(ctx, inputs, output):
    x, v_student, v_teacher, weight, compute_grad, _ = inputs
    _, sums, grad = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(sums, grad)
    ctx.save_for_backward(grad, sums, weight)
    ctx.x_meta = (x.shape, x.dtype, x.device)
    ctx.vs_dtype = v_student.dtype
    ctx.compute_grad = compute_grad
    ctx.numel = v_student.numel()


def _backward(ctx, g_loss, _g_sums, _g_grad):
    grad, sums, weight = ctx.saved_tensors
    if g_loss is None:
        return None, None, None, None, None, None
    d_x = d_vs = d_w = None
    if ctx.needs_input_grad[0]:
        shape, dtype, device = ctx.x_meta
        d_x = torch.zeros(shape, dtype=dtype, device=device)
    if ctx.needs_input_grad[1]:
        if not ctx.compute_grad:  # pragma: no cover - the wrapper always asks for it when needed
            raise RuntimeError("dopsd::distill_loss: student gradient was not computed in the forward pass")
        d_vs = (grad * g_loss.to(grad.dtype)).to(ctx.vs_dtype)
    if ctx.needs_input_grad[3]:
        d_w = (sums / ctx.numel * g_loss).to(weight.dtype)
    return d_x, d_vs, None, d_w, None, None


_distill_loss_op.register_autograd(_backward, setup_context=_setup)


def distill_loss(x: torch.Tensor, v_student: torch.Tensor, v_teacher: torch.Tensor, sigma,
                 space: str = "x0") -> torch.Tensor:
    """Drop-in for `dopsd.objectives.distill_loss` with per-sample sigma: float, 0-dim or (B,) tensor."""
    if space not in ("x0", "v"):
        raise ValueError(f"unknown loss space {space!r}")
    if v_student.shape != v_teacher.shape or v_student.numel() == 0 or v_student.dim() == 0:
        return reference.distill_loss(x, v_student, v_teacher, sigma, space)
    if not use_triton(v_student, v_teacher):
        return reference.distill_loss(x, v_student, v_teacher, sigma, space)
    batch = v_student.shape[0]
    v_teacher = v_teacher.detach()
    acc_t = acc_torch_dtype(v_student, v_teacher, x, sigma if isinstance(sigma, torch.Tensor) else None)
    if space == "x0":
        s = sigma if isinstance(sigma, torch.Tensor) else torch.tensor(float(sigma), dtype=acc_t)
        s = s.to(device=v_student.device)
        if s.numel() not in (1, batch):
            raise ValueError(f"sigma has {s.numel()} values for a batch of {batch}")
        weight = (s.reshape(-1).to(acc_t) ** 2).expand(batch)
        out_dtype = torch.promote_types(x.dtype, torch.promote_types(v_student.dtype, v_teacher.dtype))
        if isinstance(sigma, torch.Tensor):
            out_dtype = torch.promote_types(out_dtype, sigma.dtype)
    else:
        weight = torch.ones(batch, dtype=acc_t, device=v_student.device)
        out_dtype = torch.promote_types(v_student.dtype, v_teacher.dtype)
    if v_student.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        out_dtype = torch.float32  # F.mse_loss autocasts to fp32 on CUDA
    compute_grad = torch.is_grad_enabled() and v_student.requires_grad
    if space == "v" or x.shape != v_student.shape:
        x = v_student.new_empty(0)  # not part of the v form; a placeholder input
    loss, _, _ = _distill_loss_op(x, v_student, v_teacher, weight, compute_grad, out_dtype)
    return loss
