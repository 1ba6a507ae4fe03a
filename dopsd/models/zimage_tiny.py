"""`dopsd make-tiny-model`: a tiny random-init Z-Image checkpoint, written offline from a seed.

The layout is the Z-Image-Turbo repository's (transformer/, vae/, text_encoder/, tokenizer/, scheduler/,
model_index.json, so `ZImagePipeline.from_pretrained` loads it) plus `teacher_encoder/`: a tiny Qwen3-VL
(vision tower + merger + a language model of the text encoder's shape, with its tokenizer and image
processor) standing in for Qwen3-VL-4B-Instruct. Everything goes through `save_pretrained` as safetensors,
so tests and the quickstart exercise the same loading code as the real model.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

# Sizes: text hidden = DiT caption dim; DiT head dim = sum(axes_dims).
TEXT_HIDDEN = 32
DIT_DIM = 64
TEACHER_PATCH = 16
TEACHER_MERGE = 2


def _text_kwargs(tokenizer, hidden: int) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                num_attention_heads=hidden // 16, num_key_value_heads=hidden // 16, head_dim=16, hidden_act="silu",
                max_position_embeddings=2048, rms_norm_eps=1e-6, attention_bias=False,
                pad_token_id=tokenizer.pad_token_id)


def build_tiny_components(seed: int = 0, dit_dim: int = DIT_DIM, dit_layers: int = 2, text_hidden: int = TEXT_HIDDEN,
                          vae_channels: tuple[int, ...] = (32, 64), vae_groups: int = 32, latent_channels: int = 16,
                          teacher_patch: int = TEACHER_PATCH, vision_hidden: int = 32, shift: float = 3.0,
                          tokenizer_corpus: tuple[str, ...] = ()) -> dict:
    """All components as live objects (random init from `seed`). `dit_dim` / `dit_layers` grow the DiT alone
    (e.g. 768 / 8 gives a ~90M-parameter network for benchmarks); heads are 32 wide. The other sizes shape
    the miniature world's toy base (dopsd_world.toybase); the defaults are the random test checkpoint."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import (Qwen2VLImageProcessorPil, Qwen3Config, Qwen3Model, Qwen3VLConfig,
                              Qwen3VLForConditionalGeneration)

    from .tiny_tokenizer import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(extra_corpus=tokenizer_corpus)
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=latent_channels, dim=dit_dim, n_layers=dit_layers,
        n_refiner_layers=1, n_heads=dit_dim // 32, n_kv_heads=dit_dim // 32, norm_eps=1e-5, qk_norm=True,
        cap_feat_dim=text_hidden, rope_theta=256.0,
        t_scale=1000.0, axes_dims=[16, 8, 8], axes_lens=[256, 64, 64])
    with torch.no_grad():  # created with torch.empty in diffusers: give them defined values
        transformer.x_pad_token.normal_(std=0.02)
        transformer.cap_pad_token.normal_(std=0.02)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=list(vae_channels), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=vae_groups,
        down_block_types=["DownEncoderBlock2D"] * len(vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(vae_channels),
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    text_kwargs = _text_kwargs(tokenizer, text_hidden)
    rope = {"rope_type": "default", "rope_theta": 1e6}
    text_encoder = Qwen3Model(Qwen3Config(**text_kwargs, rope_parameters=rope, tie_word_embeddings=False))
    ids = tokenizer.convert_tokens_to_ids
    vl_config = Qwen3VLConfig(
        # mrope_section must sum to head_dim / 2, or the 4B default is applied silently.
        text_config=dict(**text_kwargs, rope_parameters={**rope, "mrope_section": [4, 2, 2],
                                                         "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                           num_heads=vision_hidden // 16, in_channels=3, patch_size=teacher_patch, spatial_merge_size=TEACHER_MERGE, temporal_patch_size=2,
                           out_hidden_size=text_hidden, num_position_embeddings=64,
                           deepstack_visual_indexes=[0]),  # <= text layers - 2 so hidden_states[-2] sees it
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False)
    teacher_encoder = Qwen3VLForConditionalGeneration(vl_config)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=teacher_patch, temporal_patch_size=2, merge_size=TEACHER_MERGE,
        size={"shortest_edge": 64 * 64, "longest_edge": 128 * 128}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=scheduler, teacher_encoder=teacher_encoder, image_processor=image_processor)


def make_tiny_zimage(out_dir: str | Path, seed: int = 0, **sizes) -> Path:
    return save_zimage_dir(build_tiny_components(seed, **sizes), out_dir)


def save_zimage_dir(c: dict, out_dir: str | Path) -> Path:
    """Write `build_tiny_components`-style components as a Z-Image model directory (+ teacher_encoder/)."""
    from diffusers import ZImagePipeline

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe = ZImagePipeline(scheduler=c["scheduler"], vae=c["vae"], text_encoder=c["text_encoder"],
                          tokenizer=c["tokenizer"], transformer=c["transformer"])
    pipe.save_pretrained(tmp, safe_serialization=True)
    teacher_dir = tmp / "teacher_encoder"
    c["teacher_encoder"].save_pretrained(teacher_dir, safe_serialization=True)
    c["tokenizer"].save_pretrained(teacher_dir)
    c["image_processor"].save_pretrained(teacher_dir)
    # Written under a temporary name and renamed last, so an interrupted build is never mistaken for a model.
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
