"""Text-binding probe (`dopsd-world probe`): does a short pretraining on a world's captions teach the DiT to
draw each attribute a caption states?

Why it exists: the curved build's model before step distillation (4000 + 2000 pretraining steps) was found
to ignore two of the words its captions state, at 32 Euler steps: shape 0.29 and position 0.17 accuracy
where stated (chance: 0.25 and 0.2), while colour (0.99), background (0.96) and size (0.83) are followed;
real images score 0.95-1.0. The same recipe on the base world's captions (all six stated) learns position
within 500 steps. A full build takes 7-8 h of CPU; this probe trains only stage 2 for `--steps` steps (the
VAE from --work's cache when the settings match, else trained) and samples text-only prompts of four kinds
from held-out world attributes: the world's own caption style (`world_captions`), all six stated, shape +
colour + position, and shape + colour. It writes, per kind, the evaluator's accuracy on each stated
attribute, so that a changed world can be checked in minutes before a build is spent on it.

It also reads how curved the world's flow is (`ceiling`): on `ceiling_prompts` of the world's held-out prompts
(the gate's prompt seed, `ceiling_seeds` noise seeds each, `curved.OpenScorer`), the Fréchet ratio and the
sharpness drop of 4 Euler steps against `sample_steps` -- the gate's part 1 for a turbo equal to this model
(`gate.gate_ceiling`) -- and the VAE's own cap on sharpness (`vae_sharpness_ratio`, its reconstructions of
training images; `--steps 0` reads only that, for a candidate VAE). After a short pretraining the figures are not a full build's; they rank worlds.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from .generator import captions, sample_world

KINDS = {"all": None, "shape_color_position": ("shape", "color", "position"), "shape_color": ("shape", "color")}


def probe(s, steps: int, evaluator, work: str | Path | None = None, count: int = 64,
          sample_steps: int = 32, ceiling_prompts: int = 32, ceiling_seeds: int = 8,
          ceiling_more: tuple[int, ...] = ()) -> dict:
    from dopsd.sampling import sample_batch

    from .curved import sample_curved_world
    from .toybase import _extra, build_backend, components_and_pool, prepared_vae, pretrain

    s = replace(s, pretrain_steps=steps)
    world = getattr(s, "world", "base")
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    t0 = time.time()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)
            c, pool = components_and_pool(s)
            prepared_vae(Path(work) if work else None, s, c, pool)
            vae = {"vae_sharpness_ratio": round(vae_sharpness_ratio(c["vae"], pool.images[:256]), 4)}
            if steps == 0:  # the VAE alone (a candidate VAE's ceiling, before any DiT is trained on it)
                return {"world": world, "steps": 0, **vae,
                        "seconds": round(time.time() - t0, 1)}
            stage = pretrain(build_backend(c, s, trainable=True), c, pool, s)
            backend = build_backend(c, s, trainable=False)
            backend.transformer.eval()
            _, attrs = sample_world(count, seed=20_000, size=s.size)  # a seed no stage trains on
            stated = {kind: [said] * count for kind, said in KINDS.items()}
            stated["world_captions"] = (sample_curved_world(count, 20_000, s.size, extra=_extra(s))[2]
                               if world == "curved" else [None] * count)
            out = {"world": world, "steps": steps, "sample_steps": sample_steps,
                   "final_loss": stage.final_loss, **vae}
            for kind, said in stated.items():
                prompts = [captions(a, stated=st)[i % 3] for i, (a, st) in enumerate(zip(attrs, said))]
                images = sample_batch(backend, backend.transformer, prompts, list(range(count)), sample_steps, s.size)
                targets = [a if st is None else {k: getattr(a, k) for k in st} for a, st in zip(attrs, said)]
                out[kind] = {k: round(float(v), 4) for k, v in evaluator.attribute_accuracy(images, targets).items()}
            if ceiling_prompts:
                out["ceiling"] = ceiling(backend, evaluator, s, sample_steps, ceiling_prompts, ceiling_seeds,
                                         ceiling_more)
    finally:
        torch.set_num_threads(threads)
    out["seconds"] = round(time.time() - t0, 1)
    return out


@torch.no_grad()
def vae_sharpness_ratio(vae, images: torch.Tensor) -> float:
    """Sharpness of the VAE's reconstructions over the images' own: no sample decoded by this VAE is likely
    to be sharper, so it caps every model's (and the gate's) sharpness ratio."""
    from .evaluator import sharpness

    x = images.to(vae.device) * 2 - 1
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return sharpness((rec.cpu() + 1) / 2) / sharpness(images)


def ceiling(backend, evaluator, s, sample_steps: int, prompts: int, seeds: int, more: tuple[int, ...] = ()) -> dict:
    """The gate's part 1 for a turbo equal to `backend`'s model at `sample_steps` (module docstring); with
    `more`, also against each of those many-step budgets (`vs_<N>_steps`: would a teacher sampled with more
    steps, the distillation's `teacher_steps`, give a turbo room to clear the bar?)."""
    from .curved import OpenScorer, prompt_set
    from .gate import EVAL_SEED, curved_scores, gate_ceiling
    from .toybase import _extra

    extra = _extra(s) if getattr(s, "world", "base") == "curved" else (4,)  # base world: all six stated
    score = curved_scores(backend, evaluator, s, OpenScorer(evaluator, prompt_set(prompts, EVAL_SEED, extra=extra),
                                                            per_prompt=seeds))
    four, many = score(s.turbo_steps), score(sample_steps)
    keep = ("acc_mean", "fd", "sharpness_ratio", "diversity_ratio")
    out = {"samples": f"{prompts} prompts x {seeds} seeds", f"{s.turbo_steps}_steps": {k: four[k] for k in keep},
           f"{sample_steps}_steps": {k: many[k] for k in keep}, **gate_ceiling(four, many)}
    for n in more:
        other = score(n)
        out[f"{n}_steps"] = {k: other[k] for k in keep}
        out[f"vs_{n}_steps"] = gate_ceiling(four, other)
    return out


def run(args) -> int:
    from .evaluator import load_evaluator
    from .toybase import settings_from_args

    result = probe(settings_from_args(args), args.steps, load_evaluator(args.evaluator), args.work,
                   count=args.count, sample_steps=args.sample_steps, ceiling_prompts=args.ceiling_prompts,
                   ceiling_seeds=args.ceiling_seeds,
                   ceiling_more=tuple(int(n) for n in args.ceiling_more.split(",") if n))
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0
