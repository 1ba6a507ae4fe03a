"""`model.compile` (dopsd/models/compile.py) on the tiny Z-Image: the blocks are compiled (aot_eager by default),
and one D-OPSD LoRA step (separate dual forward, gradient checkpointing on) gives eager's loss and gradients."""
from __future__ import annotations

import os

import torch

from dopsd.adapters import STUDENT, add_lora_adapters
from dopsd.config import ModelConfig
from dopsd.models import load_backend
from dopsd.models.compile import compile_blocks, uncompile_blocks
from dopsd.objectives import StepBatch, StepContext, dopsd_objective
from dopsd.teacher import EmaTeacher
from test_flux2_klein import klein_dir  # noqa: F401 (fixture)

PROMPTS = ["a photo of [V] ball"]
BACKEND = os.environ.get("DOPSD_TEST_COMPILE_BACKEND", "aot_eager")  # "inductor" for the full compiler


def test_compiled_blocks_give_eager_loss(tiny_model_dir):
    torch.manual_seed(0)
    be = load_backend(ModelConfig(path=str(tiny_model_dir), teacher_min_pixels=1024, teacher_max_pixels=1024))
    model = be.transformer
    add_lora_adapters(model, rank=4, alpha=8, targets=be.lora_targets, init="gaussian", with_teacher=True)
    with torch.no_grad():  # a student away from its teacher
        for name, p in model.named_parameters():
            if f"lora_B.{STUDENT}" in name:
                p.normal_(std=0.05)
    model.enable_gradient_checkpointing()
    teacher = EmaTeacher.for_lora(model, decay=1.0)  # no update: both runs see the same teacher
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    contexts = be.encode_student(PROMPTS), be.encode_teacher(PROMPTS, images)
    sigmas = be.sigmas(1, be.latent_shape(1, 32, 32))
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        model.zero_grad(set_to_none=True)
        batch = StepBatch(PROMPTS, images, [torch.Generator().manual_seed(7)], sigmas, *contexts)
        loss = dopsd_objective(StepContext(be, model, teacher, dual_forward="separate"), batch).loss
        return loss, [p.grad.clone() for p in params]

    eager_loss, eager_grads = step()
    blocks = be.repeated_blocks(model)
    # Z-Image's three block lists, each block of them
    assert len(blocks) == len(model.noise_refiner) + len(model.context_refiner) + len(model.layers)
    # aot_eager: dynamo capture and AOTAutograd (what peft layers and checkpointing meet) without inductor's C++
    # build, which takes minutes on a 2-core box (benchmarks/gpu/issue20.sh runs inductor on the GPU)
    assert compile_blocks(be, model, backend=BACKEND) == len(blocks)
    compiled_loss, compiled_grads = step()
    assert all(b._compiled_call_impl is not None for b in blocks)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-6)
    for g, ref in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, ref, rtol=1e-3, atol=1e-4 * ref.abs().max().item() + 1e-7)
    assert uncompile_blocks(be, model) == len(blocks)


def test_flux2_repeated_blocks(klein_dir):
    """What model.compile compiles on FLUX.2-klein: its double and single blocks, in forward order."""
    be = load_backend(ModelConfig(backend="flux2_klein", path=str(klein_dir)))
    tr = be.transformer
    assert be.repeated_blocks(tr) == [*tr.transformer_blocks, *tr.single_transformer_blocks]
