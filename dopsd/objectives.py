"""Training objectives: D-OPSD (on-policy self-distillation) and the vanilla SFT flow-matching baseline.

Both take a backend (for model calls), a batch, and a `backward` callable, and return per-term losses.
Calling `backward` from inside the objective lets D-OPSD free each roll-out step's graph at once.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
import torch.nn.functional as F

from .schedule import euler_step, shift_sigmas, x0_from_velocity

Timer = Callable[[str], ContextManager]


def _no_timer(_: str) -> ContextManager:
    return nullcontext()


def distill_loss(x: torch.Tensor, v_student: torch.Tensor, v_teacher: torch.Tensor, sigma: float,
                 space: str = "x0") -> torch.Tensor:
    """MSE between student and (detached) teacher predictions at state x.

    x0 space (the released recipe): mse(x - s v_S, x - s v_T), which equals s^2 * mse(v_S, v_T).
    v space (the paper's text): mse(v_S, v_T).
    """
    v_teacher = v_teacher.detach()
    if space == "x0":
        return F.mse_loss(x0_from_velocity(x, v_student, sigma), x0_from_velocity(x, v_teacher, sigma))
    if space == "v":
        return F.mse_loss(v_student, v_teacher)
    raise ValueError(f"unknown loss space {space!r}")


@dataclass
class StepResult:
    loss: float
    terms: list[float]  # one per roll-out step (D-OPSD) or one (SFT)
    backpropagated: int  # terms whose gradient was accumulated; 0 means there is nothing to apply


def per_sample_randn(shape: tuple[int, ...], generators: list[torch.Generator], device) -> torch.Tensor:
    """Noise drawn sample by sample from each sample's own generator, so a sample's noise does not depend on
    the batch it lands in (1 rank x batch 2 and 2 ranks x batch 1 draw the same numbers)."""
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generators]).to(device)


def _always_finite(_: torch.Tensor) -> bool:
    return True


def _references(references: list[torch.Tensor] | None) -> dict:
    """Keyword for the encoders: passed only with editing data, so that text-only backends written against the
    older protocol (prompts only) keep working."""
    return {"references": references} if references else {}


def dopsd_objective(backend: Any, student: torch.nn.Module, teacher: Any, prompts: list[str],
                    images: torch.Tensor, sigmas: list[float], backward: Callable[[torch.Tensor], None],
                    generators: list[torch.Generator], loss_space: str = "x0", per_step_backward: bool = True,
                    timer: Timer = _no_timer, autocast: Callable[[], ContextManager] = nullcontext,
                    finite: Callable[[torch.Tensor], bool] = _always_finite, student_context: Any = None,
                    teacher_context: Any = None, loss_fn: Callable[..., torch.Tensor] = distill_loss,
                    references: list[torch.Tensor] | None = None) -> StepResult:
    """One D-OPSD step: a K-step Euler roll-out driven by the student, distilling the teacher at every state.

    `teacher.active()` yields the module that predicts in teacher mode (same DiT with the teacher adapter,
    or the EMA copy). Every call below happens in the same order on every rank, whatever the data.
    `finite(loss)` must agree on all ranks: a non-finite term is never backpropagated; the roll-out stops
    there and the step keeps the gradient of the finite terms before it.
    `student_context` / `teacher_context`: precomputed contexts (cached features from the data); the encoders
    are called only for a context that is not given.
    `references` (editing data): one (B, 3, H_i, W_i) batch per reference slot, given to both encoders; the
    teacher's context adds the target after them.
    """
    num_steps = len(sigmas) - 1
    refs = _references(references)
    with timer("encode"), torch.no_grad():
        c_student = backend.encode_student(prompts, **refs) if student_context is None else student_context
        c_teacher = backend.encode_teacher(prompts, images, **refs) if teacher_context is None else teacher_context
    shape = backend.latent_shape(images.shape[0], images.shape[-2], images.shape[-1])
    x = per_sample_randn(shape, generators, backend.device)

    terms: list[float] = []
    total = None
    done = 0
    for k in range(num_steps):
        s, s_next = sigmas[k], sigmas[k + 1]
        x = x.detach()  # no backpropagation through the trajectory
        with timer("teacher"), teacher.active() as teacher_model, autocast():
            v_t = backend.velocity(teacher_model, x, s, c_teacher)
        with timer("student"), autocast():
            v_s = backend.velocity(student, x, s, c_student)
        loss_k = loss_fn(x, v_s, v_t, s, loss_space)  # `distill_loss`, or dopsd_kernels' fused one
        terms.append(loss_k.item())
        if per_step_backward:
            if not finite(loss_k):
                break
            with timer("backward"):
                backward(loss_k / num_steps)
            done += 1
        else:
            total = loss_k / num_steps if total is None else total + loss_k / num_steps
        x = euler_step(x, v_s.detach().float(), s, s_next)
    if not per_step_backward and finite(total):
        with timer("backward"):
            backward(total)
        done = num_steps
    return StepResult(loss=sum(terms) / len(terms), terms=terms, backpropagated=done)


def sample_sft_sigmas(batch: int, method: str, shift: float, generator: torch.Generator) -> torch.Tensor:
    """Noise levels for the SFT baseline, drawn per sample."""
    if method == "logit_normal":
        u = torch.sigmoid(torch.randn(batch, generator=generator, dtype=torch.float64))
    else:
        u = torch.rand(batch, generator=generator, dtype=torch.float64)
    if method == "shifted_uniform":
        u = shift_sigmas(u, shift)
    return u.clamp(1e-3, 1.0).float()


def sft_objective(backend: Any, student: torch.nn.Module, prompts: list[str], images: torch.Tensor,
                  backward: Callable[[torch.Tensor], None], generators: list[torch.Generator],
                  sigma_sampling: str = "shifted_uniform", timer: Timer = _no_timer,
                  autocast: Callable[[], ContextManager] = nullcontext,
                  finite: Callable[[torch.Tensor], bool] = _always_finite,
                  student_context: Any = None, references: list[torch.Tensor] | None = None) -> StepResult:
    """Vanilla flow matching on noised ground truth: x_s = (1 - s) x0 + s n, target v = n - x0.

    This is the off-policy baseline that the paper shows erodes few-step sampling. With editing data the
    student context holds the references, as at inference.
    """
    with timer("encode"), torch.no_grad():
        context = backend.encode_student(prompts, **_references(references)) if student_context is None \
            else student_context
        x0 = torch.cat([backend.encode_images(images[i:i + 1], generator=g)
                        for i, g in enumerate(generators)]).float()
    noise = per_sample_randn(tuple(x0.shape), generators, x0.device)
    shift = backend.schedule_shift(tuple(x0.shape))
    sig = torch.cat([sample_sft_sigmas(1, sigma_sampling, shift, g) for g in generators]).to(x0.device)
    sig_b = sig.view(-1, *([1] * (x0.dim() - 1)))
    x = (1 - sig_b) * x0 + sig_b * noise
    with timer("student"), autocast():
        v = backend.velocity(student, x, sig, context)
    loss = F.mse_loss(v.float(), noise - x0)
    if not finite(loss):
        return StepResult(loss=loss.item(), terms=[loss.item()], backpropagated=0)
    with timer("backward"):
        backward(loss)
    return StepResult(loss=loss.item(), terms=[loss.item()], backpropagated=1)

