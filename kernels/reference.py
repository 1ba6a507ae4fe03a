"""Eager PyTorch references of every op in `dopsd_kernels`.

They are the ground truth of the tests and benchmarks and the fallback the public ops run when Triton
cannot (CPU without the interpreter, `DOPSD_KERNELS=0`, unsupported layouts). Each one reproduces the
diffusers computation it replaces operation by operation, so the fallback is bit-identical to the
unpatched model; the only deliberate change is that fp64 inputs are computed in fp64 (diffusers upcasts
to fp32, which would make fp64 comparisons meaningless).

Shapes: activations are (B, ..., D); a modulation parameter (scale, shift, gate) is one row per sample,
(B, D) or (B, 1, D), or one row for all, (D,); it broadcasts over the tokens of its sample.
"""
import torch
import torch.nn.functional as F

_HALF = (torch.float16, torch.bfloat16)


def _bcast(p: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """View a per-sample (B, D) / (B, 1, D) or shared (D,) parameter so that it broadcasts against x."""
    if p is None:
        return None
    d = x.shape[-1]
    if p.numel() == d:
        return p.reshape(d)
    if p.dim() == x.dim():
        return p
    return p.reshape(p.shape[0], *([1] * (x.dim() - 2)), d)


def _upcast(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# ------------------------------------------------------------------------------------------ 1. loss
def distill_loss(x: torch.Tensor, v_student: torch.Tensor, v_teacher: torch.Tensor, sigma,
                 space: str = "x0") -> torch.Tensor:
    """D-OPSD distillation loss, mean-reduced like F.mse_loss over every element of the batch.

    x0 space: mse(x - s*v_S, x - s*v_T) (= s^2 * mse(v_S, v_T)); v space: mse(v_S, v_T). `sigma` is a
    float or a tensor with one value per sample, shape (B,) (or a 0-dim tensor). The teacher is detached.
    """
    v_teacher = v_teacher.detach()
    if space == "v":
        return F.mse_loss(v_student, v_teacher)
    if space != "x0":
        raise ValueError(f"unknown loss space {space!r}")
    if isinstance(sigma, torch.Tensor) and sigma.dim() > 0:
        sigma = sigma.reshape(-1, *([1] * (x.dim() - 1)))
    return F.mse_loss(x - sigma * v_student, x - sigma * v_teacher)


# ------------------------------------------------------------------------------------------ 2. RMSNorm
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """diffusers.models.normalization.RMSNorm.forward (non-NPU path)."""
    variance = x.to(_upcast(x.dtype)).pow(2).mean(-1, keepdim=True)
    h = x * torch.rsqrt(variance + eps)
    if weight is None:
        return h.to(x.dtype)
    if weight.dtype in _HALF:
        h = h.to(weight.dtype)
    return h * weight


def rms_norm_modulated(x: torch.Tensor, weight: torch.Tensor | None, scale: torch.Tensor | None = None,
                       eps: float = 1e-5) -> torch.Tensor:
    """Z-Image's modulated RMSNorm: `RMSNorm(x) * (1 + scale)` (RMSNorm includes its weight)."""
    h = rms_norm(x, weight, eps)
    if scale is None:
        return h
    return h * (1.0 + _bcast(scale, x))


def gated_rms_norm_residual(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None,
                            gate: torch.Tensor | None = None, next_weight: torch.Tensor | None = None,
                            next_scale: torch.Tensor | None = None, eps: float = 1e-5,
                            next_eps: float | None = None, has_next: bool | None = None):
    """Z-Image block boundary: `x' = x + tanh(gate) * RMSNorm(y)`, then `h = RMSNorm'(x') * (1 + scale')`.

    Returns (x', h) when the next norm is requested (`has_next`, default: `next_weight is not None`),
    else x'. `gate` None means no gate (Z-Image's unmodulated context-refiner blocks).
    """
    if has_next is None:
        has_next = next_weight is not None
    branch = rms_norm(y, weight, eps)
    if gate is not None:
        branch = _bcast(gate, x).tanh() * branch
    out = x + branch
    if not has_next:
        return out
    return out, rms_norm_modulated(out, next_weight, next_scale, eps if next_eps is None else next_eps)


# ------------------------------------------------------------------------------------------ 3. LayerNorm
def layer_norm_modulated(x: torch.Tensor, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                         eps: float = 1e-6) -> torch.Tensor:
    """FLUX.2's modulated LayerNorm (no affine): `LayerNorm(x) * (1 + scale) + shift`."""
    h = F.layer_norm(x, (x.shape[-1],), eps=eps)
    if scale is not None:
        h = h * (1 + _bcast(scale, x))
    if shift is not None:
        h = h + _bcast(shift, x)
    return h


def gated_residual_layer_norm(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None,
                              scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                              eps: float = 1e-6, norm: bool = True):
    """FLUX.2 gated residual `x' = x + gate * y`, then (if `norm`) `h = LayerNorm(x') * (1 + scale) + shift`.

    Returns (x', h) when `norm`, else x'.
    """
    out = x + (_bcast(gate, x) * y if gate is not None else y)
    if not norm:
        return out
    return out, layer_norm_modulated(out, scale, shift, eps)


# ------------------------------------------------------------------------------------------ 4. RoPE
def rope_apply(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Z-Image's `apply_rotary_emb` (ZSingleStreamAttnProcessor): complex multiplication of pairs.

    x: (B, S, H, Dh) with interleaved (real, imag) pairs; freqs_cis: complex (B, S, Dh/2) (or (S, Dh/2)),
    broadcast over the heads. Computed in fp32 (fp64 for fp64 inputs), returned in x's dtype.
    """
    work = torch.complex128 if x.dtype == torch.float64 else torch.complex64
    xc = torch.view_as_complex(x.to(_upcast(x.dtype)).reshape(*x.shape[:-1], -1, 2))
    f = freqs_cis.to(work).unsqueeze(-2)
    return torch.view_as_real(xc * f).flatten(-2).type_as(x)


# ------------------------------------------------------------------------------------------ 5. segmented LoRA
def segmented_lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          a_teacher: torch.Tensor, b_teacher: torch.Tensor, a_student: torch.Tensor,
                          b_student: torch.Tensor, scale: float, n_teacher: int) -> torch.Tensor:
    """LoRA mode's packed dual forward through one linear: a frozen base shared by both roles, one adapter each.

    x (N, in) or (B, ..., in): the first `n_teacher` entries of dim 0 are teacher rows, the rest student
    rows. Each segment is peft's `lora.Linear.forward` with its own adapter,
    `base(x) + lora_B(lora_A(x)) * scaling` (x cast to the adapter's dtype for the LoRA branch, the sum cast
    back to the base output's dtype), with A (r, in), B (out, r), scaling = lora_alpha / r. The teacher
    segment runs under no_grad (no gradient to its rows, its adapter or, from its rows, the base; nothing of
    it is saved for backward); the results are concatenated along dim 0.
    """
    if not 0 <= int(n_teacher) <= x.shape[0]:
        raise ValueError(f"segmented_lora_linear: n_teacher={n_teacher} outside [0, {x.shape[0]}]")

    def peft_linear(rows: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
        result = F.linear(rows, weight, bias)
        result_dtype = result.dtype
        rows = rows.to(lora_a.dtype)
        result = result + F.linear(F.linear(rows, lora_a), lora_b) * scale
        return result.to(result_dtype)

    with torch.no_grad():
        y_teacher = peft_linear(x[:n_teacher], a_teacher, b_teacher)
    # own storage for the student rows: autograd saves them, and a view would keep the teacher rows too
    y_student = peft_linear(x[n_teacher:].clone() if n_teacher else x, a_student, b_student)
    return torch.cat([y_teacher, y_student])
