"""`dopsd make-tiny-model --backend flux2_klein`: a tiny random-init FLUX.2-klein checkpoint, written offline.

The layout is the FLUX.2-klein hub repository's (transformer/, vae/, text_encoder/, tokenizer/, scheduler/,
model_index.json with `is_distilled: true`), so `Flux2KleinPipeline.from_pretrained(dir)` loads it with the real
loading code. Everything is written through `save_pretrained` as safetensors, deterministically from a seed.

The real klein reads prompt features from text-encoder hidden layers (9, 18, 27) of a 36-layer Qwen3 (the
pipeline's default `text_encoder_out_layers`). The tiny Qwen3 is 4 layers deep, so its layers (1, 2, 3) are
recorded as `text_encoder_out_layers` in model_index.json; the backend reads that key and falls back to the
pipeline default when it is absent (the real checkpoints). Calling the pipeline on the tiny model directly
needs `text_encoder_out_layers=TINY_OUT_LAYERS`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

TEXT_HIDDEN = 16
TEXT_LAYERS = 4
TINY_OUT_LAYERS = (1, 2, 3)  # quarters of the depth, as (9, 18, 27) are for the 36-layer Qwen3-4B/8B
VAE_LATENT_CHANNELS = 4  # -> 16 transformer channels after the 2x2 patchify (real: 32 -> 128)
HEAD_DIM = 16


def build_tiny_components(seed: int = 0) -> dict:
    """All components as live objects (random init from `seed`)."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from .tiny_tokenizer import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer()
    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * VAE_LATENT_CHANNELS, num_layers=2, num_single_layers=2,
        attention_head_dim=HEAD_DIM, num_attention_heads=2, joint_attention_dim=len(TINY_OUT_LAYERS) * TEXT_HIDDEN,
        timestep_guidance_channels=64, mlp_ratio=3.0, axes_dims_rope=[4, 4, 4, 4], rope_theta=2000,
        guidance_embeds=False)  # klein is step-distilled without a guidance embedding
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=VAE_LATENT_CHANNELS, norm_num_groups=4, sample_size=32)
    with torch.no_grad():
        # Non-trivial batch-norm statistics, so that a missing or misplaced (de)normalisation shows in tests.
        gen = torch.Generator().manual_seed(seed + 1)
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=gen) * 0.3)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=gen) * 1.5 + 0.5)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=32, num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, hidden_act="silu", max_position_embeddings=2048,
        rms_norm_eps=1e-6, attention_bias=False, pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=True))
    # The klein repositories' scheduler: dynamic (resolution-dependent) exponential shift; the pipeline passes mu.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=scheduler)


def make_tiny_flux2_klein(out_dir: str | Path, seed: int = 0) -> Path:
    from diffusers import Flux2KleinPipeline

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    c = build_tiny_components(seed)
    pipe = Flux2KleinPipeline(scheduler=c["scheduler"], vae=c["vae"], text_encoder=c["text_encoder"],
                              tokenizer=c["tokenizer"], transformer=c["transformer"], is_distilled=True)
    pipe.register_to_config(text_encoder_out_layers=list(TINY_OUT_LAYERS))
    pipe.save_pretrained(tmp, safe_serialization=True)
    # Written under a temporary name and renamed last, so an interrupted build is never mistaken for a model.
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
