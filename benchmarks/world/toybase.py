"""The miniature world's toy step-distilled base model ("toy turbo"), made by one reproducible script.

    dopsd-world make-toy-base --out runs/toy-turbo [--work CACHE] [--evaluator FILE] [--set KEY=VALUE ...]
    python -m dopsd_world.toybase --out runs/toy-turbo ...                 (the same)
    torchrun --nproc_per_node N -m dopsd_world.toybase --out ...          (data parallel over N processes)

A Z-Image-class checkpoint (the diffusers/transformers classes, directory layout and backend code path of the
real model, only small), trained in stages on base-world images plus images of random *unnamed* textures (the
held-out `checkered` texture is never shown): 1. a small VAE; 2. flow-matching pretraining of the DiT and both
conditioning encoders (Qwen3 text, grafted Qwen3-VL vision), half the samples with the image as context;
2b. in-context training, where half of the image-context samples reach the DiT as a clean reference image
(`model.teacher_context: reference`) instead of through the VLM; 3. step distillation to 4 Euler steps by
trajectory regression. Everything is a function of `ToyBaseSettings`: the defaults reproduce the shipped
dopsd/assets/toy_turbo (same torch build and thread count); `--work` caches finished stages; `report.json` in
the output records the settings, each stage's wall time and the evaluator's scores. `--set device=cuda` runs
stages 2-3 on a GPU. The backend is used through its public protocol (`dopsd.models.base.TeacherEncoderBackend`).

The curved world (`--world curved`, `CurvedToyBaseSettings`; dopsd_world.curved): the same recipe on the same
images, whose captions leave attributes open, so the flow is curved. Its gate, fixed before any curved build ran
(`gate.CURVED_GATE`, evaluated by `gate.curved_gate` into report.json; `dopsd-world gate --out DIR` re-evaluates
it from a build's outputs): at 4 Euler steps the model before distillation must be clearly worse than the turbo
(Fréchet distance at least 1.5x the turbo's, or sharpness ratio at least 0.2 lower), and the turbo at 4 steps
close to the pre-distillation model at its many-step budget (`teacher_steps`: stated-attribute accuracy at most
0.03 lower, Fréchet at most 1.25x, diversity ratio at most 0.1 lower, sharpness ratio within 0.15). The curved
build also writes the pre-distillation transformer (`pre_distillation.safetensors`) beside the turbo.

Why each stage is there, timings on CPU and GPU, and what was tried and did not work: benchmarks/world/README.md.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dopsd.dist import all_mean, init_distributed
from dopsd.sampling import sample_batch as sample

from .evaluator import ACC_BAR
from .gate import curved_gate, curved_scores
from .generator import TEXTURES, VOCAB, captions, sample_world
from .partial import StageCheckpoint

log = logging.getLogger(__name__)

# Words and phrases that name a texture in `captions` (stripped for the "image tells the texture" variant).
_TEXTURE_PHRASES = re.compile(r"\s*\bwith (?:stripes|dots|a solid fill|a checker pattern)\b|\s*\b(?:"
                              + "|".join(TEXTURES) + r")\b")


def strip_texture(caption: str) -> str:
    return re.sub(r"\s+,", ",", _TEXTURE_PHRASES.sub("", caption)).strip()


def world_corpus() -> tuple[str, ...]:
    """Caption lines covering every attribute word, so the toy tokenizer learns them as whole tokens."""
    _, attrs = sample_world(64, seed=999)
    return tuple(c for a in attrs for c in captions(a)) + tuple(" ".join(v) for v in VOCAB.values())


# What the shipped toy turbo keeps at 4 steps (tests/test_world_toybase.py): on held-out world prompts, the
# evaluator's bar for real images (`ACC_BAR`, 0.95 mean attribute accuracy); with the image as its only context
# (no text) and with a reference of the unseen texture, less (the copy blurs small detail; the texture is new).
# (Why the DiT is 192 wide: the previous, 96-wide one missed the first bar; see benchmarks/world/README.md.)
QUALITY_BAR = {"acc_mean": ACC_BAR, "sharpness_ratio": 0.5, "image_only_acc": 0.85, "reference_acc": 0.85}


@dataclass(frozen=True)
class ToyBaseSettings:
    seed: int = 0
    threads: int = 2
    device: str = "cpu"               # where stages 2-3 run (the VAE stage always runs on the CPU)
    size: int = 32
    # network sizes (see zimage_tiny.build_tiny_components)
    dit_dim: int = 192                # 96 draws blobs (see QUALITY_BAR)
    dit_layers: int = 4
    text_hidden: int = 64
    vision_hidden: int = 64
    teacher_patch: int = 8            # 32x32 images are resized to 64x64: 8x8 patches -> 16 merged tokens
    vae_channels: tuple[int, ...] = (16, 32)
    vae_groups: int = 8
    latent_channels: int = 8
    shift: float = 3.0                # Z-Image-Turbo's schedule: 4 steps = 1, .9, .75, .5 -> 0
    num_images: int = 8192
    num_unnamed: int = 4096           # images of random unnamed textures (image-context samples only)
    unnamed_textures: str = "4x1"     # their tile families (generator.UNNAMED_FAMILIES), e.g. "4x1,8x2"
    # stage 1
    vae_steps: int = 1500
    vae_lr: float = 2e-3
    vae_batch: int = 32
    vae_kl: float = 1e-6
    # stage 2
    pretrain_steps: int = 4000
    pretrain_lr: float = 1e-3
    batch: int = 32
    p_image: float = 0.5              # share of samples conditioned on image (+ text variant)
    p_unnamed: float = 0.5            # share of those that show an unnamed texture
    aux_weight: float = 0.0           # > 0: image tokens also reconstruct their pixels (`PatchReconstruction`)
    # stage 2b: more pretraining with image-context samples (unnamed textures above all) weighted up
    incontext_steps: int = 2000
    incontext_lr: float = 5e-4
    incontext_p_image: float = 0.75
    incontext_p_unnamed: float = 0.67
    # from stage 2b on (and in the distillation): share of image-context samples whose image is given to the DiT
    # as a clean reference in its omni sequence (`model.teacher_context: reference`) instead of via the VLM
    p_reference: float = 0.5
    # stage 3
    trajectories: int = 2048
    teacher_steps: int = 32           # a multiple of turbo_steps, so the two grids share points
    turbo_steps: int = 4
    distill_steps: int = 1000
    distill_lr: float = 3e-4
    # evaluation in report.json
    eval_count: int = 256

    @property
    def teacher_pixels(self) -> int:
        return (2 * self.size) ** 2


@dataclass(frozen=True)
class CurvedToyBaseSettings(ToyBaseSettings):
    """The curved world's toy turbo (`dopsd-world make-toy-base --world curved`; dopsd_world.curved): the same
    recipe on the same images, captions that state shape, colour and 0-2 more attributes. Its multimodal
    flow is harder to distil than the base world's nearly straight one, hence twice the trajectories and
    distillation steps. Passes or fails `CURVED_GATE` (`curved_gate`), stated before any build ran. One torch
    thread: on the shared 2-core box (load average 7) a 192-wide pretraining step took 3-22 s with one thread
    and 27-55 s with two (OpenMP workers waiting for each other between many small ops)."""
    threads: int = 1
    trajectories: int = 4096
    distill_steps: int = 2000
    world: str = "curved"
    stated_extra: str = "0,1,2"       # how many attributes beyond shape and colour a caption states (curved.EXTRA)
    eval_prompts: int = 64            # report.json: curved-world prompts, each sampled with eval_seeds noise seeds
    eval_seeds: int = 8


# The curved build's transformer before step distillation, in its output directory (keys as a stage cache's).
PRE_DISTILLATION = "pre_distillation.safetensors"

WORLDS = {"base": ToyBaseSettings, "curved": CurvedToyBaseSettings}


def _extra(s: ToyBaseSettings) -> tuple[int, ...]:
    return tuple(int(k) for k in s.stated_extra.split(","))


def curved_build_settings(report: dict, where: str | Path = "report.json") -> CurvedToyBaseSettings:
    """The settings a curved build was made with, from its report.json (lists back to tuples)."""
    if report["settings"].get("world") != "curved":
        raise ValueError(f"{where}: not a curved-world build (settings.world={report['settings'].get('world')!r})")
    return CurvedToyBaseSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in report["settings"].items()})


@dataclass
class Stage:
    seconds: float = 0.0
    final_loss: float = float("nan")


# ---------------------------------------------------------------------------------------------- helpers

def _to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def _cosine_lr(opt: torch.optim.Optimizer, steps: int, warmup: int = 100) -> torch.optim.lr_scheduler.LambdaLR:
    def f(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (i - warmup) / max(1, steps - warmup))))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


# Data parallel over processes (`torchrun --nproc_per_node N -m dopsd_world.toybase ...`): every rank draws the
# same global batch from the same seeded streams and computes a strided slice of it; gradients are averaged
# over ranks, so N is a speed knob only (the result matches one process up to float summation order). Several
# processes may share one GPU, so the reduction runs over gloo on CPU copies (NCCL refuses two ranks on one
# device); on one H100 that bought little (benchmarks/world/README.md: 0.87 s per 256-sample step in one
# process, 0.69 s in four); spreading a build over several GPUs is what it is for, not measured here.

def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _local(n: int) -> list[int] | None:
    """This rank's indices of an n-sample global batch (None: all of it, one process)."""
    rank, world = _rank_world()
    if world == 1:
        return None
    if n % world:
        raise ValueError(f"toy base: a global batch of {n} samples does not split over {world} processes")
    return list(range(rank, n, world))


def _take(items, mine: list[int] | None):
    if mine is None:
        return items
    return items[mine] if torch.is_tensor(items) else [items[i] for i in mine]


def _average_grads(params: list[torch.nn.Parameter]) -> None:
    """Average gradients over ranks. A parameter no rank touched keeps grad None (as in one process, where
    AdamW then skips it); one that some rank touched gets the average with zeros for the others."""
    import torch.distributed as dist

    _, world = _rank_world()
    if world == 1:
        return
    flat = torch.cat([torch.cat([p.grad.reshape(-1).cpu() if p.grad is not None else torch.zeros(p.numel())
                                 for p in params]),
                      torch.tensor([float(p.grad is not None) for p in params])])
    dist.all_reduce(flat)
    offset, touched = 0, flat[-len(params):]
    for p, used in zip(params, touched.tolist()):
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.device) / world if used else None
        offset += n


def _optimizer_step(opt: torch.optim.Optimizer, sched, params: list[torch.nn.Parameter], loss: torch.Tensor,
                    ema: float | None) -> float:
    """Backward, average gradients over ranks, clip to norm 1, step; returns the loss's running mean (as logged)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    _average_grads(params)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    return loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()


def build_backend(components: dict, settings: ToyBaseSettings, trainable: bool):
    """A `ZImageBackend` over live components (no directory); the Qwen3-VL front-end is grafted onto the
    text encoder here exactly as the backend does when it loads one from disk."""
    from dopsd.models.zimage import ZImageBackend, graft_language_model

    c = components
    backend = ZImageBackend(c["transformer"], c["vae"], c["text_encoder"], c["tokenizer"],
                            dict(c["scheduler"].config), Path("."), torch.device(settings.device),
                            teacher_min_pixels=settings.teacher_pixels, teacher_max_pixels=settings.teacher_pixels)
    vl = c["teacher_encoder"]
    if not getattr(vl, "_dopsd_grafted", False):
        c["lm_head"] = vl.lm_head  # kept for saving; the backend replaces it (hidden states only)
        graft_language_model(vl, c["text_encoder"])
        vl._dopsd_grafted = True
    backend.set_teacher_encoder(vl, c["tokenizer"], c["image_processor"])
    for module in (c["text_encoder"], vl):
        module.requires_grad_(trainable)
        module.train(trainable)
    return backend


# How a training sample is conditioned: on text alone (the student), or on the image too, read by the Qwen3-VL
# front-end (the recipe's teacher) or put into the DiT's omni sequence as a clean reference image.
TEXT, VLM, REFERENCE = "text", "vlm", "reference"


@dataclass
class Contexts:
    """A batch's conditioning: per-sample text/VLM features (None at reference samples) and the reference
    samples' `ReferenceContext`, which the DiT takes in a separate (omni) call."""
    features: list
    ref_idx: list[int]
    ref: object = None


def contexts(backend, prompts: list[str], images: torch.Tensor, kinds: list[str], grad: bool) -> Contexts:
    """Per-sample contexts of the kinds (TEXT, VLM, REFERENCE) given."""
    with torch.set_grad_enabled(grad):
        out: list = [None] * len(prompts)
        groups = {k: [i for i, kind in enumerate(kinds) if kind == k] for k in (TEXT, VLM, REFERENCE)}
        if groups[TEXT]:
            for i, c in zip(groups[TEXT], backend.student_features([prompts[i] for i in groups[TEXT]])):
                out[i] = c
        if groups[VLM]:
            for i, c in zip(groups[VLM], backend.vlm_features([prompts[i] for i in groups[VLM]], images[groups[VLM]])):
                out[i] = c
        ref = None
        if groups[REFERENCE]:
            ref = backend.reference_features([prompts[i] for i in groups[REFERENCE]], images[groups[REFERENCE]])
    return Contexts(out, groups[REFERENCE], ref)


def velocity(backend, transformer, x: torch.Tensor, sigma, ctx: Contexts) -> torch.Tensor:
    """`backend.velocity` over a batch of mixed kinds: one call for the text/VLM samples, one for references."""
    if not ctx.ref_idx:
        return backend.velocity(transformer, x, sigma, ctx.features)
    ref = set(ctx.ref_idx)
    rest = [i for i in range(len(x)) if i not in ref]
    pick = (lambda idx: sigma[idx]) if torch.is_tensor(sigma) and sigma.dim() else (lambda idx: sigma)
    parts = [backend.velocity(transformer, x[ctx.ref_idx], pick(ctx.ref_idx), ctx.ref)]
    if rest:
        parts.insert(0, backend.velocity(transformer, x[rest], pick(rest), [ctx.features[i] for i in rest]))
    order = torch.tensor(rest + ctx.ref_idx, device=x.device)
    return torch.cat(parts)[torch.argsort(order)]


@dataclass
class Pool:
    """Training images: `n_base` base-world images, then images of unnamed textures (captions stripped of
    texture words), which are only ever shown with the image as context."""
    images: torch.Tensor
    caption_sets: list[list[str]]
    n_base: int

    def draw(self, rng: random.Random, count: int, s: "ToyBaseSettings",
             p_reference: float = 0.0) -> tuple[list[int], list[str], list[str]]:
        """Indices, prompts and conditioning kinds of `count` samples: text only (a caption), or the image with
        its full caption, its caption without the texture, or no text; unnamed textures never get a name. An
        image is read by the VLM, or with probability `p_reference` given to the DiT as a reference."""
        idx, prompts, kinds = [], [], []
        for _ in range(count):
            if rng.random() >= s.p_image:
                i = rng.randrange(self.n_base)
                prompt, image = rng.choice(self.caption_sets[i]), False
            elif rng.random() < s.p_unnamed and len(self.images) > self.n_base:
                i = rng.randrange(self.n_base, len(self.images))
                prompt, image = (rng.choice(self.caption_sets[i]) if rng.random() < 0.5 else ""), True
            else:
                i = rng.randrange(self.n_base)
                caption = rng.choice(self.caption_sets[i])
                variant = rng.randrange(3)
                prompt, image = (caption if variant == 0 else strip_texture(caption) if variant == 1 else ""), True
            if image and p_reference and rng.random() < p_reference:  # (no draw at 0: old streams unchanged)
                kind = REFERENCE
            else:
                kind = VLM if image else TEXT
            idx.append(i)
            prompts.append(prompt)
            kinds.append(kind)
        return idx, prompts, kinds


def make_pool(s: "ToyBaseSettings") -> Pool:
    """The training images and their caption sets; in the curved world (the same images) each image's
    captions state only some attributes, and an unnamed texture's never its texture."""
    from .generator import sample_unnamed_textures

    raw, attrs = sample_world(s.num_images, seed=s.seed, size=s.size)
    raw_u, attrs_u = sample_unnamed_textures(s.num_unnamed, seed=s.seed, size=s.size,
                                             families=s.unnamed_textures.split(","))
    images = _to_float(np.concatenate([raw, raw_u]))
    if getattr(s, "world", "base") == "curved":
        from .curved import draw_stated, sample_curved_world

        stated = sample_curved_world(s.num_images, seed=s.seed, size=s.size, extra=_extra(s))[2]
        rng = random.Random(f"dopsd-curved-unnamed:{s.seed}")
        stated_u = [tuple(k for k in draw_stated(rng, _extra(s)) if k != "texture") for _ in attrs_u]
        caption_sets = ([captions(a, stated=st) for a, st in zip(attrs, stated)]
                        + [captions(a, stated=st) for a, st in zip(attrs_u, stated_u)])
    else:
        caption_sets = [captions(a) for a in attrs] + [[strip_texture(c) for c in captions(a)] for a in attrs_u]
    return Pool(images, caption_sets, s.num_images)


# ----------------------------------------------------------------------------------------------- stages

def train_vae(vae, images: torch.Tensor, s: ToyBaseSettings) -> Stage:
    gen = torch.Generator().manual_seed(s.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    sched = _cosine_lr(opt, s.vae_steps)
    vae.train()
    t0 = time.time()
    loss = torch.tensor(float("nan"))
    for step in range(s.vae_steps):
        x = images[torch.randint(0, len(images), (s.vae_batch,), generator=gen)] * 2 - 1
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + s.vae_kl * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0:
            log.info("vae %d/%d loss %.5f (%.0fs)", step + 1, s.vae_steps, loss.item(), time.time() - t0)
    vae.eval().requires_grad_(False)
    # Standardise the latents the way Z-Image's config does (z' = (z - shift) * scale).
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i:i + 256] * 2 - 1).latent_dist.mean for i in range(0, min(2048, len(images)), 256)])
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))
    return Stage(time.time() - t0, loss.item())


@torch.no_grad()
def make_deterministic(vae) -> None:
    """Pin the posterior's std to ~0 (log-variance output -30): latents are then the posterior mean.

    With a tiny KL weight the VAE leaves its unused latent channels at std ~1, i.e. pure noise that every
    flow-matching target (pretraining here, SFT in the trainer) would have to regress; the decoder already
    ignores those channels, so dropping the noise changes reconstructions little and removes that floor.
    """
    conv = vae.encoder.conv_out
    half = conv.out_channels // 2
    conv.weight[half:] = 0
    conv.bias[half:] = -30.0


@torch.no_grad()
def latent_moments(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dists = [vae.encode(images[i:i + 256].to(vae.device) * 2 - 1).latent_dist for i in range(0, len(images), 256)]
    return torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])


def image_token_span(backend, size: int) -> tuple[int, int]:
    """Where a reference image's tokens sit in a teacher context (`vlm_features` output): the chat
    template puts the image first, so they start after a fixed prefix; checked against the tokenizer."""
    from PIL import Image

    from dopsd.models.zimage import IMAGE_PAD, teacher_text

    _, tok, processor = backend.teacher_encoder()
    min_px, max_px = backend.teacher_pixels
    thw = processor(images=[Image.new("RGB", (size, size))], size={"shortest_edge": min_px, "longest_edge": max_px},
                    return_tensors="pt")["image_grid_thw"][0]
    count = int(thw.prod()) // processor.merge_size ** 2
    start = len(tok("<|im_start|>user\n<|vision_start|>").input_ids)
    ids = tok(teacher_text(tok, "", count)).input_ids
    if ids[start:start + count] != [tok.convert_tokens_to_ids(IMAGE_PAD)] * count:
        raise RuntimeError("unexpected teacher chat template: the image tokens are not where expected")
    return start, count


class PatchReconstruction(torch.nn.Module):
    """Auxiliary head: each image token of the teacher context predicts the pixels of its image patch.

    Trained with the encoders during pretraining only (not saved). The flow-matching loss alone keeps fine
    texture in the context features only partly (a linear probe read 85% of an unnamed tile's bits back);
    this keeps all of it in the tokens the DiT reads. (It did not make the 96x4 toy DiT copy textures.)"""

    def __init__(self, hidden: int, size: int, tokens: int):
        super().__init__()
        self.grid = math.isqrt(tokens)
        self.patch = size // self.grid
        self.proj = torch.nn.Linear(hidden, 3 * self.patch ** 2)

    def loss(self, features: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """features (n, tokens, hidden) in raster order of the merged patches; pixels (n, 3, size, size)."""
        p, n = self.patch, len(pixels)
        target = pixels.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(n, self.grid ** 2, -1)
        return F.mse_loss(self.proj(features), target)


def pretrain(backend, components: dict, pool: Pool, s: ToyBaseSettings, monitor=None, phase: int = 0,
             ckpt: StageCheckpoint | None = None) -> Stage:
    transformer = backend.transformer
    vl = components["teacher_encoder"]
    params = (list(transformer.parameters()) + list(components["text_encoder"].parameters())
              + list(vl.model.visual.parameters()))
    head = None
    if s.aux_weight:
        span = image_token_span(backend, s.size)
        head = PatchReconstruction(s.text_hidden, s.size, span[1]).to(backend.device)
        params += list(head.parameters())
    opt = torch.optim.AdamW(params, lr=s.pretrain_lr, weight_decay=0.01)
    sched = _cosine_lr(opt, s.pretrain_steps, warmup=200)
    gen = torch.Generator().manual_seed(s.seed + 2 + 10 * phase)
    rng = random.Random(s.seed + 2 + 10 * phase)
    transformer.train()
    dev = backend.device
    mean, std = latent_moments(components["vae"], pool.images)  # the VAE is frozen: encode once, sample per step
    ckpt = ckpt or StageCheckpoint()
    loop = dict(modules={"transformer": transformer, "text_encoder": components["text_encoder"],
                         "visual": vl.model.visual, **({"head": head} if head is not None else {})},
                opt=opt, sched=sched, gens={"noise": gen}, rngs={"draw": rng})
    start, ema, elapsed = ckpt.resume(**loop)
    t0 = time.time() - elapsed
    mine = _local(s.batch)
    for step in range(start, s.pretrain_steps):
        # the global batch and all its noise, drawn the same on every rank; this rank computes `mine` of it
        idx, prompts, kinds = pool.draw(rng, s.batch, s, s.p_reference if phase else 0.0)
        idx = torch.tensor(idx)
        cfg = components["vae"].config
        m, sd = mean[idx.to(dev)], std[idx.to(dev)]
        # noise is drawn on the CPU (the same stream on every device), then moved
        x0 = (m + sd * torch.randn(m.shape, generator=gen).to(dev) - cfg.shift_factor) * cfg.scaling_factor
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        u = torch.sigmoid(torch.randn(s.batch, generator=gen))  # logit-normal, then the schedule's shift
        sig = (s.shift * u / (1 + (s.shift - 1) * u)).view(-1, 1, 1, 1).to(dev)
        x = (1 - sig) * x0 + sig * noise
        idx, prompts, kinds, x0, noise, sig, x = (_take(t, mine) for t in (idx, prompts, kinds, x0, noise, sig, x))
        pixels = pool.images[idx]
        ctx = contexts(backend, prompts, pixels, kinds, grad=True)
        v = velocity(backend, transformer, x, sig.flatten(), ctx)
        loss = F.mse_loss(v, noise - x0)
        with_image = [i for i, kind in enumerate(kinds) if kind == VLM]
        if head is not None and with_image:
            start, count = span
            features = torch.stack([ctx.features[i][start:start + count] for i in with_image])
            loss = loss + s.aux_weight * head.loss(features, pixels[with_image].to(dev))
        ema = _optimizer_step(opt, sched, params, loss, ema)
        if (step + 1) % 100 == 0:
            log.info("pretrain %d/%d loss %.4f (%.0fs)", step + 1, s.pretrain_steps, all_mean(ema),
                     time.time() - t0)
        if monitor is not None and (step + 1) % 1000 == 0:
            transformer.eval()
            log.info("pretrain %d: %s", step + 1, monitor())
            transformer.train()
        if ckpt.due():
            ckpt.save({"position": step + 1, "ema": ema, "seconds": time.time() - t0}, **loop)
    transformer.eval()
    return Stage(time.time() - t0, all_mean(ema))


TRAJECTORY_CHUNK = 128  # trajectories integrated together (one forward's batch)


@torch.no_grad()
def make_trajectories(backend, pool: Pool, s: ToyBaseSettings, ckpt: StageCheckpoint | None = None) -> dict:
    """Many-step Euler trajectories of the pretrained model, kept at the turbo schedule's points. With `ckpt`
    (one process only) the chunks done so far are saved and a rerun continues after them."""
    from dopsd.schedule import euler_step

    rng = random.Random(s.seed + 3)
    gen = torch.Generator().manual_seed(s.seed + 3)
    idx, prompts, kinds = pool.draw(rng, s.trajectories, s, s.p_reference)
    idx = torch.tensor(idx)
    shape = backend.latent_shape(s.trajectories, s.size, s.size)
    noise = torch.randn(shape, generator=gen)
    fine = backend.sigmas(s.teacher_steps, shape)
    every = s.teacher_steps // s.turbo_steps
    rank, world = _rank_world()
    # chunk c is integrated by rank c % world; the others leave zeros there, and a sum gathers them all
    states = (torch.empty if world == 1 else torch.zeros)((s.trajectories, s.turbo_steps + 1) + tuple(shape[1:]))
    ckpt = ckpt if ckpt is not None and world == 1 else StageCheckpoint()
    first, kept = 0, {"states": states}
    if (saved := ckpt.restore({}, tensors=kept)) is not None:
        first, states = saved["position"], kept["states"]
    for chunk, start in enumerate(range(0, s.trajectories, TRAJECTORY_CHUNK)):
        if chunk % world != rank or chunk < first:
            continue
        if ckpt.due():
            ckpt.save({"position": chunk}, {}, tensors={"states": states})
        sl = slice(start, start + TRAJECTORY_CHUNK)
        ctx = contexts(backend, prompts[sl], pool.images[idx[sl]], kinds[sl], grad=False)
        x = noise[sl].to(backend.device)
        states[sl, 0] = noise[sl]
        for k in range(s.teacher_steps):
            x = euler_step(x, velocity(backend, backend.transformer, x, fine[k], ctx), fine[k], fine[k + 1])
            if (k + 1) % every == 0:
                states[sl, (k + 1) // every] = x.cpu()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(states)
    return {"idx": idx, "prompts": prompts, "kinds": kinds, "states": states}


def distill(backend, trajectories: dict, pool: Pool, s: ToyBaseSettings, ckpt: StageCheckpoint | None = None) -> Stage:
    transformer = backend.transformer
    coarse = backend.sigmas(s.turbo_steps, backend.latent_shape(1, s.size, s.size))
    opt = torch.optim.AdamW(transformer.parameters(), lr=s.distill_lr, weight_decay=0.0)
    sched = _cosine_lr(opt, s.distill_steps)
    gen = torch.Generator().manual_seed(s.seed + 4)
    states, n = trajectories["states"], s.trajectories
    transformer.train()
    ckpt = ckpt or StageCheckpoint()
    loop = dict(modules={"transformer": transformer}, opt=opt, sched=sched, gens={"pick": gen})
    start, ema, elapsed = ckpt.resume(**loop)
    t0 = time.time() - elapsed
    mine = _local(s.batch)
    for step in range(start, s.distill_steps):
        j = torch.randint(0, n, (s.batch,), generator=gen)
        k = torch.randint(0, s.turbo_steps, (s.batch,), generator=gen)
        j, k = _take(j, mine), _take(k, mine)
        with torch.no_grad():
            ctx = contexts(backend, [trajectories["prompts"][i] for i in j.tolist()],
                           pool.images[trajectories["idx"][j]], [trajectories["kinds"][i] for i in j.tolist()],
                           grad=False)
        dev = backend.device
        sig = torch.tensor([coarse[i] for i in k.tolist()], device=dev)
        sig_next = torch.tensor([coarse[i + 1] for i in k.tolist()], device=dev)
        x, x_next = states[j, k].to(dev), states[j, k + 1].to(dev)
        target = (x_next - x) / (sig_next - sig).view(-1, 1, 1, 1)
        v = velocity(backend, transformer, x, sig, ctx)
        # x0-space weighting (as D-OPSD's loss): errors matter in proportion to the step they move.
        loss = (((v - target) * (sig - sig_next).view(-1, 1, 1, 1)) ** 2).mean()
        ema = _optimizer_step(opt, sched, list(transformer.parameters()), loss, ema)
        if (step + 1) % 100 == 0:
            log.info("distill %d/%d loss %.5f (%.0fs)", step + 1, s.distill_steps, all_mean(ema),
                     time.time() - t0)
        if ckpt.due():
            ckpt.save({"position": step + 1, "ema": ema, "seconds": time.time() - t0}, **loop)
    if ckpt.path is not None and start < s.distill_steps:  # the turbo is final: a rerun skips to its evaluation
        ckpt.save({"position": s.distill_steps, "ema": ema, "seconds": time.time() - t0}, **loop)
    transformer.eval()
    return Stage(time.time() - t0, all_mean(ema))


def evaluate(backend, evaluator, s: ToyBaseSettings, num_steps: int, with_image: bool = False) -> dict:
    """Evaluator scores of samples for held-out world prompts (a seed range no stage trained on)."""
    images, attrs = sample_world(s.eval_count, seed=20_000, size=s.size)
    prompts = [captions(a)[i % 3] for i, a in enumerate(attrs)]
    pixels = _to_float(images)
    out = sample(backend, backend.transformer, prompts if not with_image else [""] * len(prompts),
                 list(range(s.eval_count)), num_steps, s.size, images=pixels if with_image else None)
    scores = evaluator.score(out, targets=attrs)
    return {k: round(float(v), 4) for k, v in scores.items()}


@contextlib.contextmanager
def teacher_route(backend, route: str):
    """The backend's teacher context through `route` ("vlm" or "reference") inside the block, whichever route
    it is configured with."""
    configured = backend.teacher_context
    backend.teacher_context = route
    try:
        yield backend
    finally:
        backend.teacher_context = configured


def teacher_samples(backend, prompts: list[str], images: torch.Tensor, route: str, num_steps: int,
                    size: int) -> torch.Tensor:
    """Teacher-context samples (prompt + image, noise seed i for sample i) through `route`."""
    with teacher_route(backend, route):
        return sample(backend, backend.transformer, prompts, list(range(len(prompts))), num_steps, size,
                      images=images)


def in_context(backend, evaluator, s: ToyBaseSettings, count: int = 64) -> dict:
    """Texture accuracy on images of the held-out concept (never trained on) for "[V]" prompts: sampled with
    the image as context (the teacher, both routes: VLM features and DiT reference) and from the text alone
    (the student)."""
    from .generator import PLACEHOLDER, concept_samples

    raw, attrs = concept_samples(count, seed=4242, size=s.size)
    prompts = [captions(a, PLACEHOLDER)[i % 3] for i, a in enumerate(attrs)]
    report = {}
    for route, suffix in (("vlm", ""), ("reference", "_reference")):
        acc = evaluator.attribute_accuracy(teacher_samples(backend, prompts, _to_float(raw), route, s.turbo_steps,
                                                           s.size), attrs)
        report[f"teacher{suffix}_concept_texture"] = acc["texture"]
        report[f"teacher{suffix}_concept_attrs"] = round(acc["mean"], 4)
    student = sample(backend, backend.transformer, prompts, list(range(count)), s.turbo_steps, s.size)
    report["student_concept_texture"] = evaluator.attribute_accuracy(student, attrs)["texture"]
    return report


# ------------------------------------------------------------------------------------------------- main

# Settings each stage's result does not depend on (everything else keys its cache entry).
_DISTILL = ("trajectories", "teacher_steps", "turbo_steps", "distill_steps", "distill_lr", "eval_count",
            "eval_prompts", "eval_seeds")
_INCONTEXT = ("incontext_steps", "incontext_lr", "incontext_p_image", "incontext_p_unnamed")
_LATER = {  # the VAE stage always runs on the CPU
    "vae": _DISTILL + _INCONTEXT + ("device", "p_unnamed", "pretrain_steps", "pretrain_lr", "batch", "p_image",
                                    "aux_weight", "p_reference", "world", "stated_extra"),  # (same images)
    "incontext": _DISTILL,
    "pretrain": _DISTILL + _INCONTEXT + ("p_reference",),
    "trajectories": ("distill_steps", "distill_lr", "eval_count", "eval_prompts", "eval_seeds"),
    "distill": ("eval_count", "eval_prompts", "eval_seeds"),
    "base_scores": ("trajectories", "distill_steps", "distill_lr"),
}


def _stage_key(stage: str, s: ToyBaseSettings) -> str:
    settings = {k: v for k, v in asdict(s).items() if k not in _LATER[stage]}
    return f"{stage}-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _stage_modules(c: dict, stage: str) -> dict:
    if stage == "vae":
        return {"vae": c["vae"]}
    return {"transformer": c["transformer"], "text_encoder": c["text_encoder"],
            "visual": c["teacher_encoder"].model.visual}


def module_state(state: dict, name: str) -> dict:
    """One module's weights from a stage cache's flat state (keys "<module>.<param>", see `_stage_modules`)."""
    return {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}


def _cached_stage(work: Path | None, stage: str, s: ToyBaseSettings, c: dict, run, every_s: float = 600.0) -> dict:
    """Run a stage, or load its result from `work` when the same settings already produced it (an interrupted
    or re-tuned build does not redo finished stages; the result is the same either way). `run(ckpt)` gets the
    stage's mid-stage checkpoint (`partial.StageCheckpoint`), so an interrupted stage resumes, too."""
    from safetensors.torch import load_file, save_file

    key = _stage_key(stage, s)
    path = work / f"{key}.safetensors" if work is not None else None
    modules = _stage_modules(c, stage)
    if path is not None and path.exists():
        state = load_file(str(path))
        for name, module in modules.items():
            module.load_state_dict(module_state(state, name))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            info = json.loads(f.metadata()["info"])
        if stage == "vae":
            c["vae"].register_to_config(**info.pop("vae_config"))
        log.info("%s: loaded from %s", stage, path)
        return {**info, "cached": True}
    ckpt = StageCheckpoint(work, key, every_s)
    info = asdict(run(ckpt))
    if path is not None and _rank_world()[0] == 0:
        work.mkdir(parents=True, exist_ok=True)
        state = {f"{name}.{k}": v.detach().cpu().contiguous() for name, module in modules.items()
                 for k, v in module.state_dict().items()}
        meta = dict(info)
        if stage == "vae":
            meta["vae_config"] = {k: c["vae"].config[k] for k in ("shift_factor", "scaling_factor")}
        save_file(state, str(path), metadata={"info": json.dumps(meta)})
    ckpt.finish()
    return info


def _fingerprint(module) -> str:
    """A short hash of a module's weights (what a cached score depends on besides the settings)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()) if isinstance(module, torch.nn.Module) else []:
        h.update(k.encode() + v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:12]


def _cached_json(work: Path | None, key: str, compute) -> dict:
    path = work / f"{key}.json" if work is not None else None
    if path is not None and path.exists():
        log.info("%s: loaded from %s", key, path)
        return json.loads(path.read_text())
    value = compute()
    if path is not None and _rank_world()[0] == 0:
        work.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    return value


def _cached_trajectories(work: Path | None, backend, pool: Pool, s: ToyBaseSettings, every_s: float) -> dict:
    """`make_trajectories`, cached in `work` like a stage (tensors in safetensors, prompts in its metadata)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    key = _stage_key("trajectories", s)
    path = work / f"{key}.safetensors" if work is not None else None
    if path is not None and path.exists():
        with safe_open(str(path), framework="pt") as f:
            text = json.loads(f.metadata()["text"])
            log.info("trajectories: loaded from %s", path)
            return {"idx": f.get_tensor("idx"), "states": f.get_tensor("states"), **text}
    ckpt = StageCheckpoint(work, key, every_s)
    traj = make_trajectories(backend, pool, s, ckpt)
    if path is not None and _rank_world()[0] == 0:
        save_file({"idx": traj["idx"].contiguous(), "states": traj["states"].contiguous()}, str(path),
                  metadata={"text": json.dumps({"prompts": traj["prompts"], "kinds": traj["kinds"]})})
    ckpt.finish()
    return traj


def _move(components: dict, device: str) -> None:
    for module in components.values():
        if isinstance(module, torch.nn.Module):
            module.to(device)


def components_and_pool(s: ToyBaseSettings) -> tuple[dict, Pool]:
    """The untrained toy components (random init from the torch seed set by the caller) and the training pool."""
    from dopsd.models.zimage_tiny import build_tiny_components

    c = build_tiny_components(
        s.seed, dit_dim=s.dit_dim, dit_layers=s.dit_layers, text_hidden=s.text_hidden,
        vae_channels=s.vae_channels, vae_groups=s.vae_groups, latent_channels=s.latent_channels,
        teacher_patch=s.teacher_patch, vision_hidden=s.vision_hidden, shift=s.shift,
        tokenizer_corpus=world_corpus())
    return c, make_pool(s)


def prepared_vae(work: Path | None, s: ToyBaseSettings, c: dict, pool: Pool) -> dict:
    """Stage 1 (or its cached result): the VAE trained, frozen, deterministic, and every component on the
    stage 2-3 device."""
    c["vae"].requires_grad_(True)
    info = _cached_stage(work, "vae", s, c, lambda _: train_vae(c["vae"], pool.images, s))
    c["vae"].eval().requires_grad_(False)
    make_deterministic(c["vae"])
    _move(c, s.device)
    return info


def make_toy_base(out_dir: str | Path, settings: ToyBaseSettings = ToyBaseSettings(), evaluator=None,
                  work: str | Path | None = None, checkpoint_every_s: float = 600.0) -> dict:
    """Build the toy turbo into `out_dir`. With `work`, finished stages are cached there and a long stage saves
    its loop state every `checkpoint_every_s` seconds, so a killed build resumes where it stopped."""
    from dopsd.models.zimage_tiny import save_zimage_dir

    s = settings
    work = Path(work) if work else None
    torch.set_num_threads(s.threads)
    info = init_distributed(backend="gloo")  # several processes under torchrun: data parallel (see _local)
    if s.device.startswith("cuda") and info.distributed:
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
    if not info.is_main:
        evaluator = None  # rank 0 evaluates (also the in-training monitor) and writes the model
    deterministic = torch.are_deterministic_algorithms_enabled()
    if s.device.startswith("cuda"):  # reproducible on the same GPU model and software (cuBLAS needs this)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    t_start = time.time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        c, pool = components_and_pool(s)
        report: dict = {"settings": asdict(s), "stages": {}}
        report["stages"]["vae"] = prepared_vae(work, s, c, pool)
        backend = build_backend(c, s, trainable=True)
        monitor = (lambda: in_context(backend, evaluator, s, count=32)) if evaluator is not None else None
        every = checkpoint_every_s
        report["stages"]["pretrain"] = _cached_stage(work, "pretrain", s, c,
                                                     lambda ck: pretrain(backend, c, pool, s, monitor, ckpt=ck), every)
        if s.incontext_steps:
            phase = replace(s, pretrain_steps=s.incontext_steps, pretrain_lr=s.incontext_lr,
                            p_image=s.incontext_p_image, p_unnamed=s.incontext_p_unnamed)
            report["stages"]["incontext"] = _cached_stage(
                work, "incontext", s, c, lambda ck: pretrain(backend, c, pool, phase, monitor, phase=1, ckpt=ck), every)
        backend = build_backend(c, s, trainable=False)
        backend.transformer.eval()
        curved = getattr(s, "world", "base") == "curved"
        if curved:  # shipped beside the turbo: the gate (and the reference rows of a comparison) score it
            pre_distillation = {f"transformer.{k}": v.detach().cpu().clone()
                                for k, v in backend.transformer.state_dict().items()}
        if evaluator is not None:
            if curved:
                score = curved_scores(backend, evaluator, s)
            else:
                def score(num_steps: int) -> dict:
                    return evaluate(backend, evaluator, s, num_steps)
            # (cached: the curved world's many-step scores take a while on a CPU)
            base = _cached_json(work, _stage_key("base_scores", s) + "-" + _fingerprint(evaluator),
                                lambda: {"base_many_steps": score(s.teacher_steps), "base_4_steps": score(s.turbo_steps)})
            report.update(base)
            log.info("base: %s steps %s; 4 steps %s", s.teacher_steps, report["base_many_steps"],
                     report["base_4_steps"])
        t0 = time.time()
        traj = _cached_trajectories(work, backend, pool, s, every)
        report["stages"]["trajectories"] = {"seconds": time.time() - t0}
        distilling = StageCheckpoint(work, _stage_key("distill", s), every)
        report["stages"]["distill"] = asdict(distill(backend, traj, pool, s, distilling))
        if evaluator is not None:
            report["turbo_4_steps"] = score(s.turbo_steps)
            report["turbo_4_steps_image_only"] = evaluate(backend, evaluator, s, s.turbo_steps, with_image=True)
            report["turbo_in_context"] = in_context(backend, evaluator, s)
            log.info("turbo: 4 steps %s; image only %s; in context %s", report["turbo_4_steps"],
                     report["turbo_4_steps_image_only"], report["turbo_in_context"])
            if curved:
                report["gate"] = curved_gate(report)
                log.info("gate: %s", report["gate"])
    torch.use_deterministic_algorithms(deterministic)
    report["seconds"] = round(time.time() - t_start, 1)
    if info.distributed:
        import torch.distributed as dist

        report["processes"] = info.world_size
        dist.destroy_process_group()
        if not info.is_main:
            return report
    c["teacher_encoder"].lm_head = c.pop("lm_head")
    _move(c, "cpu")
    out = save_zimage_dir(c, out_dir)
    if curved:
        from safetensors.torch import save_file

        save_file(pre_distillation, str(out / PRE_DISTILLATION))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    distilling.finish()  # the turbo is written: its loop state is no longer needed
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="model directory to write (Z-Image layout)")
    parser.add_argument("--work", help="stage cache directory: finished stages are reused on a rerun, and an "
                                       "interrupted stage resumes from its last mid-stage checkpoint")
    parser.add_argument("--checkpoint-every", type=float, default=600.0, metavar="SECONDS",
                        help="with --work: how often a long stage saves its loop state (default 600)")
    parser.add_argument("--evaluator", help="world evaluator safetensors (scores written to report.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a ToyBaseSettings field, e.g. --set pretrain_steps=500")
    parser.add_argument("--world", choices=sorted(WORLDS), default="base",
                        help="base: captions state all six attributes (the shipped toy turbo); curved: they leave "
                             "some open (CurvedToyBaseSettings, gated by CURVED_GATE)")


def settings_from_args(args: argparse.Namespace) -> ToyBaseSettings:
    """--world's settings class with every --set KEY=VALUE applied."""
    overrides = {}
    cls = WORLDS[getattr(args, "world", "base")]
    for item in args.set or []:
        key, _, value = item.partition("=")
        if key not in cls.__dataclass_fields__:
            raise SystemExit(f"--set {key}: not a {cls.__name__} field")
        default = getattr(cls, key)
        overrides[key] = tuple(int(v) for v in value.split(",")) if isinstance(default, tuple) else type(default)(value)
    return cls(**overrides)


def run(args: argparse.Namespace) -> int:
    evaluator = None
    if args.evaluator:
        from .evaluator import load_evaluator
        evaluator = load_evaluator(args.evaluator)
    report = make_toy_base(args.out, settings_from_args(args), evaluator, work=args.work,
                           checkpoint_every_s=getattr(args, "checkpoint_every", 600.0))
    print(json.dumps({k: v for k, v in report.items() if k != "settings"}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
