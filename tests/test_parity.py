"""The project's K-step student roll-out reproduces diffusers' own ZImagePipeline."""
import pytest
import torch
from diffusers import ZImagePipeline

from dopsd.sampling import rollout, seeded_noise
from dopsd.adapters import add_lora_adapters

PROMPT = "a close-up picture of a [V] ball with red stripes"


@pytest.mark.parametrize("steps", [4, 8])
def test_zero_lora_student_rollout_matches_pipeline(tiny_model_dir, steps):
    from dopsd.config import ModelConfig
    from dopsd.models import load_backend

    backend = load_backend(ModelConfig(path=str(tiny_model_dir)), device="cpu")
    # the student exactly as the trainer builds it: student + teacher adapters, student active, B = 0
    add_lora_adapters(backend.transformer, rank=4, alpha=8, targets=backend.lora_targets, init="gaussian",
                      with_teacher=True)
    shape = backend.latent_shape(1, 32, 32)
    noise = seeded_noise(shape, seed=7)
    ours = rollout(backend, backend.transformer.eval(), backend.encode_student([PROMPT]), noise,
                   backend.sigmas(steps, shape))

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPT, height=32, width=32, num_inference_steps=steps, guidance_scale=0.0,
               latents=noise.clone(), output_type="latent").images
    # Differences come only from float32 rounding (prompt padding, 1 - sigma vs (1000 - 1000 sigma) / 1000).
    assert ours.shape == ref.shape
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), (ours - ref).abs().max()
    # and the roll-out actually moved away from the noise
    assert (ours - noise).abs().mean() > 1e-2
