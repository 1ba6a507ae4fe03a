"""Small procedurally drawn image-caption folders, for the quickstart and the tests.

The concept "[V]" is a striped ball; each image varies its position, size, colours and background.
"""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

BACKGROUNDS = {"blue": (40, 70, 170), "green": (40, 140, 60), "grey": (120, 120, 120), "yellow": (210, 190, 60)}
STRIPES = {"red": (200, 40, 40), "orange": (230, 130, 30), "purple": (130, 50, 160)}


def draw_concept(rng: random.Random, size: int) -> tuple[Image.Image, str, str]:
    bg_name, bg = rng.choice(sorted(BACKGROUNDS.items()))
    st_name, st = rng.choice(sorted(STRIPES.items()))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(245, 245, 245))
    for y in range(cy - r, cy + r, max(2, r // 3)):  # horizontal stripes clipped to the disc
        half = int(max(0, r * r - (y - cy) ** 2) ** 0.5)
        draw.rectangle((cx - half, y, cx + half, y + max(1, r // 6)), fill=st)
    return img, bg_name, st_name


def write_concept_folder(out_dir: str | Path, count: int = 4, size: int = 64, seed: int = 0) -> Path:
    """`count` PNGs with .txt captions holding three prompt variants each (with the [V] placeholder)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        img, bg, stripe = draw_concept(rng, size)
        img.save(out / f"{i:03d}.png")
        (out / f"{i:03d}.txt").write_text(
            f"a photo of [V] ball\n"
            f"a [V] ball with {stripe} stripes on a {bg} background\n"
            f"a close-up picture of a [V] ball, white with {stripe} stripes, in front of a plain {bg} wall\n")
    return out
