"""FLUX.2-klein backend: diffusers `Flux2Transformer2DModel` + `AutoencoderKLFlux2`, transformers `Qwen3ForCausalLM`
text encoder. The teacher context is klein's own reference-image editing path (the recipe's "self-distilled
editing-branch context"): the target image's latents are appended to the noisy tokens as a reference image, and
one instruction sentence is appended to the prompt.

Two tasks, told apart by the batch's `references`:
- text-to-image: student = prompt; teacher = prompt + EDIT_INSTRUCTION, target as reference 0;
- editing: student = reference images + instruction (exactly `pipeline(image=refs, prompt=instruction)`);
  teacher = the same references + the target appended as the last one, instruction + EDIT_TASK_INSTRUCTION
  (`pipeline(image=refs + [target], prompt=teacher_prompt(instruction, editing=True))`).

Conventions follow `diffusers.Flux2KleinPipeline` (0.42):
- prompt: Qwen chat template with `enable_thinking=False`, padded to `max_text_tokens` (the pipeline's
  `max_sequence_length`, 512), no attention mask into the DiT; features = hidden states of the layers
  `text_encoder_out_layers` (9, 18, 27 for the real models) stacked per token -> (B, L, n_layers * hidden);
- latents: VAE latents patchified 2x2 (C -> 4C, H/2, W/2) and normalised with the VAE's batch-norm running
  statistics; the model-space latent is that (B, 4C, h, w) tensor, packed row-major into h*w tokens;
- position ids (T, H, W, L): noisy latents (0, h, w, 0); text (0, 0, 0, l); the i-th reference image
  (10 + 10 i, h, w, 0), its tokens appended after the noisy ones; only the first h*w output tokens are kept;
- time: the DiT takes t = sigma (the pipeline passes scheduler timestep / 1000) and predicts v = noise - data,
  which the scheduler integrates as x + (sigma_next - sigma) v; no negation;
- schedule: `FlowMatchEulerDiscreteScheduler.set_timesteps(K, sigmas=linspace(1, 1/K, K), mu)` with
  mu = `compute_empirical_mu(h*w, K)` (inference, `schedule="pipeline"`); the authors' training script omits
  `sigmas=` (`schedule="recipe"`, `train.schedule`);
- guidance: `guidance=None` in every call, as the klein pipeline does (klein is step-distilled; its DiT has no
  guidance embedding). No classifier-free guidance for distilled checkpoints (`is_distilled`).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attention import SDPA, resolve as resolve_attention
from .diffusers_io import DTYPES, DiffusersIO, freeze, transformer_factory
from .offload import place_encoder
from ..schedule import check_schedule

log = logging.getLogger(__name__)

# The recipe's klein targets under diffusers 0.42 module names. The released script lists the
# feed-forward layers as `ff.net.0.proj` / `ff.net.2` (FLUX.1 names); in `Flux2FeedForward` they are
# `linear_in` / `linear_out`, and peft would silently match nothing under the old names.
LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
                "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"]

# Appended to the teacher's prompt: text-to-image, where the target is the only reference ...
EDIT_INSTRUCTION = ("Make the main subject (facial/ip details), background, and overall composition consistent "
                    "with the reference image.")
# ... and editing, where the target follows the sample's own references and must not be read as one more input.
EDIT_TASK_INSTRUCTION = ("The last image is the expected output of this edit: make the result consistent with it "
                         "in the main subject (facial/ip details), background, and overall composition.")

DEFAULT_OUT_LAYERS = (9, 18, 27)  # the pipeline's default `text_encoder_out_layers`
REFERENCE_T_SCALE = 10  # reference image i gets T = 10 + 10 i, as in the pipeline's `_prepare_image_ids`
NATIVE_STEPS = 4  # klein's distilled step count (used for the SFT noise-level shift only)




# ---------------------------------------------------------------------------------------------------------
# Latent layout helpers (the pipeline's conventions; tests compare them with the pipeline's own helpers)

def patchify(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) VAE latents -> (B, 4C, H/2, W/2); channel index = c * 4 + dy * 2 + dx."""
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, c * 4, h // 2, w // 2)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    b, c4, h, w = x.shape
    x = x.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C), row-major tokens."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b, n, c = tokens.shape
    return tokens.permute(0, 2, 1).reshape(b, c, height, width)


def image_ids(height: int, width: int, t: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """(h*w, 4) position ids (t, row, col, 0) of one packed image, row-major like `pack`."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    ids = torch.zeros(height * width, 4, dtype=torch.long, device=device)
    ids[:, 0], ids[:, 1], ids[:, 2] = t, rows, cols
    return ids


def text_ids(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    ids = torch.zeros(length, 4, dtype=torch.long, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids


def reference_ids(sizes: list[tuple[int, int]], device: torch.device | str | None = None) -> torch.Tensor:
    """Ids of references 0..n-1 (latent sizes h, w each), concatenated in order: T = 10 + 10 i."""
    return torch.cat([image_ids(h, w, t=REFERENCE_T_SCALE * (i + 1), device=device)
                      for i, (h, w) in enumerate(sizes)])


@dataclass
class KleinContext:
    """Conditioning of one batch. Opaque to the trainer.

    `ref_tokens` holds the packed reference-image latents (model space) of every sample, appended after the
    noisy tokens in `velocity`; `ref_ids` their position ids (shared by the batch, like all ids in the DiT).
    The student context holds the sample's references (none for text-to-image); the teacher's holds them too,
    then the target image.
    """
    prompt_embeds: torch.Tensor  # (B, L, n_layers * hidden)
    text_ids: torch.Tensor  # (L, 4)
    ref_tokens: torch.Tensor | None = None  # (B, N_ref, C)
    ref_ids: torch.Tensor | None = None  # (N_ref, 4)

    @property
    def num_reference_tokens(self) -> int:
        return 0 if self.ref_tokens is None else self.ref_tokens.shape[1]


def read_out_layers(model_dir: Path) -> tuple[int, ...]:
    """`text_encoder_out_layers` recorded in model_index.json (tiny checkpoints), else the pipeline default."""
    index = model_dir / "model_index.json"
    if index.is_file():
        layers = json.loads(index.read_text()).get("text_encoder_out_layers")
        if layers:
            return tuple(int(k) for k in layers)
    return DEFAULT_OUT_LAYERS


class _Config:
    """Attribute access to a config given as a dict (diffusers' load_config) or as a config object."""

    def __init__(self, config):
        self._config = config

    def __getattr__(self, key: str):
        c = self.__dict__["_config"]
        return c[key] if isinstance(c, dict) else getattr(c, key)


class Flux2KleinBackend(DiffusersIO):
    pipeline_name = "Flux2KleinPipeline"
    kernel_patch = "patch_flux2"
    name = "flux2_klein"
    lora_targets = LORA_TARGETS
    attention = SDPA  # model.attention resolved (`from_config` sets the run's)

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler_config: dict, device: torch.device,
                 max_text_tokens: int = 512, text_encoder_out_layers: tuple[int, ...] = DEFAULT_OUT_LAYERS,
                 edit_instruction: str = EDIT_INSTRUCTION, edit_task_instruction: str = EDIT_TASK_INSTRUCTION,
                 configs: dict[str, Any] | None = None):
        """`transformer`, `vae`, `text_encoder`: modules, or loaders called on first use (`LazyPart`); with loaders
        pass `configs` {"transformer", "vae", "text_encoder"} (the shapes are checked from them, unloaded)."""
        configs = configs or {"transformer": transformer.config, "vae": vae.config, "text_encoder": text_encoder.config}
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.device = device
        self.max_text_tokens = max_text_tokens
        self.out_layers = tuple(text_encoder_out_layers)
        self.edit_instruction = edit_instruction
        self.edit_task_instruction = edit_task_instruction
        self.transformer_config = configs["transformer"]
        self.vae_scale_factor = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
        self._warned_truncation = False
        self._check_shapes(_Config(configs["transformer"]), _Config(configs["text_encoder"]), _Config(configs["vae"]))

    def loaded_encoders(self) -> list[str]:
        # the teacher is the model's own reference path: the text encoder is the only encoder
        return [p for p in self.loaded_parts() if p == "text_encoder"]

    def _check_shapes(self, tc, te, vae) -> None:
        depth = te.num_hidden_layers
        bad = [k for k in self.out_layers if not 0 <= k <= depth]
        if bad:
            raise ValueError(f"text_encoder_out_layers {self.out_layers}: layers {bad} do not exist in a text encoder "
                             f"with {depth} layers (hidden_states has indices 0..{depth})")
        if len(self.out_layers) * te.hidden_size != tc.joint_attention_dim:
            raise ValueError(f"text_encoder_out_layers {self.out_layers}: {len(self.out_layers)} x hidden size "
                             f"{te.hidden_size} != the transformer's joint_attention_dim {tc.joint_attention_dim}")
        if 4 * vae.latent_channels != tc.in_channels:
            raise ValueError(f"the VAE's {vae.latent_channels} latent channels x 4 (2x2 patchify) != the "
                             f"transformer's in_channels {tc.in_channels}")
        if tc.guidance_embeds:
            log.warning("this transformer has a guidance embedding; like Flux2KleinPipeline, the flux2_klein backend "
                        "calls it with guidance=None (klein checkpoints have none)")
        if self.scheduler_config.get("stochastic_sampling"):
            log.warning("scheduler.stochastic_sampling is set; the D-OPSD roll-out is the deterministic Euler ODE")

    @classmethod
    def from_config(cls, cfg, device: str = "cpu", transformer_loader=None) -> "Flux2KleinBackend":
        """`transformer_loader(cls, path, subfolder, dtype)` replaces `from_pretrained` for the trained network
        (see `dopsd.models.load_backend`); frozen parts are always loaded with `from_pretrained`."""
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
        from transformers import AutoConfig, AutoTokenizer, Qwen3ForCausalLM

        path = Path(cfg.path)
        if not (path / "transformer").is_dir():
            raise FileNotFoundError(f"model.path: {path} is not a FLUX.2-klein model directory (no transformer/)")
        if cfg.teacher_encoder_path:
            log.warning("model.teacher_encoder_path is ignored by flux2_klein: its teacher is the model's own "
                        "reference-image path")
        dtype = DTYPES[cfg.dtype]
        dev = torch.device(device)
        attention = resolve_attention(cfg.attention, dev, dtype)  # before any weight loads (FLUX.2: no masks)
        new_transformer = transformer_factory("Flux2Transformer2DModel", path, dtype, dev, transformer_loader,
                                              attention)

        def load_vae() -> nn.Module:
            return freeze(AutoencoderKLFlux2.from_pretrained(path, subfolder="vae", torch_dtype=dtype,
                                                             use_safetensors=True).to(dev))

        def load_text_encoder() -> nn.Module:
            return freeze(place_encoder(Qwen3ForCausalLM.from_pretrained(path / "text_encoder", dtype=dtype,
                                                                         use_safetensors=True,
                                                                         attn_implementation=attention.encoders),
                                        dev, cfg.offload_encoders))

        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(path, subfolder="scheduler"))
        # Every part loads on first use: `dopsd export` needs only the DiT, for instance.
        configs = {"transformer": dict(Flux2Transformer2DModel.load_config(path, subfolder="transformer")),
                   "vae": dict(AutoencoderKLFlux2.load_config(path, subfolder="vae")),
                   "text_encoder": AutoConfig.from_pretrained(path / "text_encoder")}
        backend = cls(new_transformer, load_vae, load_text_encoder, tokenizer, scheduler_config, dev,
                      cfg.max_text_tokens, read_out_layers(path), configs=configs)
        backend.attention = attention
        backend.new_transformer = new_transformer  # a fresh pretrained copy (full fine-tune teacher)
        return backend

    # ------------------------------------------------------------------------------------------------
    # Conditioning

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_text_tokens, n_layers * hidden): the pipeline's `_get_qwen3_prompt_embeds`."""
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=False)
                 for p in prompts]
        enc = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_text_tokens,
                             return_tensors="pt")
        if not self._warned_truncation and bool(enc.attention_mask[:, -1].any()):
            log.warning("a prompt filled or exceeded model.max_text_tokens=%d tokens and may be truncated",
                        self.max_text_tokens)
            self._warned_truncation = True
        ids, mask = enc.input_ids.to(self.device), enc.attention_mask.to(self.device)
        # The decoder stack alone: same hidden states as the causal LM, without its vocabulary projection.
        hidden = self.text_encoder.model(input_ids=ids, attention_mask=mask, output_hidden_states=True,
                                         use_cache=False).hidden_states
        feats = torch.stack([hidden[k] for k in self.out_layers], dim=2)  # (B, L, n, H)
        return feats.reshape(feats.shape[0], feats.shape[1], -1)

    @torch.no_grad()
    def encode(self, prompts: list[str], references: list[torch.Tensor] | None = None) -> KleinContext:
        """Context for prompts plus optional reference images (each (B, 3, H_i, W_i) in [0, 1], one slot per
        list entry, in the order the pipeline would take them as `image=[...]`)."""
        unit = self.vae_scale_factor * 2
        for i, r in enumerate(references or []):
            if r.dim() != 4 or r.shape[0] != len(prompts) or r.shape[1] != 3 or r.shape[-2] % unit \
                    or r.shape[-1] % unit:
                raise ValueError(f"reference {i}: expected a ({len(prompts)}, 3, H, W) batch with H and W multiples "
                                 f"of {unit}, got {tuple(r.shape)}")
        embeds = self.encode_prompts(prompts)
        ctx = KleinContext(embeds, text_ids(embeds.shape[1], device=self.device))
        if references:
            latents = [self.encode_images(r) for r in references]
            ctx.ref_tokens = torch.cat([pack(z) for z in latents], dim=1).to(embeds.dtype)
            ctx.ref_ids = reference_ids([tuple(z.shape[-2:]) for z in latents], device=self.device)
        return ctx

    def teacher_prompt(self, prompt: str, editing: bool = False) -> str:
        return f"{prompt} {self.edit_task_instruction if editing else self.edit_instruction}"

    def encode_student(self, prompts: list[str], references: list[torch.Tensor] | None = None) -> KleinContext:
        return self.encode(prompts, references=references)

    def encode_teacher(self, prompts: list[str], images: torch.Tensor,
                       references: list[torch.Tensor] | None = None) -> KleinContext:
        """Editing-branch context: the sample's references, then the target image as the last reference, and the
        prompt with the instruction sentence of the task."""
        refs = list(references or [])
        return self.encode([self.teacher_prompt(p, editing=bool(refs)) for p in prompts], references=refs + [images])

    # ------------------------------------------------------------------------------------------------
    # The network

    def velocity(self, transformer: nn.Module, x: torch.Tensor, sigma: float | torch.Tensor,
                 context: KleinContext) -> torch.Tensor:
        batch, _, height, width = x.shape
        dtype = transformer.dtype
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(batch)
        embeds = context.prompt_embeds
        if embeds.shape[0] != batch:
            embeds = embeds.expand(batch, -1, -1)
        tokens = pack(x.to(dtype))
        ids = image_ids(height, width, device=x.device)
        if context.ref_tokens is not None:
            refs = context.ref_tokens
            if refs.shape[0] != batch:
                refs = refs.expand(batch, -1, -1)
            tokens = torch.cat([tokens, refs.to(tokens)], dim=1)
            ids = torch.cat([ids, context.ref_ids.to(x.device)])
        out = transformer(hidden_states=tokens, encoder_hidden_states=embeds.to(dtype), timestep=sig,
                          img_ids=ids, txt_ids=context.text_ids.to(x.device), guidance=None,
                          return_dict=False)[0]
        # Only the noisy-latent tokens are predictions; reference tokens are context.
        return unpack(out[:, :height * width], height, width)

    def dual_velocity(self, teacher_model: nn.Module, student_model: nn.Module, x: torch.Tensor,
                      sigma: float | torch.Tensor, c_teacher, c_student) -> tuple[torch.Tensor, torch.Tensor]:
        from .flux2_dual import dual_velocity

        return dual_velocity(self, teacher_model, student_model, x, sigma, c_teacher, c_student)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        unit = self.vae_scale_factor * 2  # VAE downsampling x the 2x2 patchify
        if height % unit or width % unit:
            raise ValueError(f"resolution {height}x{width} must be a multiple of {unit} for this model")
        return (batch, self.transformer_config["in_channels"], height // unit, width // unit)

    def _mu(self, latent_shape: tuple[int, ...], num_steps: int) -> float:
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        return compute_empirical_mu(image_seq_len=latent_shape[-2] * latent_shape[-1], num_steps=num_steps)

    def sigmas(self, num_steps: int, latent_shape: tuple[int, ...], schedule: str = "pipeline") -> list[float]:
        """K+1 values ending at 0, computed by the model's own scheduler with mu = compute_empirical_mu(h*w, K).

        "pipeline" (`Flux2KleinPipeline`, inference): `set_timesteps(K, sigmas=linspace(1, 1/K, K), mu)`; at
        1024 px (64 x 64 tokens) and K=4 about [1, .967, .908, .767] -> 0.
        "recipe" (the authors' released training script): `set_timesteps(K, mu)` without `sigmas=`, so the base
        grid is the scheduler's own linspace(1, 1/num_train_timesteps) before the mu warp; at 1024 px and K=4
        about [1, .952, .832, .0098] -> 0 (the last step lands almost on clean data). The script builds its
        timesteps in bf16; that rounding is not replicated here (float32, as the scheduler computes).
        """
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        check_schedule(schedule)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        mu = self._mu(latent_shape, num_steps)
        if schedule == "recipe":
            scheduler.set_timesteps(num_steps, mu=mu)
        else:
            base = None if scheduler.config.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
            scheduler.set_timesteps(num_steps, sigmas=base, mu=mu)
        return [float(s) for s in scheduler.sigmas]

    def schedule_shift(self, latent_shape: tuple[int, ...]) -> float:
        """The shift of the native 4-step schedule at this resolution (exp(mu) for the exponential warp)."""
        c = self.scheduler_config
        if not c.get("use_dynamic_shifting", False):
            return float(c.get("shift", 1.0))
        mu = self._mu(latent_shape, NATIVE_STEPS)
        return math.exp(mu) if c.get("time_shift_type", "exponential") == "exponential" else mu

    # ------------------------------------------------------------------------------------------------
    # Pixels <-> latents

    def _bn_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, torch.float32)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1).float() + self.vae.config.batch_norm_eps).to(like.device)
        return mean, std

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Model-space latents (B, 4C, H/16, W/16) of images in [0, 1]: the VAE posterior's mode (as the pipeline
        encodes reference images), patchified and batch-norm normalised. `generator` is unused (no sampling)."""
        z = self.vae.encode((images * 2 - 1).to(self.device, self.vae.dtype)).latent_dist.mode()
        z = patchify(z.float())
        mean, std = self._bn_stats(z)
        return (z - mean) / std

    def to_vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> raw VAE latents (B, C, H/8, W/8): the pipeline's `output_type="latent"`."""
        mean, std = self._bn_stats(latents)
        return unpatchify(latents.float() * std + mean)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        z = self.to_vae_latents(latents)
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
