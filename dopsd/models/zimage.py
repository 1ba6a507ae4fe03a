"""Z-Image (Z-Image-Turbo) backend: diffusers `ZImageTransformer2DModel` + `AutoencoderKL`, transformers
`Qwen3Model` text encoder; the teacher context comes from a Qwen3-VL vision front-end grafted onto the very
same Qwen3 language weights (the recipe's multimodal teacher).

Conventions follow `diffusers.ZImagePipeline`: prompt = Qwen chat template (enable_thinking=True),
features = hidden_states[-2] with padding removed; the DiT takes t = 1 - sigma and predicts -v.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .attention import SDPA, resolve as resolve_attention
from .base import refuse_references
from .diffusers_io import DTYPES, DiffusersIO, freeze, transformer_factory
from .offload import place_encoder
from ..schedule import ZIMAGE_RECIPE_SIGMAS, check_schedule, few_step_sigmas

log = logging.getLogger(__name__)

# The recipe's LoRA targets (suffixes, so the refiner blocks are included as in the released script).
LORA_TARGETS = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]




def graft_language_model(vl_model: nn.Module, text_encoder: nn.Module) -> None:
    """Make the Qwen3-VL language model use the text encoder's Parameter objects (no copy, no extra memory).

    The recipe overwrites Qwen3-VL's language weights with Z-Image's Qwen3 so that teacher features live in
    the space the DiT was trained on; sharing the tensors does the same without a second copy.
    """
    language_model = vl_model.model.language_model
    params = dict(text_encoder.named_parameters())
    try:
        language_model.load_state_dict(params, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError("model.teacher_encoder_path: the Qwen3-VL language model does not match the text "
                         f"encoder's architecture (Qwen3-VL-4B pairs with Qwen3-4B): {e}") from None
    # The LM head is never used (only hidden states are read); drop it to save memory.
    vl_model.lm_head = nn.Identity()


IMAGE_PAD = "<|image_pad|>"


def teacher_text(tokenizer, prompt: str, image_tokens: int) -> str:
    """The teacher's chat text: one user turn, the target image first (as `image_tokens` pad tokens), then the
    prompt. (The processor class needs torchvision for its video half; expanding the image placeholder to
    t*h*w / merge^2 tokens is all it would do for an image.)"""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        tokenize=False, add_generation_prompt=True)
    return text.replace(IMAGE_PAD, IMAGE_PAD * image_tokens, 1)


TEACHER_CONTEXTS = ("vlm", "reference")


@dataclass
class ReferenceContext:
    """Teacher context of `model.teacher_context: reference`: the prompt's text features and the target image's
    clean latents. `velocity` then runs the DiT's omni sequence (diffusers' Z-Image-Omni/Edit path): the
    reference is a clean image (t = 1) on the same spatial grid as the noisy one, so the DiT can copy from it
    token by token, where the VLM route must squeeze the image through the text encoder's tokens."""
    text: list[torch.Tensor]   # per sample (L_i, D)
    latents: torch.Tensor      # (B, C, h, w), model space


class ZImageBackend(DiffusersIO):
    pipeline_name = "ZImagePipeline"
    kernel_patch = "patch_zimage"
    name = "zimage"
    lora_targets = LORA_TARGETS
    attention = SDPA  # model.attention resolved (`from_config` sets the run's)

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler_config: dict,
                 teacher_encoder_path: Path, device: torch.device, max_text_tokens: int = 512,
                 teacher_max_tokens: int = 1024, teacher_min_pixels: int = 512 * 512,
                 teacher_max_pixels: int = 768 * 768, text_encoder_loader=None, teacher_context: str = "vlm",
                 transformer_config: dict | None = None, vae_config: dict | None = None):
        """`transformer`, `vae`, `text_encoder`: modules, or loaders called on first use (`LazyPart`); with loaders
        pass `transformer_config` / `vae_config` (what shapes are computed from without loading weights)."""
        if teacher_context not in TEACHER_CONTEXTS:
            raise ValueError(f"model.teacher_context: {teacher_context!r} is not one of {', '.join(TEACHER_CONTEXTS)}")
        self.teacher_context = teacher_context
        self.transformer = transformer
        self.vae = vae
        # A run whose samples all carry cached features (dopsd make-shards) never loads the text encoder.
        self.text_encoder = text_encoder if text_encoder is not None else text_encoder_loader
        self.transformer_config = transformer_config or transformer.config
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.teacher_encoder_path = teacher_encoder_path
        self.device = device
        self.max_text_tokens = max_text_tokens
        self.teacher_max_tokens = teacher_max_tokens
        self.teacher_pixels = (teacher_min_pixels, teacher_max_pixels)
        self.vae_scale_factor = 2 ** (len((vae_config or vae.config)["block_out_channels"]) - 1)
        self._teacher = None  # (vl_model, tokenizer, image_processor), loaded on first use (SFT never needs it)
        self.offload_encoders = False  # model.offload_encoders (from_config sets it)
        self._warned_truncation = False

    @classmethod
    def from_config(cls, cfg, device: str = "cpu", transformer_loader=None) -> "ZImageBackend":
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
        from transformers import AutoTokenizer, Qwen3Model


        path = Path(cfg.path)
        if not (path / "transformer").is_dir():
            raise FileNotFoundError(f"model.path: {path} is not a Z-Image model directory (no transformer/)")
        dtype = DTYPES[cfg.dtype]
        dev = torch.device(device)
        # before any weight loads: an unusable model.attention fails here; Z-Image pads captions (masks)
        attention = resolve_attention(cfg.attention, dev, dtype, masked=True)
        new_transformer = transformer_factory("ZImageTransformer2DModel", path, dtype, dev, transformer_loader,
                                              attention)


        def load_vae() -> nn.Module:
            return freeze(AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype,
                                                        use_safetensors=True).to(dev))

        if not (path / "text_encoder").is_dir():
            raise FileNotFoundError(f"model.path: {path} has no text_encoder/")

        def load_text_encoder() -> nn.Module:  # on first encode call (lazy: cached features need none)
            return freeze(place_encoder(Qwen3Model.from_pretrained(path / "text_encoder", dtype=dtype,
                                                                   use_safetensors=True,
                                                                   attn_implementation=attention.encoders),
                                        dev, cfg.offload_encoders))

        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
        scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(path, subfolder="scheduler"))
        teacher_path = Path(cfg.teacher_encoder_path) if cfg.teacher_encoder_path else path / "teacher_encoder"
        # Every part loads on first use (the trainer touches the DiT at once; feature caching never does).
        backend = cls(new_transformer, load_vae, None, tokenizer, scheduler_config, teacher_path, dev,
                      cfg.max_text_tokens, cfg.teacher_max_tokens, cfg.teacher_min_pixels, cfg.teacher_max_pixels,
                      text_encoder_loader=load_text_encoder, teacher_context=cfg.teacher_context or "vlm",
                      transformer_config=dict(ZImageTransformer2DModel.load_config(path, subfolder="transformer")),
                      vae_config=dict(AutoencoderKL.load_config(path, subfolder="vae")))
        backend.attention = attention
        backend.offload_encoders = cfg.offload_encoders
        backend.new_transformer = new_transformer
        return backend

    # ------------------------------------------------------------------------------------------------
    # Conditioning

    def _trimmed_hidden(self, hidden: torch.Tensor, mask: torch.Tensor, limit: int) -> list[torch.Tensor]:
        return [h[m.bool()][:limit] for h, m in zip(hidden, mask)]

    @torch.no_grad()
    def encode_student(self, prompts: list[str], references: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        refuse_references(self.name, references)
        return self.student_features(prompts)

    def student_features(self, prompts: list[str]) -> list[torch.Tensor]:
        """`encode_student` without no_grad: the toy world's base model trains its encoders through it."""
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=True)
                 for p in prompts]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_text_tokens,
                             return_tensors="pt")
        if not self._warned_truncation and enc.input_ids.shape[1] >= self.max_text_tokens:
            log.warning("a prompt was truncated to model.max_text_tokens=%d tokens", self.max_text_tokens)
            self._warned_truncation = True
        ids, mask = enc.input_ids.to(self.device), enc.attention_mask.to(self.device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask.bool(),
                                   output_hidden_states=True).hidden_states[-2]
        return self._trimmed_hidden(hidden, mask, self.max_text_tokens)

    def loaded_encoders(self) -> list[str]:
        return [name for name, loaded in (("text_encoder", "text_encoder" in self.loaded_parts()),
                                          ("teacher_encoder", self._teacher is not None)) if loaded]

    def teacher_encoder(self) -> tuple[nn.Module, object, object]:
        """(Qwen3-VL model, tokenizer, image processor), loaded from `teacher_encoder_path` on first use."""
        return self._load_teacher_encoder()

    def set_teacher_encoder(self, model: nn.Module, tokenizer, image_processor) -> None:
        """Use this Qwen3-VL front-end (already grafted onto the text encoder, see `graft_language_model`)
        instead of loading one from `teacher_encoder_path`."""
        self._teacher = (model, tokenizer, image_processor)

    def _load_teacher_encoder(self):
        if self._teacher is None:
            from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration

            path = self.teacher_encoder_path
            if not path.is_dir():
                raise FileNotFoundError(f"model.teacher_encoder_path: {path} is not a Qwen3-VL directory")
            vl = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=self.text_encoder.dtype,
                                                                 use_safetensors=True,
                                                                 attn_implementation=self.attention.encoders)
            graft_language_model(vl, self.text_encoder)
            # (offloaded: the vision tower and the shared language weights visit the device per call)
            vl = freeze(vl)
            place_encoder(vl.model, self.device, self.offload_encoders)
            self._teacher = (vl, AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path))
        return self._teacher

    @torch.no_grad()
    def encode_teacher(self, prompts: list[str], images: torch.Tensor,
                       references: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        refuse_references(self.name, references)
        return self.teacher_features(prompts, images)

    def teacher_features(self, prompts: list[str], images: torch.Tensor) -> list[torch.Tensor] | ReferenceContext:
        """The teacher context by the configured route (`encode_teacher` without no_grad)."""
        if self.teacher_context == "reference":
            return self.reference_features(prompts, images)
        return self.vlm_features(prompts, images)

    def vlm_features(self, prompts: list[str], images: torch.Tensor) -> list[torch.Tensor]:
        """Qwen3-VL features of one user turn: the target image first, then the prompt; hidden_states[-2]."""
        from ..sampling import to_pil

        vl, tokenizer, processor = self._load_teacher_encoder()
        min_px, max_px = self.teacher_pixels
        vision = processor(images=[to_pil(img) for img in images.float().cpu()],
                           size={"shortest_edge": min_px, "longest_edge": max_px}, return_tensors="pt")
        grid = vision["image_grid_thw"]
        merge = getattr(processor, "merge_size", 2)
        texts = [teacher_text(tokenizer, prompt, int(thw.prod()) // merge ** 2) for prompt, thw in zip(prompts, grid)]
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        ids, mask = enc.input_ids.to(self.device), enc.attention_mask.to(self.device)
        mm_types = (ids == vl.config.image_token_id).long()
        out = vl.model(input_ids=ids, attention_mask=mask, pixel_values=vision["pixel_values"].to(self.device, vl.dtype),
                       image_grid_thw=grid.to(self.device), mm_token_type_ids=mm_types, output_hidden_states=True)
        return self._trimmed_hidden(out.hidden_states[-2], mask, self.teacher_max_tokens)

    def reference_features(self, prompts: list[str], images: torch.Tensor) -> ReferenceContext:
        """The prompt's text features and the target's latents (posterior mean)."""
        return ReferenceContext(self.student_features(prompts), self.encode_images(images, mean=True))

    # ------------------------------------------------------------------------------------------------
    # The network

    def velocity(self, transformer: nn.Module, x: torch.Tensor, sigma: float | torch.Tensor,
                 context: list[torch.Tensor] | ReferenceContext) -> torch.Tensor:
        batch = x.shape[0]
        dtype = transformer.dtype
        sig = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(batch)
        latents = list(x.to(dtype).unsqueeze(2).unbind(0))  # (C, F=1, h, w) per sample
        if isinstance(context, ReferenceContext):
            # Omni sequence per sample: [caption segment, reference image, caption segment, noisy image]. The
            # reference's segment is the text's first token (the chat template's constant opening), a marker
            # that gives the reference its own temporal position; the DiT returns the last image only.
            refs = context.latents.to(dtype).unsqueeze(2).unbind(0)
            out = transformer([[r, z] for r, z in zip(refs, latents)], 1.0 - sig,
                              [[c[:1].to(dtype), c.to(dtype)] for c in context.text],
                              siglip_feats=[None] * batch, image_noise_mask=[[0, 1]] * batch, return_dict=False)[0]
        else:
            out = transformer(latents, 1.0 - sig, [c.to(dtype) for c in context], return_dict=False)[0]
        return -torch.stack(out).squeeze(2)  # the DiT predicts data - noise

    def dual_velocity(self, teacher_model: nn.Module, student_model: nn.Module, x: torch.Tensor,
                      sigma: float | torch.Tensor, c_teacher, c_student) -> tuple[torch.Tensor, torch.Tensor]:
        from .zimage_dual import dual_velocity

        return dual_velocity(self, teacher_model, student_model, x, sigma, c_teacher, c_student)

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        unit = self.vae_scale_factor * 2  # VAE downsampling x the DiT's 2x2 patches
        if height % unit or width % unit:
            raise ValueError(f"resolution {height}x{width} must be a multiple of {unit} for this model")
        return (batch, self.transformer_config["in_channels"], height // self.vae_scale_factor,
                width // self.vae_scale_factor)

    def schedule_shift(self, latent_shape: tuple[int, ...]) -> float:
        c = self.scheduler_config
        if not c.get("use_dynamic_shifting", False):
            return float(c.get("shift", 1.0))
        seq_len = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
        base_len, max_len = c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096)
        base_shift, max_shift = c.get("base_shift", 0.5), c.get("max_shift", 1.15)
        mu = base_shift + (max_shift - base_shift) * (seq_len - base_len) / (max_len - base_len)
        return math.exp(mu) if c.get("time_shift_type", "exponential") == "exponential" else mu

    def sigmas(self, num_steps: int, latent_shape: tuple[int, ...], schedule: str = "pipeline") -> list[float]:
        """K+1 sigmas ending at 0.

        "pipeline": what `ZImagePipeline` computes for K steps: linspace(1, 1/K, K) through the scheduler's shift
        (static shift 3 on Z-Image-Turbo: K=4 [1, .9, .75, .5], K=8 [1, .9545, .9, .8333, ...] -> 0; the
        resolution-dependent mu of `calculate_shift` when the config has dynamic shifting).
        "recipe": the authors' hard-coded training lists (`ZIMAGE_RECIPE_SIGMAS`): K=4 [1, .9, .75, .5] -> 0,
        K=8 [1, .9769, .9478, .9099, .8586, .7853, .6719, .4732] -> 0; for any other K no authors' list exists
        and this is the pipeline's schedule (shift 3 on Z-Image-Turbo). No bf16 rounding of the lists.
        """
        check_schedule(schedule)
        if schedule == "recipe" and num_steps in ZIMAGE_RECIPE_SIGMAS:
            return list(ZIMAGE_RECIPE_SIGMAS[num_steps])
        return few_step_sigmas(num_steps, self.schedule_shift(latent_shape))

    # ------------------------------------------------------------------------------------------------
    # Pixels <-> latents

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      mean: bool = False) -> torch.Tensor:
        """Model-space latents: a posterior sample (training targets), or its mean (`mean`, a reference)."""
        dist = self.vae.encode((images * 2 - 1).to(self.device, self.vae.dtype)).latent_dist
        z = dist.mean.float()
        if not mean:
            noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32).to(dist.mean.device)
            z = z + dist.std.float() * noise
        return (z - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        images = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
