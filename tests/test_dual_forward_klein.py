"""FLUX.2-klein's fused teacher/student forward (flux2_dual.py) against two separate `velocity` calls on the tiny
checkpoint: LoRA mode (two adapters in one network) with text-to-image and editing data, whose teacher sequence
is longer than the student's, and full fine-tune (a perturbed copy as the teacher). Outputs and every student
gradient must agree; the timestep work runs once for both roles when they share it; the teacher gets no grad."""
from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from unittest import mock

import pytest
import torch
import torch.utils.checkpoint
from test_flux2_klein import klein_dir  # noqa: F401 (fixture)

from dopsd.adapters import STUDENT, TEACHER, add_lora_adapters, set_active_adapter, student_params
from dopsd.config import ModelConfig
from dopsd.models import load_backend

PROMPTS = ["a photo of [V] ball", "a [V] ball with red stripes on a green background"]
SIGMA = torch.tensor([0.75, 0.4])  # per sample, as the roll-out may give it
ATOL, RTOL = 1e-5, 1e-4


def _case(klein_dir, editing: bool, checkpointing: bool):
    """Backend, teacher and student contexts of a batch of 2 at 16 px, and a state x. The teacher has one more
    reference (the target): its sequence is longer than the student's."""
    be = load_backend(ModelConfig(backend="flux2_klein", path=str(klein_dir), max_text_tokens=16), device="cpu")
    if checkpointing:  # before any copy: a full fine-tune's teacher twin has it too
        be.transformer.enable_gradient_checkpointing()
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 16, generator=gen)
    refs = [torch.rand(2, 3, 8, 8, generator=gen), torch.rand(2, 3, 8, 12, generator=gen)] if editing else None
    c_s, c_t = be.encode_student(PROMPTS, references=refs), be.encode_teacher(PROMPTS, images, references=refs)
    assert c_t.num_reference_tokens > c_s.num_reference_tokens and (c_s.num_reference_tokens > 0) == editing
    return be, c_t, c_s, torch.randn(be.latent_shape(2, 16, 16), generator=gen)


def _grads(params: dict) -> dict:
    return {n: p.grad.clone() for n, p in params.items() if p.grad is not None}


def _compare(be, teacher, student, x, c_t, c_s, params: dict, switch=lambda name: None, around_fused=nullcontext):
    """Separate then fused (inside `around_fused()`) with the loss sum(v_student * w); asserts they agree."""
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    switch(TEACHER)
    with torch.no_grad():
        vt_ref = be.velocity(teacher, x, SIGMA, c_t)
    switch(STUDENT)
    vs_ref = be.velocity(student, x, SIGMA, c_s)
    (vs_ref * w).sum().backward()
    g_ref = _grads(params)
    student.zero_grad(set_to_none=True)

    units, checkpoint = [], torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        units.append(1)
        return checkpoint(*args, **kwargs)

    with around_fused(), mock.patch("torch.utils.checkpoint.checkpoint", counting):
        vt, vs = be.dual_velocity(teacher, student, x, SIGMA, c_t, c_s)
    blocks = len(student.transformer_blocks) + len(student.single_transformer_blocks)
    assert len(units) == (blocks if student.gradient_checkpointing else 0)  # a checkpointed unit a block
    (vs * w).sum().backward()
    g = _grads(params)
    rel = max(((g[n] - g_ref[n]).abs().max() / g_ref[n].abs().max()).item() for n in g)
    print(f"max abs diff: v_teacher {(vt - vt_ref).abs().max():.3g}, v_student {(vs - vs_ref).abs().max():.3g}, "
          f"grads {max((g[n] - g_ref[n]).abs().max().item() for n in g):.3g} ({rel:.3g} of the tensor's max, "
          f"{len(g)} tensors)")
    assert not vt.requires_grad and vs.requires_grad
    assert (vt_ref - vs_ref).abs().max() > 1e-3  # the roles really differ
    torch.testing.assert_close(vt, vt_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(vs, vs_ref, atol=ATOL, rtol=0)
    assert g.keys() == g_ref.keys() and len(g) == len(params)
    for n in g:  # relative to the tensor's scale: float32 summation order differs near zero entries
        torch.testing.assert_close(g[n], g_ref[n], rtol=RTOL, atol=RTOL * g_ref[n].abs().max().item())


def _lora(be):
    tr = be.transformer
    torch.manual_seed(0)
    add_lora_adapters(tr, rank=4, alpha=8, targets=be.lora_targets, init="gaussian", with_teacher=True)
    with torch.no_grad():  # lora_A is drawn per adapter; non-zero lora_B, so both adapters act and differ
        for n, p in tr.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    return tr


CASES = pytest.mark.parametrize("editing,checkpointing", [(False, False), (True, False), (True, True)],
                                ids=["text", "editing", "editing-checkpointing"])


@CASES
def test_fused_equals_separate_lora(klein_dir, editing, checkpointing, monkeypatch):
    be, c_t, c_s, x = _case(klein_dir, editing, checkpointing)
    tr = _lora(be)
    # the timestep work (embedding, the shared modulations, norm_out's) must run once for both roles
    timestep_weights = {id(m.linear.weight): 0 for m in (tr.double_stream_modulation_img, tr.norm_out,
                                                          tr.double_stream_modulation_txt, tr.single_stream_modulation)}
    embeds, linear = [], torch.nn.functional.linear

    def counting(inp, weight, bias=None):
        if id(weight) in timestep_weights:
            timestep_weights[id(weight)] += 1
        return linear(inp, weight, bias)

    @contextmanager
    def counted():
        hook = tr.time_guidance_embed.register_forward_hook(lambda *a: embeds.append(1))
        try:
            with monkeypatch.context() as m:
                m.setattr(torch.nn.functional, "linear", counting)
                yield
        finally:
            hook.remove()

    _compare(be, tr, tr, x, c_t, c_s, student_params(tr), switch=lambda name: set_active_adapter(tr, name),
             around_fused=counted)
    assert len(embeds) == 1 and set(timestep_weights.values()) == {1}


@CASES
def test_fused_equals_separate_full_finetune(klein_dir, editing, checkpointing):
    be, c_t, c_s, x = _case(klein_dir, editing, checkpointing)
    student = be.transformer
    student.requires_grad_(True)
    teacher = copy.deepcopy(student)  # its parameters still require grad: the fused path must not give them one
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2)
        for p in teacher.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    _compare(be, teacher, student, x, c_t, c_s, dict(student.named_parameters()))
    assert all(p.grad is None for p in teacher.parameters())
