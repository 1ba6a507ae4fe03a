"""The D-OPSD step and the SFT baseline against hand-written references on the tiny checkpoint."""

import pytest
import torch
import torch.nn.functional as F

from dopsd.adapters import STUDENT, TEACHER, add_lora_adapters, set_active_adapter
from dopsd.config import ModelConfig
from dopsd.models import load_backend
from dopsd.objectives import StepBatch, StepContext, distill_loss, dopsd_objective, sft_objective
from dopsd.teacher import EmaTeacher

PROMPTS = ["a photo of [V] ball", "a [V] ball with red stripes on a green background"]


@pytest.fixture
def lora_backend(tiny_model_dir):
    """Fresh backend with student+teacher adapters; the student's B is made non-zero so roles differ."""
    torch.manual_seed(0)
    be = load_backend(ModelConfig(path=str(tiny_model_dir), teacher_min_pixels=1024, teacher_max_pixels=4096))
    add_lora_adapters(be.transformer, rank=4, alpha=8, targets=be.lora_targets, init="gaussian", with_teacher=True)
    teacher = EmaTeacher.for_lora(be.transformer, decay=0.9)
    with torch.no_grad():
        for name, p in be.transformer.named_parameters():
            if f"lora_B.{STUDENT}" in name:
                p.normal_(std=0.05)
    return be, teacher


def _images(n=2, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(3))


def test_x0_loss_equals_sigma_squared_v_loss():
    x, vs, vt = torch.randn(3, 2, 4, 4, 4).unbind(0)
    for s in (1.0, 0.9, 0.5, 0.1):
        assert torch.allclose(distill_loss(x, vs, vt, s, "x0"), s ** 2 * distill_loss(x, vs, vt, s, "v"),
                              rtol=1e-5, atol=1e-7)


def test_x0_loss_gradient_reaches_student_only():
    x, vs, vt = torch.randn(3, 2, 4, 4, 4).unbind(0)
    vs.requires_grad_(True)
    vt.requires_grad_(True)
    distill_loss(x, vs, vt, 0.75, "x0").backward()
    assert vt.grad is None and vs.grad is not None
    assert torch.allclose(vs.grad, 2 * 0.75 ** 2 * (vs - vt).detach() / vs.numel(), atol=1e-7)


class Spy:
    """Wraps the real backend and records what each velocity call received."""

    def __init__(self, backend):
        self._b, self.calls = backend, []

    def __getattr__(self, name):
        return getattr(self._b, name)

    def velocity(self, transformer, x, sigma, context):
        active = [m._active_adapter for m in transformer.modules() if hasattr(m, "_active_adapter")][0]
        self.calls.append({"x": x, "sigma": sigma, "adapter": active[0], "grad": torch.is_grad_enabled()})
        return self._b.velocity(transformer, x, sigma, context)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_dopsd_step_gradients_and_call_schedule(lora_backend):
    be, teacher = lora_backend
    spy = Spy(be)
    sigmas = be.sigmas(4, be.latent_shape(2, 32, 32))
    model = be.transformer
    result = dopsd_objective(StepContext(spy, model, teacher),
                             StepBatch(PROMPTS, _images(), [torch.Generator().manual_seed(11),
                                                            torch.Generator().manual_seed(12)], sigmas))
    # teacher then student at every one of the K states, teacher without grad, on the same state
    assert [c["adapter"] for c in spy.calls] == [TEACHER, STUDENT] * 4
    assert [c["grad"] for c in spy.calls] == [False, True] * 4
    for k in range(4):
        t, s = spy.calls[2 * k], spy.calls[2 * k + 1]
        assert t["x"] is s["x"] and t["sigma"] == s["sigma"] == sigmas[k]
        assert not s["x"].requires_grad and s["x"].grad_fn is None  # no backprop through the trajectory
    assert len(result.terms) == 4 and result.loss == pytest.approx(sum(result.terms) / 4)

    grads = _grads(model)
    assert grads and all(f".{STUDENT}." in n for n in grads), "only the student adapter gets gradients"
    assert all(p.grad is None for n, p in model.named_parameters() if f".{TEACHER}." in n)

    # Reference: the same states, fixed; each step's loss differentiated on its own, summed / K.
    model.zero_grad(set_to_none=True)
    c_s, c_t = be.encode_student(PROMPTS), be.encode_teacher(PROMPTS, _images())
    for k in range(4):
        x = spy.calls[2 * k]["x"]
        set_active_adapter(model, TEACHER)
        with torch.no_grad():
            v_t = be.velocity(model, x, sigmas[k], c_t)
        set_active_adapter(model, STUDENT)
        v_s = be.velocity(model, x, sigmas[k], c_s)
        (F.mse_loss(x - sigmas[k] * v_s, x - sigmas[k] * v_t) / 4).backward()
        if k + 1 < 4:  # the next state is the student's Euler step from this one
            assert torch.allclose(spy.calls[2 * k + 2]["x"], x + (sigmas[k + 1] - sigmas[k]) * v_s.detach(),
                                  atol=1e-6)
    ref = _grads(model)
    assert ref.keys() == grads.keys()
    for n in ref:
        assert torch.allclose(grads[n], ref[n], atol=1e-7, rtol=1e-4), n


def test_per_step_backward_equals_one_backward(lora_backend):
    be, teacher = lora_backend
    sigmas = be.sigmas(4, be.latent_shape(2, 32, 32))
    out = []
    for per_step in (True, False):
        be.transformer.zero_grad(set_to_none=True)
        r = dopsd_objective(StepContext(be, be.transformer, teacher, per_step_backward=per_step),
                            StepBatch(PROMPTS, _images(), [torch.Generator().manual_seed(5),
                                                           torch.Generator().manual_seed(6)], sigmas))
        out.append((r.terms, _grads(be.transformer)))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    for n in out[0][1]:
        assert torch.allclose(out[0][1][n], out[1][1][n], atol=1e-8, rtol=1e-5), n


def test_teacher_sees_the_image_and_student_does_not(lora_backend):
    be, _ = lora_backend
    a, b = _images(), 1 - _images()
    c_s = be.encode_student(PROMPTS)
    ca, cb = be.encode_teacher(PROMPTS, a), be.encode_teacher(PROMPTS, b)
    assert all(x.shape[0] > y.shape[0] for x, y in zip(ca, c_s))  # image tokens + template
    assert not torch.allclose(ca[0], cb[0])  # the target image changes the teacher context


def test_ema_update_is_exact(lora_backend):
    be, teacher = lora_backend
    before_t = [t.detach().clone() for t in teacher._teacher]
    students = [s.detach().clone() for s in teacher._student]
    assert any(not torch.equal(a, b) for a, b in zip(before_t, students))
    teacher.update()
    for t, old, s in zip(teacher._teacher, before_t, students):
        expected = (old.double() * 0.9 + s.double() * (1 - 0.9)).float()
        assert torch.allclose(t, expected, rtol=0, atol=2e-7)
    frozen = EmaTeacher(be.transformer, teacher._student, teacher._teacher, decay=1.0, lora=True)
    snap = [t.clone() for t in frozen._teacher]
    frozen.update()
    assert all(torch.equal(a, b) for a, b in zip(snap, frozen._teacher))


def test_full_finetune_teacher_is_a_frozen_copy(tiny_model_dir):
    be = load_backend(ModelConfig(path=str(tiny_model_dir), teacher_min_pixels=1024, teacher_max_pixels=4096))
    student = be.transformer.requires_grad_(True)
    teacher = EmaTeacher.for_full(student, decay=0.5)
    assert teacher.model is not student
    dopsd_objective(StepContext(be, student, teacher),
                    StepBatch(PROMPTS[:1], _images(1), [torch.Generator().manual_seed(0)],
                              be.sigmas(2, be.latent_shape(1, 32, 32))))
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad and p.dim() > 1)
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    s0 = next(student.parameters()).detach().clone()
    t0 = next(teacher.model.parameters()).detach().clone()
    teacher.update()
    assert torch.allclose(next(teacher.model.parameters()), 0.5 * t0 + 0.5 * s0, atol=1e-7)


def test_sft_matches_hand_written_reference(tiny_model_dir):
    be = load_backend(ModelConfig(path=str(tiny_model_dir)))
    model = be.transformer.requires_grad_(True)
    images = _images()
    result = sft_objective(StepContext(be, model, sft_sigma_sampling="shifted_uniform"),
                           StepBatch(PROMPTS, images, [torch.Generator().manual_seed(9),
                                                       torch.Generator().manual_seed(10)]))
    grads = _grads(model)

    # Reference written from the definitions, with diffusers/transformers objects called directly.
    model.zero_grad(set_to_none=True)
    # each sample draws from its own generator: VAE posterior noise, then flow noise, then its sigma
    gens = [torch.Generator().manual_seed(9), torch.Generator().manual_seed(10)]
    dist = be.vae.encode(images * 2 - 1).latent_dist
    z = dist.mean + dist.std * torch.stack([torch.randn(dist.mean.shape[1:], generator=g).unsqueeze(0)
                                            for g in gens]).squeeze(1)
    x0 = (z - be.vae.config.shift_factor) * be.vae.config.scaling_factor
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens])
    sigma = (3.0 * u / (1 + 2.0 * u)).clamp(1e-3, 1.0).float()  # Z-Image shift 3; sigma > 0 kept
    xt = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
    tok = be.tokenizer
    feats = []
    for p in PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
                                       enable_thinking=True)
        ids = tok(text, return_tensors="pt").input_ids
        feats.append(be.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-2][0])
    out = model(list(xt.unsqueeze(2).unbind(0)), 1 - sigma, feats, return_dict=False)[0]
    v_pred = -torch.stack(out).squeeze(2)
    loss = F.mse_loss(v_pred, noise - x0)
    loss.backward()
    assert result.loss == pytest.approx(loss.item(), rel=1e-5)
    for n, g_ref in _grads(model).items():
        assert torch.allclose(grads[n], g_ref, atol=1e-7, rtol=1e-4), n


@pytest.mark.parametrize("per_step", [True, False])
def test_gradient_checkpointing_recomputes_with_the_student_adapter(lora_backend, per_step):
    # Checkpointing replays the forward during backward with whichever adapter is active then; the teacher
    # switch must be undone before any backward, in both backward modes.
    be, teacher = lora_backend
    sigmas = be.sigmas(4, be.latent_shape(2, 32, 32))
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            be.transformer.enable_gradient_checkpointing()
        be.transformer.train().zero_grad(set_to_none=True)
        dopsd_objective(StepContext(be, be.transformer, teacher, per_step_backward=per_step),
                        StepBatch(PROMPTS, _images(), [torch.Generator().manual_seed(2),
                                                       torch.Generator().manual_seed(3)], sigmas))
        grads.append(_grads(be.transformer))
    be.transformer.disable_gradient_checkpointing()
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-7, rtol=1e-4), n
