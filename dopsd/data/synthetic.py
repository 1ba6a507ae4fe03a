"""Small procedurally drawn image-caption folders, for the quickstart and the tests.

The concept "[V]" is a striped ball; each image varies its position, size, colours and background.
Editing folders (`write_edit_folder`) hold a ball as reference 0 and the same ball on another background as the
target; the instruction names the new background, or with two references points at the second one, a swatch.
"""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

BACKGROUNDS = {"blue": (40, 70, 170), "green": (40, 140, 60), "grey": (120, 120, 120), "yellow": (210, 190, 60)}
STRIPES = {"red": (200, 40, 40), "orange": (230, 130, 30), "purple": (130, 50, 160)}


def draw_ball(size: int, bg: tuple, stripe: tuple, cx: int, cy: int, r: int) -> Image.Image:
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(245, 245, 245))
    for y in range(cy - r, cy + r, max(2, r // 3)):  # horizontal stripes clipped to the disc
        half = int(max(0, r * r - (y - cy) ** 2) ** 0.5)
        draw.rectangle((cx - half, y, cx + half, y + max(1, r // 6)), fill=stripe)
    return img


def draw_concept(rng: random.Random, size: int) -> tuple[Image.Image, str, str]:
    bg_name, bg = rng.choice(sorted(BACKGROUNDS.items()))
    st_name, st = rng.choice(sorted(STRIPES.items()))
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    return draw_ball(size, bg, st, cx, cy, r), bg_name, st_name


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


def write_edit_folder(out_dir: str | Path, count: int = 4, size: int = 64, seed: int = 0,
                      references: int = 1) -> Path:
    """`count` editing samples in the folder layout: NAME.ref0.png (a [V] ball), with references=2 also
    NAME.ref1.png (a swatch of the new background colour), NAME.png (the edited result), NAME.txt (instruction
    variants). `size` >= 64: the pipeline refuses smaller references."""
    if references not in (1, 2):
        raise ValueError("references: 1 or 2")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = sorted(BACKGROUNDS)
    for i in range(count):
        bg_name = rng.choice(names)
        new_name = rng.choice([n for n in names if n != bg_name])
        st_name, st = rng.choice(sorted(STRIPES.items()))
        r = rng.randint(size // 5, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        draw_ball(size, BACKGROUNDS[bg_name], st, cx, cy, r).save(out / f"{i:03d}.ref0.png")
        draw_ball(size, BACKGROUNDS[new_name], st, cx, cy, r).save(out / f"{i:03d}.png")
        if references == 2:
            Image.new("RGB", (size, size), BACKGROUNDS[new_name]).save(out / f"{i:03d}.ref1.png")
            lines = ["paint the background of the first image in the colour of the second image",
                     f"give the [V] ball with {st_name} stripes the background colour shown in the second image"]
        else:
            lines = [f"change the background to {new_name}",
                     f"keep the [V] ball with {st_name} stripes and make the {bg_name} background {new_name}"]
        (out / f"{i:03d}.txt").write_text("\n".join(lines) + "\n")
    return out
