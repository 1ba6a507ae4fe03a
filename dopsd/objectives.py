"""Training objectives: D-OPSD (on-policy self-distillation) and the vanilla SFT flow-matching baseline.

An objective is one function `(StepContext, StepBatch) -> StepResult`, registered under its
`train.objective` name with `@objective(...)`; the trainer looks it up in OBJECTIVES and knows nothing else
of it. `StepContext` holds what does not change between steps (backend, the model to call, the teacher,
how to backward, time, autocast and agree on finiteness), built once by the trainer; `StepBatch` is one
step's data. Calling `ctx.backward` from inside the objective lets D-OPSD free each roll-out step's graph at
once. Adding an objective (a fused dual forward, a variant teacher) is one function in this file.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
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


def _always_finite(_: torch.Tensor) -> bool:
    return True


def _plain_backward(loss: torch.Tensor) -> None:
    loss.backward()


@dataclass
class StepContext:
    """Everything an objective needs besides the batch; the same for every step of a run."""
    backend: Any  # the model family's protocol (dopsd/models/base.py)
    student: torch.nn.Module  # what student forwards go through (the engine's model)
    teacher: Any = None  # dopsd.teacher.EmaTeacher, for objectives that need one
    backward: Callable[[torch.Tensor], None] = _plain_backward  # the engine's
    timer: Timer = _no_timer
    autocast: Callable[[], ContextManager] = nullcontext
    # must agree on every rank (a non-finite term on one rank changes every rank's call schedule)
    finite: Callable[[torch.Tensor], bool] = _always_finite
    loss_fn: Callable[..., torch.Tensor] = distill_loss  # or dopsd_kernels' fused one
    loss_space: str = "x0"  # train.loss_space
    per_step_backward: bool = True  # train.backward == "per_step"
    sft_sigma_sampling: str = "shifted_uniform"  # train.sft_sigma_sampling
    dual_forward: str = "separate"  # train.dual_forward: "fused" calls backend.dual_velocity


@dataclass
class StepBatch:
    prompts: list[str]
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    generators: list[torch.Generator]  # one per sample: its noise is named by (seed, step, place in batch)
    sigmas: list[float] = field(default_factory=list)  # the roll-out schedule at this batch's size, K+1 values
    # cached encoder features (lists of per-sample tensors) used instead of the encoders when given
    student_context: Any = None
    teacher_context: Any = None
    references: list[torch.Tensor] | None = None  # editing data: one (B, 3, H_i, W_i) batch per slot

    def split(self, n: int) -> list["StepBatch"]:
        """`n` equal micro-batches, in order (gradient accumulation): sample i keeps its generator, so its noise
        is the same whichever micro-batch it lands in."""
        size, rest = divmod(len(self.prompts), n)
        if rest:
            raise ValueError(f"a batch of {len(self.prompts)} does not split into {n} equal micro-batches")
        if n == 1:
            return [self]

        def part(value, j: int):
            return None if value is None else value[j * size:(j + 1) * size]

        return [StepBatch(prompts=part(self.prompts, j), images=part(self.images, j),
                          generators=part(self.generators, j), sigmas=self.sigmas,
                          student_context=part(self.student_context, j), teacher_context=part(self.teacher_context, j),
                          references=None if self.references is None else [part(r, j) for r in self.references])
                for j in range(n)]


@dataclass(frozen=True)
class Objective:
    name: str
    step: Callable[[StepContext, StepBatch], StepResult]
    needs_teacher: bool  # the trainer builds an EMA / frozen teacher (and its adapter) for it
    term_prefix: str | None = None  # log each term as f"{prefix}{k}" (None: the total only)
    # LoRA: teacher and student forwards run one after the other through different adapters (ZeRO-3's
    # prefetch then only re-gathers; engine_deepspeed turns it off)
    alternating_adapters: bool = False  # (with train.dual_forward: separate; the fused pass does not alternate)

    def __call__(self, ctx: StepContext, batch: StepBatch) -> StepResult:
        return self.step(ctx, batch)


OBJECTIVES: dict[str, Objective] = {}


def objective(name: str, needs_teacher: bool, term_prefix: str | None = None, alternating_adapters: bool = False):
    """Register a step function as `train.objective: name`."""
    def register(fn: Callable[[StepContext, StepBatch], StepResult]) -> Objective:
        OBJECTIVES[name] = Objective(name, fn, needs_teacher, term_prefix, alternating_adapters)
        return OBJECTIVES[name]
    return register


def per_sample_randn(shape: tuple[int, ...], generators: list[torch.Generator], device) -> torch.Tensor:
    """Noise drawn sample by sample from each sample's own generator, so a sample's noise does not depend on
    the batch it lands in (1 rank x batch 2 and 2 ranks x batch 1 draw the same numbers)."""
    if len(generators) != shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generators]).to(device)


def _references(references: list[torch.Tensor] | None) -> dict:
    """Keyword for the encoders: passed only with editing data, so that text-only backends written against the
    older protocol (prompts only) keep working."""
    return {"references": references} if references else {}


@objective("dopsd", needs_teacher=True, term_prefix="loss_k", alternating_adapters=True)
def dopsd_objective(ctx: StepContext, batch: StepBatch) -> StepResult:
    """One D-OPSD step: a K-step Euler roll-out driven by the student, distilling the teacher at every state.

    `ctx.teacher.active()` yields the module that predicts in teacher mode (same DiT with the teacher adapter,
    or the EMA copy); with `ctx.dual_forward == "fused"` one `backend.dual_velocity` call gives both
    predictions (same values, one pass through the DiT). Every call below happens in the same order on every rank, whatever the data.
    A non-finite term (`ctx.finite`, agreed by all ranks) is never backpropagated; the roll-out stops there
    and the step keeps the gradient of the finite terms before it. The encoders are called only for a
    context the batch does not bring cached. With editing data (`references`) both encoders get the
    references; the teacher's context adds the target after them.
    """
    backend, teacher, timer, autocast, finite = ctx.backend, ctx.teacher, ctx.timer, ctx.autocast, ctx.finite
    prompts, images, sigmas = batch.prompts, batch.images, batch.sigmas
    num_steps = len(sigmas) - 1
    refs = _references(batch.references)
    with timer("encode"), torch.no_grad():
        c_student = backend.encode_student(prompts, **refs) if batch.student_context is None \
            else batch.student_context
        c_teacher = backend.encode_teacher(prompts, images, **refs) if batch.teacher_context is None \
            else batch.teacher_context
    shape = backend.latent_shape(images.shape[0], images.shape[-2], images.shape[-1])
    x = per_sample_randn(shape, batch.generators, backend.device)

    terms: list[float] = []
    total = None
    done = 0
    for k in range(num_steps):
        s, s_next = sigmas[k], sigmas[k + 1]
        x = x.detach()  # no backpropagation through the trajectory
        if ctx.dual_forward == "fused":  # both roles in one pass; the teacher's part without autograd
            with timer("forward"), autocast():
                v_t, v_s = backend.dual_velocity(teacher.model, ctx.student, x, s, c_teacher, c_student)
        else:
            with timer("teacher"), teacher.active() as teacher_model, autocast():
                v_t = backend.velocity(teacher_model, x, s, c_teacher)
            with timer("student"), autocast():
                v_s = backend.velocity(ctx.student, x, s, c_student)
        loss_k = ctx.loss_fn(x, v_s, v_t, s, ctx.loss_space)
        terms.append(loss_k.item())
        if ctx.per_step_backward:
            if not finite(loss_k):
                break
            with timer("backward"):
                ctx.backward(loss_k / num_steps)
            done += 1
        else:
            total = loss_k / num_steps if total is None else total + loss_k / num_steps
        x = euler_step(x, v_s.detach().float(), s, s_next)
    if not ctx.per_step_backward and finite(total):
        with timer("backward"):
            ctx.backward(total)
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


@objective("sft", needs_teacher=False)
def sft_objective(ctx: StepContext, batch: StepBatch) -> StepResult:
    """Vanilla flow matching on noised ground truth: x_s = (1 - s) x0 + s n, target v = n - x0.

    This is the off-policy baseline that the paper shows erodes few-step sampling. With editing data the
    student context holds the references, as at inference.
    """
    backend, generators = ctx.backend, batch.generators
    with ctx.timer("encode"), torch.no_grad():
        context = backend.encode_student(batch.prompts, **_references(batch.references)) \
            if batch.student_context is None else batch.student_context
        x0 = torch.cat([backend.encode_images(batch.images[i:i + 1], generator=g)
                        for i, g in enumerate(generators)]).float()
    noise = per_sample_randn(tuple(x0.shape), generators, x0.device)
    shift = backend.schedule_shift(tuple(x0.shape))
    sig = torch.cat([sample_sft_sigmas(1, ctx.sft_sigma_sampling, shift, g) for g in generators]).to(x0.device)
    sig_b = sig.view(-1, *([1] * (x0.dim() - 1)))
    x = (1 - sig_b) * x0 + sig_b * noise
    with ctx.timer("student"), ctx.autocast():
        v = backend.velocity(ctx.student, x, sig, context)
    loss = F.mse_loss(v.float(), noise - x0)
    if not ctx.finite(loss):
        return StepResult(loss=loss.item(), terms=[loss.item()], backpropagated=0)
    with ctx.timer("backward"):
        ctx.backward(loss)
    return StepResult(loss=loss.item(), terms=[loss.item()], backpropagated=1)

