"""The fused teacher/student forward: both roles of a D-OPSD roll-out state through one pass of the DiT.

A backend writes its DiT's forward once, for one role, as a generator (a "stream") that yields every linear
layer call it makes instead of calling it: `y = yield Linear(module, x)`, or several at once,
`q, k, v = yield [Linear(..), Linear(..), Linear(..)]`. `lockstep` runs the teacher's stream (under no_grad)
and the student's side by side and answers each pair of requests with one call of the module:

- LoRA mode (teacher and student are one DiT with two peft adapters): one module call for both roles, so
  that ZeRO-3 gathers the layer's weights once for both. A LoRA layer applies its frozen base to the packed
  rows of both roles and each adapter to its own rows (`dopsd_kernels.segmented_lora_linear`, when the run
  patched the kernels in; its eager twin otherwise, on each role's rows without packing: the packed op
  copies the student's rows out of the packed buffers, so that autograd keeps nothing of the teacher); a frozen
  plain linear runs on each role's rows inside that one call (autograd saves no activation for a frozen
  weight), and once when both roles give it the same tensor (what depends on the timestep alone).
- different modules (full fine-tune: the teacher is an EMA or frozen copy): each role through its own module.

Everything between linears (norms, modulation, RoPE, attention) runs per role with the role's own sequence
length: no role is padded to the other's length, and the teacher's ops run under no_grad, so autograd
records nothing of the teacher. Attention is per role and per sample-padded within the role only, as the
model's own forward does it (the block mask of packed attention, computed as one call per segment).
"""
from __future__ import annotations

import contextvars
import functools
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Generator

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import STUDENT, TEACHER


@dataclass
class Linear:
    """A stream's request: `module(x)` for a linear layer (nn.Linear or a peft LoRA Linear around one)."""
    module: nn.Module
    x: torch.Tensor


Stream = Generator[Any, Any, Any]


@dataclass
class Checkpointed:
    """A stream's request to run the sub-stream `fn(*args)` (one block) with activation checkpointing: the
    student's activations inside are recomputed in the backward, by the student's block alone."""
    fn: Callable[..., Stream]
    args: tuple


# Whether LoRA layers take dopsd_kernels' Triton op or its eager twin: the op when the run patched the kernels
# into the DiT (model.kernels; CUDA by default), so a CPU run does not interpret Triton in every layer.
_KERNELS = contextvars.ContextVar("dopsd_dual_kernels", default=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside an engine wrapper (DeepSpeed's engine holds it as `.module`)."""
    return getattr(model, "module", model)


# ---------------------------------------------------------------------------------------------- one call
def is_lora_layer(module: nn.Module) -> bool:
    lora_a = getattr(module, "lora_A", None)
    return isinstance(lora_a, nn.ModuleDict) and hasattr(module, "get_base_layer")


def _lora_pair_supported(module: nn.Module) -> bool:
    """Both adapters present, plain LoRA (no DoRA, no dropout, not merged): what the segmented op computes."""
    if not (TEACHER in module.lora_A and STUDENT in module.lora_A) or getattr(module, "merged", False):
        return False
    if any(getattr(module, "use_dora", {}).get(n, False) for n in (TEACHER, STUDENT)):
        return False
    if module.scaling[TEACHER] != module.scaling[STUDENT]:
        return False
    return all(isinstance(module.lora_dropout[n], nn.Identity) for n in (TEACHER, STUDENT))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _shared_call(module: nn.Module, x_t: torch.Tensor | None, x_s: torch.Tensor
                 ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Both roles through one module whose weights they share (called as the module's forward, see
    `_as_forward`). Returns (y_teacher, y_student) in the inputs' shapes. Without a teacher (x_t None: a
    checkpointed block recomputed in the backward) the student's rows take the same ops, so that autograd
    saves the same tensors as in the forward."""
    if x_t is None:
        x_t = x_s.new_empty((0, x_s.shape[-1]))
        y_t, y_s = _shared_call(module, x_t, x_s)
        return None, y_s
    out_t, out_s = x_t.shape[:-1], x_s.shape[:-1]
    if is_lora_layer(module):
        import dopsd_kernels

        base = module.get_base_layer()
        args = (base.weight, base.bias, module.lora_A[TEACHER].weight, module.lora_B[TEACHER].weight,
                module.lora_A[STUDENT].weight, module.lora_B[STUDENT].weight, module.scaling[STUDENT])
        rows_t, rows_s = _rows(x_t), _rows(x_s)
        n_t, d_out = rows_t.shape[0], base.weight.shape[0]
        if not _KERNELS.get():
            # eager: each role's rows by themselves (no packing, so no copies; the student's input is saved
            # as the very tensor its other projections save too)
            op = dopsd_kernels.reference.segmented_lora_linear
            with torch.no_grad():
                y_t = op(rows_t, *args, n_t)
            return y_t.view(*out_t, d_out), op(rows_s, *args, 0).view(*out_s, d_out)
        # the Triton op: the base GEMM and the low-rank shrink over the packed rows of both roles at once
        y = dopsd_kernels.segmented_lora_linear(torch.cat([rows_t.to(x_s.dtype), rows_s]), *args, n_t)
        # the student's rows get their own storage: a view would keep the teacher's rows alive as long as
        # autograd holds the student's output (the next op saves it)
        y_s = y[n_t:].clone() if n_t else y
        return y[:n_t].detach().view(*out_t, d_out), y_s.view(*out_s, d_out)
    if x_t is x_s and not x_s.requires_grad:  # the same input (timestep work): compute it once
        y = F.linear(x_s, module.weight, module.bias)
        return y, y
    with torch.no_grad():
        y_t = F.linear(x_t, module.weight, module.bias)
    return y_t, F.linear(x_s, module.weight, module.bias)


@contextmanager
def _as_forward(module: nn.Module, fn: Callable):
    """Make `fn` the module's forward for one call, so that `module(...)` runs every forward hook around it:
    under ZeRO-3 those gather the module's parameters (and its registered external ones) for the call and
    hook its outputs for the backward's gather."""
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.__dict__["forward"] = fn
    try:
        yield
    finally:
        if had:
            module.__dict__["forward"] = previous
        else:
            del module.__dict__["forward"]


def _shareable(module: nn.Module) -> bool:
    if is_lora_layer(module):
        return _lora_pair_supported(module)
    return isinstance(module, nn.Linear) and not any(p.requires_grad for p in module.parameters())


def answer(req_t: Linear | None, req_s: Linear) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One pair of requests: (teacher output, student output). A teacher request may be None (no teacher)."""
    m_s = req_s.module
    if req_t is None:
        if _shareable(m_s):
            with _as_forward(m_s, functools.partial(_shared_call, m_s)):
                return m_s(None, req_s.x)
        return None, m_s(req_s.x)
    m_t = req_t.module
    if m_t is m_s and _shareable(m_s):
        with _as_forward(m_s, functools.partial(_shared_call, m_s)):
            return m_s(req_t.x, req_s.x)
    if m_t is m_s and is_lora_layer(m_s):
        raise NotImplementedError(f"fused forward: {type(m_s).__name__} has a LoRA set-up the segmented op does "
                                  "not compute (DoRA, dropout, unequal scaling or a merged adapter); use "
                                  "train.dual_forward: separate")
    if m_t is m_s:  # a shared module with trainable weights: one role at a time
        raise NotImplementedError("fused forward: teacher and student share a module with trainable weights")
    with torch.no_grad():
        y_t = m_t(req_t.x)
    return y_t, m_s(req_s.x)


# ---------------------------------------------------------------------------------------------- streams
def _alone(student: Stream) -> Any:
    """Run the student's stream by itself (a checkpointed block's recomputation)."""
    reply = None
    while True:
        try:
            req = student.send(reply)
        except StopIteration as stop:
            return stop.value
        if isinstance(req, Checkpointed):
            raise RuntimeError("fused forward: nested checkpointed blocks")
        reply = [answer(None, r)[1] for r in req] if isinstance(req, list) else answer(None, req)[1]


def _checkpointed(req_t: Checkpointed, req_s: Checkpointed) -> tuple[Any, Any]:
    """One block of both roles under non-reentrant checkpointing of the student's part. The first run is the
    fused one (the teacher's half is no_grad, so checkpointing keeps nothing of it anyway); the backward's
    recomputation runs the student's block alone, through the same ops, so autograd finds the tensors it saved."""
    from torch.utils.checkpoint import checkpoint

    teacher_out = []
    kernels = _KERNELS.get()  # the recomputation (in the backward, outside the call) must take the same ops

    def run(*args_s):
        if teacher_out:
            token = _KERNELS.set(kernels)
            try:
                return _alone(req_s.fn(*args_s))
            finally:
                _KERNELS.reset(token)
        out_t, out_s = lockstep(req_t.fn(*req_t.args), req_s.fn(*args_s))
        teacher_out.append(out_t)
        return out_s

    out_s = checkpoint(run, *req_s.args, use_reentrant=False)
    return teacher_out[0], out_s


def lockstep(teacher: Stream, student: Stream) -> tuple[Any, Any]:
    """Run two role streams side by side until both return: (teacher result, student result). The
    teacher's code runs under no_grad; each yielded request (or list of requests) is answered pairwise."""
    reply_t = reply_s = None
    while True:
        try:
            with torch.no_grad():
                req_t = teacher.send(reply_t)
        except StopIteration as stop:
            result_t, done_t = stop.value, True
        else:
            done_t = False
        try:
            req_s = student.send(reply_s)
        except StopIteration as stop:
            result_s, done_s = stop.value, True
        else:
            done_s = False
        if done_t or done_s:
            if not (done_t and done_s):
                raise RuntimeError("fused forward: the teacher's and the student's streams made different "
                                   "numbers of linear calls")
            return result_t, result_s
        if isinstance(req_s, Checkpointed) and isinstance(req_t, Checkpointed):
            reply_t, reply_s = _checkpointed(req_t, req_s)
            continue
        if isinstance(req_s, list) != isinstance(req_t, list) or \
                (isinstance(req_s, list) and len(req_s) != len(req_t)):
            raise RuntimeError("fused forward: the teacher's and the student's streams asked for different calls")
        if isinstance(req_s, list):
            pairs = [answer(t, s) for t, s in zip(req_t, req_s)]
            reply_t, reply_s = [p[0] for p in pairs], [p[1] for p in pairs]
        else:
            reply_t, reply_s = answer(req_t, req_s)


def shared_once(m_t: nn.Module, m_s: nn.Module) -> bool:
    """Whether one call of `m_s` can stand for both roles (the same module, frozen, with no adapter inside)."""
    return m_t is m_s and not any(p.requires_grad for p in m_s.parameters()) and \
        not any(is_lora_layer(m) for m in m_s.modules())


@contextmanager
def _gathered(module: nn.Module):
    """ZeRO-3: the root's own parameters (pad tokens...) of a frozen teacher copy, for the duration of the
    fused call (the student's root is gathered by its own forward hooks)."""
    params = [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def fused_call(teacher_model: nn.Module, student_model: nn.Module,
               body: Callable[[nn.Module, nn.Module], tuple[torch.Tensor, torch.Tensor]],
               x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `body(teacher network, student network) -> (v_teacher, v_student)` as the student model's forward:
    through the engine and the root module's hooks (ZeRO-3 traces and gathers as for any forward), once.
    `x` is passed through the call so that the hooks see the step's input."""
    tr_t, tr_s = unwrap(teacher_model), unwrap(student_model)

    def forward(_x):
        with nullcontext() if tr_t is tr_s else _gathered(tr_t):
            v_t, v_s = body(tr_t, tr_s)
        return v_s, v_t.detach()

    from dopsd_kernels.patch import is_patched

    if tr_t is tr_s:
        register_zero3_externals(tr_s)
    token = _KERNELS.set(is_patched(tr_s))
    try:
        with _as_forward(tr_s, forward):
            v_s, v_t = student_model(x)
    finally:
        _KERNELS.reset(token)
    return v_t, v_s


def register_zero3_externals(transformer: nn.Module) -> None:
    """ZeRO-3: a fused call of a LoRA layer reads its base and both adapters' weights from inside the layer's
    own forward (not through the sub-modules' calls): tell ZeRO-3 so it gathers them for that call and for
    its backward. Idempotent; nothing happens without ZeRO-3 parameters."""
    from dopsd_kernels.patch import register_external

    if transformer.__dict__.get("_dopsd_dual_externals"):
        return
    for module in transformer.modules():
        if is_lora_layer(module):
            register_external(module, list(module.parameters()))
    transformer.__dict__["_dopsd_dual_externals"] = True
