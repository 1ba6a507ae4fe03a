"""Z-Image's fused teacher/student forward (zimage_dual.py, dual.py) against the separate path on the tiny
checkpoint: both teacher routes, LoRA and full fine-tune, with and without gradient checkpointing; the D-OPSD
step with K = 1 and K = 4 under `dual_forward: fused` vs `separate`; and what autograd keeps of the teacher."""
from __future__ import annotations

import copy

import pytest
import torch

from dopsd.adapters import STUDENT, TEACHER, add_lora_adapters, set_active_adapter
from dopsd.config import ModelConfig
from dopsd.models import load_backend
from dopsd.objectives import StepBatch, StepContext, dopsd_objective
from dopsd.teacher import EmaTeacher

# unequal prompt lengths in one batch: the captions (and the VLM teacher's image tokens) differ per sample
PROMPTS = ["a photo of [V] ball", "a [V] ball with red stripes on a green background, studio light"]
ATOL = 1e-5


def _backend(model_dir, route: str, lora: bool):
    torch.manual_seed(0)
    be = load_backend(ModelConfig(path=str(model_dir), teacher_min_pixels=1024, teacher_max_pixels=4096,
                                  teacher_context=route))
    if lora:
        add_lora_adapters(be.transformer, rank=4, alpha=8, targets=be.lora_targets, init="gaussian",
                          with_teacher=True)
        with torch.no_grad():  # both adapters non-zero and different: the roles really differ
            for name, p in be.transformer.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05 if f".{STUDENT}." in name else 0.03)
    return be


def _images(n=2):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_grads_close(g, ref):
    assert g and g.keys() == ref.keys()
    for n in g:  # relative to the tensor's scale: summation order differs near zero entries
        torch.testing.assert_close(g[n], ref[n], rtol=1e-4, atol=1e-4 * ref[n].abs().max().item())


@pytest.mark.parametrize("route", ["vlm", "reference"])
@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_equals_separate(tiny_model_dir, route, mode, checkpointing):
    be = _backend(tiny_model_dir, route, lora=mode == "lora")
    student = be.transformer
    if checkpointing:
        student.enable_gradient_checkpointing()
    if mode == "lora":
        teacher = student
    else:
        student.requires_grad_(True)
        teacher = copy.deepcopy(student)  # a different network (an EMA that has moved), trainable flags kept
        with torch.no_grad():
            for p in teacher.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    c_s, c_t = be.encode_student(PROMPTS), be.encode_teacher(PROMPTS, _images())
    assert sum(len(c) for c in c_s) != 2 * len(c_s[0])  # unequal lengths within the batch
    x = torch.randn(be.latent_shape(2, 32, 32), generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([0.75, 0.4])
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))

    if mode == "lora":
        set_active_adapter(student, TEACHER)
    with torch.no_grad():
        vt_ref = be.velocity(teacher, x, sigma, c_t)
    set_active_adapter(student, STUDENT) if mode == "lora" else None
    vs_ref = be.velocity(student, x, sigma, c_s)
    (vs_ref * w).sum().backward()
    ref = _grads(student)
    student.zero_grad(set_to_none=True)

    vt, vs = be.dual_velocity(teacher, student, x, sigma, c_t, c_s)
    (vs * w).sum().backward()
    assert not vt.requires_grad and vs.requires_grad
    assert (vt_ref - vs_ref).abs().max() > 1e-3
    torch.testing.assert_close(vt, vt_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(vs, vs_ref, atol=ATOL, rtol=0)
    _assert_grads_close(_grads(student), ref)
    if mode == "lora":
        assert all(f".{STUDENT}." in n for n in ref)
    else:
        assert len(ref) == len(list(student.parameters()))
        assert all(p.grad is None for p in teacher.parameters())  # trainable flags on, still no gradient


@pytest.mark.parametrize("route", ["vlm", "reference"])
@pytest.mark.parametrize("k", [1, 4])
def test_dopsd_step_fused_equals_separate(tiny_model_dir, route, k):
    """The whole D-OPSD step: per-step losses and every LoRA gradient under both settings."""
    results, grads = {}, {}
    for dual in ("separate", "fused"):
        be = _backend(tiny_model_dir, route, lora=True)
        teacher = EmaTeacher.for_lora(be.transformer, decay=0.9)
        ctx = StepContext(be, be.transformer, teacher, dual_forward=dual)
        batch = StepBatch(PROMPTS, _images(), [torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)],
                          be.sigmas(k, be.latent_shape(2, 32, 32)))
        results[dual] = dopsd_objective(ctx, batch)
        grads[dual] = _grads(be.transformer)
    assert len(results["fused"].terms) == k and results["fused"].backpropagated == k
    assert results["fused"].terms == pytest.approx(results["separate"].terms, rel=1e-5, abs=1e-9)
    _assert_grads_close(grads["fused"], grads["separate"])


def _saved_storage_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of what `fn` builds."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_autograd_keeps_nothing_of_the_teacher(tiny_model_dir):
    """What the fused call keeps for the backward does not depend on the teacher's input at all (a teacher
    context 4x longer keeps exactly as much), no gradient reaches a teacher input, and it keeps no more than
    the student's forward alone does (the separate path's student call)."""
    be = _backend(tiny_model_dir, "vlm", lora=True)
    tr = be.transformer
    c_s = be.encode_student(PROMPTS)
    short = [c.clone().requires_grad_(True) for c in be.encode_teacher(PROMPTS, _images())]
    long = [torch.cat([c] * 4).detach().requires_grad_(True) for c in short]
    x = torch.randn(be.latent_shape(2, 32, 32), generator=torch.Generator().manual_seed(5))

    def fused(c_t):
        out = {}
        return lambda: out.setdefault("v", be.dual_velocity(tr, tr, x, 0.5, c_t, c_s))

    b_short, b_long = _saved_storage_bytes(fused(short)), _saved_storage_bytes(fused(long))
    b_student = _saved_storage_bytes(lambda: be.velocity(tr, x, 0.5, c_s))
    assert b_short == b_long
    assert b_short <= 1.05 * b_student, (b_short, b_student)

    vt, vs = be.dual_velocity(tr, tr, x, 0.5, long, c_s)
    vs.square().sum().backward()
    assert vt.grad_fn is None and all(c.grad is None for c in long)
    assert all(p.grad is None for n, p in tr.named_parameters() if f".{TEACHER}." in n or "lora" not in n)


def test_triton_op_path_keeps_nothing_of_the_teacher(tiny_model_dir, gpu_tiles):
    """With the kernels patched in, LoRA layers take the packed Triton op (the interpreter here): same outputs
    as the eager path, and still nothing kept that depends on the teacher's length."""
    from dopsd_kernels import patch

    be = _backend(tiny_model_dir, "vlm", lora=True)
    tr = be.transformer
    c_s = be.encode_student(PROMPTS[:1])
    short = be.encode_teacher(PROMPTS[:1], _images(1))
    long = [torch.cat([c] * 3) for c in short]
    x = torch.randn(be.latent_shape(1, 32, 32), generator=torch.Generator().manual_seed(5))
    eager = be.dual_velocity(tr, tr, x, 0.5, short, c_s)
    assert be.apply_kernels(tr) > 0
    calls = []
    import dopsd_kernels

    op = dopsd_kernels.segmented_lora_linear

    def counting(*args):
        calls.append(args[-1])
        return op(*args)

    dopsd_kernels.segmented_lora_linear = counting
    try:
        packed = be.dual_velocity(tr, tr, x, 0.5, short, c_s)
        sizes = [_saved_storage_bytes(lambda: be.dual_velocity(tr, tr, x, 0.5, c, c_s)) for c in (short, long)]
    finally:
        dopsd_kernels.segmented_lora_linear = op
        patch.unpatch(tr)
    assert calls and all(n > 0 for n in calls)  # the packed op, with teacher rows in it
    for a, b in zip(eager, packed):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert sizes[0] == sizes[1]
