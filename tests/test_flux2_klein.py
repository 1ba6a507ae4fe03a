"""FLUX.2-klein backend on a tiny checkpoint: parity with diffusers' Flux2KleinPipeline (text-to-image student and
reference-image teacher), the schedule, where the reference tokens go, and a 3-step D-OPSD LoRA run whose LoRA
loads into the pipeline."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline
from PIL import Image

from dopsd.config import ModelConfig, from_dict, load_config
from dopsd.models import load_backend, make_tiny_model
from dopsd.models.flux2_klein import (EDIT_INSTRUCTION, LORA_TARGETS, Flux2KleinBackend, image_ids, pack,
                                      patchify, reference_ids, text_ids, unpack, unpatchify)
from dopsd.models.flux2_tiny import TINY_OUT_LAYERS
from dopsd.sampling import rollout, seeded_noise
from dopsd.adapters import add_lora_adapters
from dopsd.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a close-up picture of a [V] ball with red stripes"
# The pipeline's own output in the model's float32 arithmetic; the only differences are float rounding (t =
# sigma vs (1000 sigma) / 1000, image to tensor conversion), measured 0 (student) and 7e-7 (teacher).
ATOL = 1e-5


@pytest.fixture(scope="module")
def klein_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny-klein"
    make_tiny_model("flux2_klein", str(out), seed=0)
    return out


@pytest.fixture(scope="module")
def pipe(klein_dir):
    p = Flux2KleinPipeline.from_pretrained(klein_dir, use_safetensors=True)
    p.set_progress_bar_config(disable=True)
    return p


def _backend(klein_dir) -> Flux2KleinBackend:
    return load_backend(ModelConfig(backend="flux2_klein", path=str(klein_dir)), device="cpu")


def _pipe_latents(pipe, prompt, noise, steps=4, size=32, **kw):
    return pipe(prompt=prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=1.0,
                latents=noise.clone(), output_type="latent", text_encoder_out_layers=TINY_OUT_LAYERS, **kw).images


def _image(size: int, seed: int) -> tuple[Image.Image, torch.Tensor]:
    pil = Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype(np.uint8))
    return pil, torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------------------

def test_tiny_checkpoint_is_deterministic_and_in_the_hub_layout(klein_dir, tmp_path):
    from dopsd.cli import main

    assert main(["make-tiny-model", str(tmp_path / "again"), "--backend", "flux2_klein"]) == 0
    assert _digest(klein_dir) == _digest(tmp_path / "again")
    names = set(_digest(klein_dir))
    for required in ("model_index.json", "transformer/diffusion_pytorch_model.safetensors",
                     "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                     "tokenizer/tokenizer.json", "scheduler/scheduler_config.json"):
        assert required in names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names)
    index = json.loads((klein_dir / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["is_distilled"] is True
    assert index["text_encoder"] == ["transformers", "Qwen3ForCausalLM"]
    assert tuple(index["text_encoder_out_layers"]) == TINY_OUT_LAYERS
    be = _backend(klein_dir)
    assert be.out_layers == TINY_OUT_LAYERS and max(TINY_OUT_LAYERS) <= be.text_encoder.config.num_hidden_layers
    make_tiny_model("flux2_klein", str(tmp_path / "other"), seed=1)
    key = "transformer/diffusion_pytorch_model.safetensors"
    assert _digest(tmp_path / "other")[key] != _digest(klein_dir)[key]


def test_layout_helpers_follow_the_pipeline():
    z = torch.randn(2, 4, 6, 8)
    x = patchify(z)
    assert torch.equal(x, Flux2KleinPipeline._patchify_latents(z)) and torch.equal(unpatchify(x), z)
    assert torch.equal(pack(x), Flux2KleinPipeline._pack_latents(x)) and torch.equal(unpack(pack(x), 3, 4), x)
    assert torch.equal(image_ids(3, 4), Flux2KleinPipeline._prepare_latent_ids(x)[0])
    assert torch.equal(text_ids(5), Flux2KleinPipeline._prepare_text_ids(torch.zeros(1, 5, 2))[0])
    refs = [torch.zeros(1, 16, 3, 4), torch.zeros(1, 16, 2, 2)]
    assert torch.equal(reference_ids([(3, 4), (2, 2)]), Flux2KleinPipeline._prepare_image_ids(refs)[0])


def test_sigmas_are_the_pipelines_schedule_with_its_mu(klein_dir, pipe):
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    from dopsd.schedule import shift_sigmas

    be = _backend(klein_dir)
    for size, steps in ((32, 4), (64, 4), (1024, 4), (1024, 8), (1536, 4)):
        shape = be.latent_shape(1, size, size)
        seq = shape[-2] * shape[-1]
        pipe.scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps),
                                     mu=compute_empirical_mu(seq, steps))
        ours = be.sigmas(steps, shape)
        assert ours == pipe.scheduler.sigmas.tolist() and ours[-1] == 0.0 and len(ours) == steps + 1
        closed = shift_sigmas(torch.linspace(1, 1 / steps, steps, dtype=torch.float64),
                              math.exp(compute_empirical_mu(seq, steps))).tolist() + [0.0]
        assert np.allclose(ours, closed, atol=1e-6)
    shape = be.latent_shape(1, 256, 256)  # 64 x 64 tokens, as 1024 px on the real klein
    assert be.schedule_shift(shape) == pytest.approx(math.exp(compute_empirical_mu(4096, 4)))

    # ... and those are the times the pipeline feeds its transformer
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"][0].item()),
                                                      with_kwargs=True)
    try:
        _pipe_latents(pipe, PROMPT, seeded_noise(be.latent_shape(1, 32, 32), 0))
    finally:
        hook.remove()
    assert np.allclose(seen, be.sigmas(4, be.latent_shape(1, 32, 32))[:-1], atol=1e-6)


@pytest.mark.parametrize("steps", [4, 8])
def test_zero_lora_student_rollout_matches_pipeline(klein_dir, pipe, steps):
    be = _backend(klein_dir)
    # the student exactly as the trainer builds it: student + teacher adapters, student active, B = 0
    add_lora_adapters(be.transformer, rank=4, alpha=8, targets=be.lora_targets, init="gaussian", with_teacher=True)
    shape = be.latent_shape(1, 32, 32)
    noise = seeded_noise(shape, seed=7)
    ours = rollout(be, be.transformer.eval(), be.encode_student([PROMPT]), noise, be.sigmas(steps, shape))
    ref = _pipe_latents(pipe, PROMPT, noise, steps=steps)
    # output_type="latent" is the unpatchified, de-normalised VAE latent: compare in that layout
    mine = be.to_vae_latents(ours)
    assert mine.shape == ref.shape == (1, 4, 16, 16)
    assert torch.allclose(mine, ref, atol=ATOL, rtol=0), (mine - ref).abs().max()
    assert (ours - noise).abs().mean() > 1e-2


def test_teacher_context_is_the_pipelines_reference_image_path(klein_dir, pipe):
    """Teacher = the pipeline's editing call: image=[target], prompt + the instruction sentence."""
    be = _backend(klein_dir)
    be.transformer.eval()
    pil, image = _image(64, seed=0)  # the pipeline refuses references under 64 px
    shape = be.latent_shape(1, 64, 64)
    noise = seeded_noise(shape, seed=3)
    ctx = be.encode_teacher([PROMPT], image)
    assert be.teacher_prompt(PROMPT) == f"{PROMPT} {EDIT_INSTRUCTION}"
    ours = rollout(be, be.transformer, ctx, noise, be.sigmas(4, shape))
    ref = _pipe_latents(pipe, be.teacher_prompt(PROMPT), noise, size=64, image=pil)
    assert torch.allclose(be.to_vae_latents(ours), ref, atol=ATOL, rtol=0)
    student = rollout(be, be.transformer, be.encode_student([PROMPT]), noise, be.sigmas(4, shape))
    assert (student - ours).abs().max() > 1e-3  # the reference changes the prediction


def test_reference_tokens_only_in_the_teacher_call_and_loss_sees_noisy_tokens_only(klein_dir):
    be = _backend(klein_dir)
    be.transformer.eval()
    images = torch.cat([_image(32, 1)[1], _image(32, 2)[1]])
    shape = be.latent_shape(2, 32, 32)
    n = shape[-2] * shape[-1]
    calls = []

    def pre(module, args, kw):
        calls.append({"tokens": kw["hidden_states"].shape[1], "ids": kw["img_ids"].clone(),
                      "txt": kw["encoder_hidden_states"].clone()})

    def post(module, args, kw, out):
        calls[-1]["out"] = out[0]

    hooks = [be.transformer.register_forward_pre_hook(pre, with_kwargs=True),
             be.transformer.register_forward_hook(post, with_kwargs=True)]
    x = torch.randn(shape)
    try:
        c_s, c_t = be.encode_student([PROMPT] * 2), be.encode_teacher([PROMPT] * 2, images)
        v_t = be.velocity(be.transformer, x, 0.7, c_t)
        v_s = be.velocity(be.transformer, x, 0.7, c_s)
    finally:
        for h in hooks:
            h.remove()
    teacher, student = calls
    assert teacher["tokens"] == 2 * n and student["tokens"] == n
    assert (teacher["ids"][:n, 0] == 0).all() and (teacher["ids"][n:, 0] == 10).all()
    assert torch.equal(teacher["ids"][n:, 1:3], teacher["ids"][:n, 1:3])  # same grid, reference time axis
    assert (student["ids"][:, 0] == 0).all()
    assert not torch.equal(teacher["txt"], student["txt"])  # the instruction sentence is in the teacher prompt
    assert c_t.num_reference_tokens == n and c_s.num_reference_tokens == 0
    assert not torch.equal(c_t.ref_tokens[0], c_t.ref_tokens[1])  # each sample's own target
    # the loss sees exactly the noisy-latent predictions: v has the latent's shape and is the first n tokens
    assert v_t.shape == v_s.shape == x.shape
    assert torch.equal(pack(v_t), teacher["out"][:, :n]) and teacher["out"].shape[1] == 2 * n
    assert torch.equal(pack(v_s), student["out"])
    # the reference tokens are the target's model-space latents
    assert torch.allclose(c_t.ref_tokens, pack(be.encode_images(images)))


def test_lora_targets_exist_and_bad_out_layers_are_refused(klein_dir):
    be = _backend(klein_dir)
    names = [n for n, _ in be.transformer.named_modules()]
    for target in LORA_TARGETS:  # a target that matches nothing would be dropped silently by peft
        assert any(n.endswith("." + target) for n in names), target
    assert not any(n.endswith(".ff.net.0.proj") for n in names)  # the released script's FLUX.1-style names
    with pytest.raises(ValueError, match="do not exist"):
        Flux2KleinBackend(be.transformer, be.vae, be.text_encoder, be.tokenizer, be.scheduler_config, be.device,
                          text_encoder_out_layers=(1, 2, 9))
    with pytest.raises(ValueError, match="joint_attention_dim"):
        Flux2KleinBackend(be.transformer, be.vae, be.text_encoder, be.tokenizer, be.scheduler_config, be.device,
                          text_encoder_out_layers=(1, 2))


@pytest.mark.parametrize("overrides", [("train.dual_forward=separate",),
                                       ("model.gradient_checkpointing=true", "train.mixed_precision=bf16"),
                                       ("train.objective=sft",)], ids=["dopsd", "dopsd-ckpt-bf16", "sft"])
def test_lora_run_writes_a_lora_that_loads_in_the_pipeline(klein_dir, pipe, tmp_path, overrides):
    from dopsd.data.synthetic import write_concept_folder

    data = write_concept_folder(tmp_path / "data", count=3, size=32, seed=1)
    cfg = from_dict({
        "model": {"backend": "flux2_klein", "path": str(klein_dir)},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "rollout_steps": 4, "ema_decay": 0.9},
        "data": {"path": str(data), "resolution": [32, 32]},
        "validation": {"prompts": ["a photo of [V] ball"], "seeds": [0]},
        "output": {"dir": str(tmp_path / "run"), "progress_bar": False, "tensorboard": False},
    }, list(overrides))
    dopsd = cfg.train.objective == "dopsd"
    trainer = Trainer(cfg)
    n = 8 * 8
    calls = []
    hook = trainer.backend.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append((kw["hidden_states"].shape[1] if "hidden_states" in kw else "fused",
                                       torch.is_grad_enabled())), with_kwargs=True)
    summary = trainer.fit()
    hook.remove()
    assert summary["steps"] == 3
    if dopsd and cfg.train.dual_forward == "fused":  # one call for both roles per roll-out state, with grad
        assert [g for t, g in calls if t == "fused"] == [True] * (3 * 4)
        assert not any(g for t, g in calls if t != "fused")  # the rest: validation sampling
    else:
        # teacher calls (no grad) carry the reference tokens; every student call with grad sees the noisy ones
        assert sum(1 for t, g in calls if t == 2 * n) == (3 * 4 if dopsd else 0)
        assert all(not g for t, g in calls if t == 2 * n)
        assert sum(1 for t, g in calls if g) == (3 * 4 if dopsd else 3) and all(t == n for t, g in calls if g)

    lora = Path(summary["final"]) / "pytorch_lora_weights.safetensors"
    from safetensors import safe_open

    with safe_open(lora, "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("transformer.") and "teacher" not in k and "student" not in k for k in keys)
    assert any(".ff_context.linear_in." in k for k in keys) and any(".attn.add_q_proj." in k for k in keys)
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 8

    noise = seeded_noise((1, 16, 8, 8), 0)
    base = _pipe_latents(pipe, "a photo of [V] ball", noise)
    pipe.load_lora_weights(str(lora.parent))
    try:
        tuned = _pipe_latents(pipe, "a photo of [V] ball", noise)
    finally:
        pipe.unload_lora_weights()
    assert (tuned - base).abs().max() > 1e-4, "the LoRA must change the pipeline's output"
    # ... and the pipeline with the LoRA is the trainer's student (the file holds what was trained)
    be = _backend(klein_dir)
    be.load_lora(be.transformer, lora.parent)
    ours = rollout(be, be.transformer.eval(), be.encode_student(["a photo of [V] ball"]), noise,
                   be.sigmas(4, tuple(noise.shape)))
    assert torch.allclose(be.to_vae_latents(ours), tuned, atol=ATOL)


def test_klein_configs_carry_the_recipe():
    for name in ("flux2_klein_4b_lora.yaml", "flux2_klein_9b_lora.yaml"):
        cfg = load_config(REPO / "configs" / name)
        assert cfg.model.backend == "flux2_klein" and cfg.model.dtype == "bfloat16"
        assert cfg.train.lr == pytest.approx(2e-5) and (cfg.lora.rank, cfg.lora.alpha) == (64, 128)
        assert cfg.train.rollout_steps == 4 and cfg.train.ema_decay == 0.9999 and cfg.train.mixed_precision == "bf16"
        assert set(cfg.lora.targets or LORA_TARGETS) == set(LORA_TARGETS)
    tiny = load_config(REPO / "configs" / "flux2_klein_tiny.yaml")
    assert tiny.model.backend == "flux2_klein" and tiny.model.make_tiny_if_missing
    assert tiny.model.path.startswith("runs/")
