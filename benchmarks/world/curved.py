"""The curved world (issue 22): the base world's images, with captions that leave attributes open.

Every caption names the shape and the colour, and `extra` (0, 1 or 2 by default, uniformly) of the other four
attributes (size, position, background, texture); the attributes it leaves open are drawn at random, as in the
base world. A prompt such as "a red circle" therefore stands for up to 2 x 5 x 3 x 3 = 90 images that differ in
layout, so the flow from noise to image is curved: a few Euler steps of a many-step model land between modes
(blur), which only a step-distilled model avoids -- the few-step skill the base world, whose captions state all
six attributes, cannot show. The images are exactly `sample_world`'s for the same seed (only the captions
differ), so the shipped evaluator CNN, which reads all six attributes off an image, still applies; the
held-out `[V]` concept (the checkered texture) stays held out, and `[V]` captions state the texture as `[V]`.

Scoring for open attributes (`OpenScorer`), on a `PromptSet` sampled `per_prompt` times (noise seeds):

- `acc_<attribute>`, `acc_mean`: accuracy on what each prompt *states*, nothing else (an open attribute has
  no right answer);
- `div_<attribute>`, `div_mean`: the spread of each open attribute among one prompt's samples -- the
  normalised entropy (entropy / log of the attribute's vocabulary size) of the evaluator's readings, averaged
  over prompts -- and `diversity_ratio`: `div_mean` over that of real samples of the same prompts, read the
  same way with the same count per prompt (1 = as varied as the world; a collapsed model is << 1);
- `fd`: Fréchet distance of the evaluator's features to real samples *of the same prompts*;
- `sharpness_ratio`: sharpness (mean squared Laplacian) over that of those real samples (< 1 blur);
- `concept_share`: how often the `[V]` texture is drawn where a prompt leaves the texture open (leakage of a
  tuned concept onto old prompts; ~0 for the world itself, which never shows it there).
"""
from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from .generator import (ATTRIBUTES, CONCEPT_TEXTURE, DEFAULT_HELD_OUT, PLACEHOLDER, VOCAB, Attributes, _write,
                        captions, concept_samples, render, sample_attributes, sample_world)

ALWAYS = ("shape", "color")  # what every curved-world caption states
EXTRA = (0, 1, 2)            # how many more attributes it states, drawn uniformly
CONCEPT_EXTRA = (0, 1)       # the same for `[V]` captions, which state the texture too


def concept_extra(extra: Sequence[int]) -> tuple[int, ...]:
    """`[V]` captions' extras for a world whose captions state `extra` attributes beyond shape and colour:
    they state the texture too, so the same without the largest (at least 0); `EXTRA` gives `CONCEPT_EXTRA`."""
    return tuple(k for k in extra if k < max(extra)) or (0,)


def draw_stated(rng: random.Random, extra: Iterable[int] = EXTRA, always: Sequence[str] = ALWAYS) -> tuple[str, ...]:
    """The attributes one caption states: `always`, plus a random `k` (drawn from `extra`) of the others."""
    rest = [a for a in ATTRIBUTES if a not in always]
    more = set(rng.sample(rest, rng.choice(tuple(extra))))
    return tuple(a for a in ATTRIBUTES if a in always or a in more)


def sample_curved_world(count: int, seed: int, size: int = 32, extra: Iterable[int] = EXTRA,
                        held_out=DEFAULT_HELD_OUT) -> tuple[np.ndarray, list[Attributes], list[tuple[str, ...]]]:
    """`sample_world`'s images and attributes for `seed`, and what each one's captions state."""
    images, attrs = sample_world(count, seed, size, held_out=held_out)
    rng = random.Random(f"dopsd-curved:{seed}")
    return images, attrs, [draw_stated(rng, extra) for _ in attrs]


def curved_concept_samples(count: int, seed: int, size: int = 32, extra: Iterable[int] = CONCEPT_EXTRA
                           ) -> tuple[np.ndarray, list[Attributes], list[tuple[str, ...]]]:
    """`concept_samples`' images of the `[V]` texture, and what their captions state (always the texture)."""
    images, attrs = concept_samples(count, seed, size)
    rng = random.Random(f"dopsd-curved-concept:{seed}")
    return images, attrs, [draw_stated(rng, extra, ALWAYS + ("texture",)) for _ in attrs]


def write_curved_world_folder(out_dir: str | Path, count: int, seed: int, size: int = 32,
                              extra: Iterable[int] = EXTRA) -> Path:
    """A curved-world image folder (NAME.png + NAME.txt, three phrasings of what the caption states)."""
    images, attrs, stated = sample_curved_world(count, seed, size, extra)
    return _write(Path(out_dir), images, attrs, concept=None, stated=stated)


def write_curved_concept_folder(out_dir: str | Path, count: int = 4, seed: int = 0, size: int = 32,
                                extra: Iterable[int] = CONCEPT_EXTRA, placeholder: str = PLACEHOLDER) -> Path:
    """A few images of the held-out concept, captioned with `placeholder` and some of their other attributes."""
    images, attrs, stated = curved_concept_samples(count, seed, size, extra)
    return _write(Path(out_dir), images, attrs, concept=placeholder, stated=stated)


# ------------------------------------------------------------------------------------------------- prompts

@dataclass(frozen=True)
class PromptSet:
    """Prompts (the attributes each states) and one caption for each."""
    prompts: tuple[dict[str, str], ...]
    texts: tuple[str, ...]


def prompt_set(count: int, seed: int, concept: bool = False, extra: Iterable[int] | None = None) -> PromptSet:
    """`count` curved-world prompts (held-out `[V]` prompts with `concept`), captions in turn of the three
    phrasings."""
    if concept:
        _, attrs, stated = curved_concept_samples(count, seed, extra=CONCEPT_EXTRA if extra is None else extra)
    else:
        _, attrs, stated = sample_curved_world(count, seed, extra=EXTRA if extra is None else extra)
    texts = [captions(a, PLACEHOLDER if concept else None, st)[i % 3] for i, (a, st) in enumerate(zip(attrs, stated))]
    return PromptSet(tuple({k: getattr(a, k) for k in st} for a, st in zip(attrs, stated)), tuple(texts))


def real_samples(prompt: Mapping[str, str], count: int, seed: int, size: int = 32
                 ) -> tuple[np.ndarray, list[Attributes]]:
    """`count` world images that fit `prompt` (its open attributes drawn as the world draws them)."""
    held_out = None if prompt.get("texture") == CONCEPT_TEXTURE else DEFAULT_HELD_OUT
    rng = random.Random(f"dopsd-curved-real:{seed}:{sorted(prompt.items())}")
    attrs = [sample_attributes(rng, only=prompt, held_out=held_out) for _ in range(count)]
    return np.stack([render(a, size) for a in attrs]), attrs


# ------------------------------------------------------------------------------------------------- scoring

def open_diversity(readings: Sequence[Mapping[str, str]], prompts: Sequence[Mapping[str, str]],
                   per_prompt: int) -> dict[str, float]:
    """`div_<attribute>` and `div_mean`: normalised entropy of the readings of each attribute a prompt leaves
    open, among that prompt's `per_prompt` consecutive samples, averaged over prompts (and attributes)."""
    if len(readings) != len(prompts) * per_prompt:
        raise ValueError(f"{len(readings)} images for {len(prompts)} prompts x {per_prompt} samples")
    spread: dict[str, list[float]] = {k: [] for k in ATTRIBUTES}
    for i, prompt in enumerate(prompts):
        group = readings[i * per_prompt:(i + 1) * per_prompt]
        for k in ATTRIBUTES:
            if k not in prompt:
                counts = np.array(list(Counter(r[k] for r in group).values()), np.float64)
                p = counts / counts.sum()
                spread[k].append(float(-(p * np.log(p)).sum() / math.log(len(VOCAB[k]))))
    out = {f"div_{k}": float(np.mean(v)) for k, v in spread.items() if v}
    out["div_mean"] = float(np.mean(list(out.values()))) if out else float("nan")
    return out


class OpenScorer:
    """Scores `per_prompt` samples of each prompt of `prompts` (prompt-major order: `texts()` and `seeds()`
    say what to sample) against real samples of the same prompts; see the module docstring."""

    def __init__(self, evaluator, prompts: PromptSet, per_prompt: int = 8, reference_per_prompt: int = 32,
                 seed: int = 0):
        from .evaluator import sharpness

        self.evaluator, self.prompts, self.per_prompt = evaluator, prompts, per_prompt
        self.size = evaluator.cfg.size
        reference = np.concatenate([real_samples(p, reference_per_prompt, seed, self.size)[0]
                                    for p in prompts.prompts])
        self.reference = evaluator.feature_stats(reference)
        self.reference_sharpness = sharpness(reference)
        # the diversity real samples reach with as few per prompt (entropy from few samples is biased low)
        real = self.real_images(seed + 1)
        self.real_diversity = open_diversity(evaluator.predict(real), prompts.prompts, per_prompt)["div_mean"]

    def targets(self) -> list[dict[str, str]]:
        return [p for p in self.prompts.prompts for _ in range(self.per_prompt)]

    def texts(self) -> list[str]:
        return [t for t in self.prompts.texts for _ in range(self.per_prompt)]

    def seeds(self) -> list[int]:
        return list(range(len(self.prompts.texts) * self.per_prompt))

    def real_images(self, seed: int) -> np.ndarray:
        """`per_prompt` real samples of each prompt, in scoring order (a `seed` other than the reference's)."""
        return np.concatenate([real_samples(p, self.per_prompt, seed, self.size)[0] for p in self.prompts.prompts])

    def score(self, images) -> dict[str, float]:
        from .evaluator import frechet_distance, sharpness

        ev, targets = self.evaluator, self.targets()
        out = {f"acc_{k}": v for k, v in ev.attribute_accuracy(images, targets).items()}
        readings = ev.predict(images)
        out.update(open_diversity(readings, self.prompts.prompts, self.per_prompt))
        out["diversity_ratio"] = out["div_mean"] / self.real_diversity
        out["fd"] = frechet_distance(*ev.feature_stats(images), *self.reference)
        out["sharpness_ratio"] = sharpness(images) / self.reference_sharpness
        open_texture = [r["texture"] == CONCEPT_TEXTURE for r, t in zip(readings, targets) if "texture" not in t]
        out["concept_share"] = float(np.mean(open_texture)) if open_texture else float("nan")
        return out


__all__ = ["ALWAYS", "CONCEPT_EXTRA", "EXTRA", "OpenScorer", "PromptSet", "concept_extra", "curved_concept_samples", "draw_stated",
           "open_diversity", "prompt_set", "real_samples", "sample_curved_world", "write_curved_concept_folder",
           "write_curved_world_folder"]
