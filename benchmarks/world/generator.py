"""A miniature procedurally generated image-text world (issue 8, part 1).

Each image shows one shape on a flat background. Its attributes are

    shape       circle | square | triangle | cross
    color       red | green | blue | yellow | magenta | cyan
    size        small | large
    position    left | right | top | bottom | center
    background  black | white | gray
    texture     plain | striped | dotted          (the base world)
                checkered                         (held out: the "new concept", captioned as "[V]")

and every caption states all six (`captions(..., stated=...)` states fewer: the curved world, `curved.py`,
whose captions leave attributes open). Everything is a pure function of a seed: `sample_attributes` draws
attributes (and a small placement jitter) from a `random.Random`, `render` turns attributes into a uint8
(H, W, 3) array with numpy only (shapes are drawn at 4x resolution and box-downsampled, so edges are
anti-aliased but bit-exact across platforms), and `captions` gives a few phrasings.

`write_world_folder` writes the project's image-folder format (NAME.png + NAME.txt, one prompt variant per
line). `write_concept_folder` writes a few images of the held-out concept with "[V]" in place of the
texture's name, for tuning experiments; the base world never contains the concept texture, and
`HeldOut` can also keep a combination of attributes (e.g. blue triangles) out of it.
"""
from __future__ import annotations

import functools
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {  # saturated, mutually distant in RGB, and distinct from every background
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 60, 230),
    "yellow": (235, 215, 20),
    "magenta": (215, 40, 200),
    "cyan": (30, 200, 215),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = {"black": (15, 15, 15), "white": (240, 240, 240), "gray": (128, 128, 128)}
BASE_TEXTURES = ("plain", "striped", "dotted")
CONCEPT_TEXTURE = "checkered"
TEXTURES = BASE_TEXTURES + (CONCEPT_TEXTURE,)  # everything the evaluator knows

# attribute name -> its values, in a fixed order (the evaluator's class indices)
VOCAB: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": SIZES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
    "texture": TEXTURES,
}
ATTRIBUTES = tuple(VOCAB)
PLACEHOLDER = "[V]"

_SS = 4  # supersampling factor
_HALF_EXTENT = {"small": 0.16, "large": 0.27}  # shape half-extent as a fraction of the image side
_CENTERS = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7),
            "center": (0.5, 0.5)}  # (x, y) as fractions
_JITTER = 1 / 16  # max placement jitter, fraction of the side
_TEXTURE_PERIOD = 4  # pixels at output resolution (scaled with size / 32)
_TEXTURE_DARKEN = 0.4  # texture marks are the shape colour times this


@dataclass(frozen=True)
class Attributes:
    shape: str
    color: str
    size: str
    position: str
    background: str
    texture: str
    dx: float = 0.0  # placement jitter in [-1, 1] (times _JITTER of the side); not part of the caption
    dy: float = 0.0

    def __post_init__(self):
        for name, values in VOCAB.items():
            if getattr(self, name) not in values:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {values}")

    def labels(self) -> dict[str, str]:
        """The captioned attributes (no jitter)."""
        return {name: getattr(self, name) for name in ATTRIBUTES}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class HeldOut:
    """What the base world never shows: the concept texture, and optionally attribute combinations.

    `combinations` is a list of partial attribute mappings; an image matching every entry of any one of
    them is held out, e.g. [{"shape": "triangle", "color": "blue"}]."""
    texture: str = CONCEPT_TEXTURE
    combinations: tuple[Mapping[str, str], ...] = ()

    def contains(self, attrs: Attributes) -> bool:
        if attrs.texture == self.texture:
            return True
        return any(all(getattr(attrs, k) == v for k, v in combo.items()) for combo in self.combinations)


DEFAULT_HELD_OUT = HeldOut()


def _matches(attrs: Attributes, only: Mapping[str, str | Iterable[str]] | None) -> bool:
    if not only:
        return True
    for k, v in only.items():
        allowed = (v,) if isinstance(v, str) else tuple(v)
        if getattr(attrs, k) not in allowed:
            return False
    return True


def sample_attributes(rng: random.Random, only: Mapping[str, str | Iterable[str]] | None = None,
                      held_out: HeldOut | None = DEFAULT_HELD_OUT, textures: Iterable[str] | None = None,
                      max_tries: int = 10_000) -> Attributes:
    """One draw of attributes, uniform over the allowed values.

    `only` fixes or restricts attributes ({"shape": "circle"} or {"color": ["red", "blue"]});
    `held_out` draws are rejected (None allows everything); `textures` defaults to the base textures."""
    tex = tuple(textures) if textures is not None else BASE_TEXTURES
    for _ in range(max_tries):
        values = {}
        for name, vocab in VOCAB.items():
            choices = tex if name == "texture" else vocab
            if only and name in only:
                allowed = (only[name],) if isinstance(only[name], str) else tuple(only[name])
                choices = tuple(c for c in choices if c in allowed) or tuple(allowed)
            values[name] = rng.choice(choices)
        values["dx"] = round(rng.uniform(-1, 1), 4)
        values["dy"] = round(rng.uniform(-1, 1), 4)
        attrs = Attributes(**values)
        if (held_out is None or not held_out.contains(attrs)) and _matches(attrs, only):
            return attrs
    raise ValueError(f"no attributes satisfy only={only} outside held_out={held_out}")


# ---------------------------------------------------------------------------------------------- rendering

def _shape_mask(shape: str, cx: float, cy: float, r: float, n: int) -> np.ndarray:
    """Boolean (n, n) mask at supersampled resolution; cx, cy, r in supersampled pixels."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = r * 0.85  # equal-ish area to the circle
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "cross":
        w = r * 0.36
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    if shape == "triangle":  # apex up, base at cy + r*0.8
        top, bottom = cy - r, cy + r * 0.8
        t = (dy + cy - top) / (bottom - top)  # 0 at apex, 1 at base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    raise ValueError(shape)


def _texture_mask(texture: str, size: int) -> np.ndarray:
    """Boolean (size, size) mask of texture marks at output resolution (darkened parts of the shape)."""
    p = max(2, round(_TEXTURE_PERIOD * size / 32))
    yy, xx = np.mgrid[0:size, 0:size]
    if texture == "plain":
        return np.zeros((size, size), bool)
    if texture == "striped":  # horizontal bands, half the period thick
        return (yy % p) < p // 2
    if texture == "dotted":  # one small square dot per period cell
        d = max(1, p // 2)
        return ((yy % p) < d) & ((xx % p) < d)
    if texture == "checkered":
        h = max(1, p // 2)
        return ((yy // h) + (xx // h)) % 2 == 0
    raise ValueError(texture)


def _tile_mask(tile: np.ndarray, size: int) -> np.ndarray:
    """Boolean (size, size) mask repeating `tile`, which is given in the pixels of a 32-pixel image (scaled up
    for larger images) and anchored at the image's corner."""
    scale = max(1, round(size / 32))
    cell = np.kron(tile.astype(bool), np.ones((scale, scale), bool)) if scale > 1 else tile.astype(bool)
    reps = -(-size // min(cell.shape))
    return np.tile(cell, (reps, reps))[:size, :size]


@functools.lru_cache(maxsize=None)
def _named_tiles(period: int = _TEXTURE_PERIOD) -> frozenset[bytes]:
    """Every cyclic shift (and inverse) of the named textures' tiles at `period` (a multiple of theirs): what
    an unnamed tile must not be."""
    out = set()
    for texture in TEXTURES:
        tile = _texture_mask(texture, 32)[:period, :period]
        for dy in range(period):
            for dx in range(period):
                t = np.roll(tile, (dy, dx), axis=(0, 1))
                out.update({t.tobytes(), (~t).tobytes()})
    return frozenset(out)


# Unnamed texture families as (period, cell) in pixels: 4-pixel tiles of single pixels (the named textures'
# period: every DiT token sees a whole tile; what the shipped toy base was pretrained on) and 8-pixel tiles
# of 2x2-pixel cells (the named textures' mark size, which the VAE resolves better). Both hold 2^16 tiles.
UNNAMED_FAMILIES = {"4x1": (4, 1), "8x2": (8, 2)}


def random_tile(rng: random.Random, period: int = _TEXTURE_PERIOD, cell: int = 1) -> np.ndarray:
    """A random `period` x `period` binary texture tile of `cell` x `cell` blocks that is none of the named
    textures (the held-out concept included) under any shift or inversion, with 1/4..3/4 of its cells marked."""
    named = _named_tiles(period)
    n = period // cell
    while True:
        bits = np.array([rng.random() < 0.5 for _ in range(n * n)]).reshape(n, n)
        tile = np.kron(bits, np.ones((cell, cell), bool))
        if n * n // 4 <= bits.sum() <= 3 * n * n // 4 and tile.tobytes() not in named:
            return tile


def render(attrs: Attributes, size: int = 32, tile: np.ndarray | None = None) -> np.ndarray:
    """uint8 (size, size, 3) image of `attrs`; with `tile`, that unnamed texture replaces `attrs.texture`."""
    n = size * _SS
    fx, fy = _CENTERS[attrs.position]
    cx = (fx + attrs.dx * _JITTER) * n
    cy = (fy + attrs.dy * _JITTER) * n
    r = _HALF_EXTENT[attrs.size] * n
    cover = _shape_mask(attrs.shape, cx, cy, r, n).reshape(size, _SS, size, _SS).mean(axis=(1, 3))
    fg = np.asarray(COLORS[attrs.color], np.float64)
    dark = fg * _TEXTURE_DARKEN
    marks = _texture_mask(attrs.texture, size) if tile is None else _tile_mask(tile, size)
    shape_rgb = np.where(marks[..., None], dark, fg)
    bg = np.asarray(BACKGROUNDS[attrs.background], np.float64)
    img = bg + cover[..., None] * (shape_rgb - bg)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- captions

_TEXTURE_ADJ = {"plain": "plain", "striped": "striped", "dotted": "dotted", "checkered": "checkered"}
_TEXTURE_WITH = {"plain": "a solid fill", "striped": "stripes", "dotted": "dots", "checkered": "a checker pattern"}
_POSITION_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "center": "in the center"}


def captions(attrs: Attributes, concept: str | None = None, stated: Iterable[str] | None = None) -> list[str]:
    """A few phrasings that each state all six attributes. With `concept` (e.g. "[V]"), the texture is named
    only by that token: "a large red [V] circle ...". With `stated` (attribute names; the curved world), each
    phrasing states those attributes and no others ("a red circle"; an unstated shape is "a shape")."""
    a = attrs
    said = set(ATTRIBUTES if stated is None else stated)
    if not said <= set(ATTRIBUTES):
        raise ValueError(f"stated={sorted(said)}: unknown attributes (known: {ATTRIBUTES})")
    if concept is not None and "texture" not in said:
        raise ValueError(f"concept={concept!r} names the texture, but stated={sorted(said)} leaves it open")
    if concept is not None:
        tex_adj, tex_with = concept, f"the {concept} pattern"
    else:
        tex_adj, tex_with = _TEXTURE_ADJ[a.texture], _TEXTURE_WITH[a.texture]
    # each part is "" when its attribute is open; `_join` drops the empty ones (with all six: the full captions)
    size, color = (a.size if "size" in said else ""), (a.color if "color" in said else "")
    shape = a.shape if "shape" in said else "shape"
    tex_adj, tex_with = (tex_adj, f"with {tex_with}") if "texture" in said else ("", "")
    pos = _POSITION_PHRASE[a.position] if "position" in said else ""
    bg = a.background if "background" in said else ""
    return [
        _join(" ", "a", size, color, tex_adj, shape, pos, bg and f"on a {bg} background"),
        _join(", ", bg and f"{bg} background", _join(" ", size, tex_adj, color, shape), pos),
        _join(", ", _join(" ", "a picture of a", color, shape, tex_with), size, pos,
              bg and f"over a flat {bg} backdrop"),
    ]


def _join(sep: str, *parts: str) -> str:
    return sep.join(p for p in parts if p)


_WORDS = {  # caption word -> (attribute, value)
    **{v: ("shape", v) for v in SHAPES},
    **{v: ("color", v) for v in COLORS},
    **{v: ("size", v) for v in SIZES},
    **{v: ("position", v) for v in POSITIONS},
    **{v: ("background", v) for v in BACKGROUNDS},
    **{v: ("texture", v) for v in TEXTURES},
    "solid": ("texture", "plain"), "stripes": ("texture", "striped"), "dots": ("texture", "dotted"),
    "checker": ("texture", "checkered"),
}


def parse_caption(caption: str, concept: str | None = PLACEHOLDER,
                  concept_texture: str = CONCEPT_TEXTURE) -> dict[str, str]:
    """The attributes a caption states (a partial mapping when it states fewer). A word before "background"
    or "backdrop" is the background; `concept` in the caption means `concept_texture`."""
    out: dict[str, str] = {}
    text = caption.lower()
    if concept is not None and concept.lower() in text:
        out["texture"] = concept_texture
        text = text.replace(concept.lower(), " ")
    m = re.search(r"\b(\w+)\s+(?:background|backdrop)\b", text)
    if m and m.group(1) in BACKGROUNDS:
        out["background"] = m.group(1)
        text = text[:m.start()] + " " + text[m.end():]
    for word in re.findall(r"[a-z]+", text):
        if word in _WORDS:
            name, value = _WORDS[word]
            out.setdefault(name, value)
    return out


# -------------------------------------------------------------------------------------------------- sets

def sample_world(count: int, seed: int, size: int = 32, only: Mapping | None = None,
                 held_out: HeldOut | None = DEFAULT_HELD_OUT, textures: Iterable[str] | None = None
                 ) -> tuple[np.ndarray, list[Attributes]]:
    """`count` images (uint8 (count, size, size, 3)) and their attributes; a pure function of its arguments."""
    rng = random.Random(f"dopsd-world:{seed}")
    attrs = [sample_attributes(rng, only=only, held_out=held_out, textures=textures) for _ in range(count)]
    images = np.stack([render(a, size) for a in attrs]) if attrs else np.zeros((0, size, size, 3), np.uint8)
    return images, attrs


def sample_unnamed_textures(count: int, seed: int, size: int = 32, families: Iterable[str] = ("4x1",)
                            ) -> tuple[np.ndarray, list[Attributes]]:
    """Images whose texture is a random unnamed tile (`random_tile`, of the `UNNAMED_FAMILIES` named, in
    turn); their attributes say "plain" for the texture, which their captions must therefore not state. A base
    model shown these with the image as context is to learn to copy a texture it has no word for -- the
    in-context skill D-OPSD's teacher relies on -- without ever seeing the held-out concept."""
    shapes = [UNNAMED_FAMILIES[f] for f in families]
    rng = random.Random(f"dopsd-unnamed:{seed}")
    attrs = [sample_attributes(rng, textures=("plain",)) for _ in range(count)]
    images = [render(a, size, tile=random_tile(rng, *shapes[i % len(shapes)])) for i, a in enumerate(attrs)]
    return (np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)), attrs


def _write(out: Path, images: np.ndarray, attrs: list[Attributes], concept: str | None,
           stated: list[Iterable[str]] | None = None) -> Path:
    """NAME.png + NAME.txt pairs; `stated[i]` (the curved world) limits what image i's captions state."""
    out.mkdir(parents=True, exist_ok=True)
    for i, (img, a) in enumerate(zip(images, attrs)):
        Image.fromarray(img, "RGB").save(out / f"{i:05d}.png")
        text = "\n".join(captions(a, concept, None if stated is None else stated[i])) + "\n"
        (out / f"{i:05d}.txt").write_text(text, encoding="utf-8")
    return out


def write_world_folder(out_dir: str | Path, count: int, seed: int, size: int = 32, only: Mapping | None = None,
                       held_out: HeldOut | None = DEFAULT_HELD_OUT) -> Path:
    """Base-world folder: `count` NAME.png + NAME.txt pairs (three caption variants each), none held out."""
    images, attrs = sample_world(count, seed, size, only=only, held_out=held_out)
    return _write(Path(out_dir), images, attrs, concept=None)


def write_concept_folder(out_dir: str | Path, count: int = 4, seed: int = 0, size: int = 32,
                         only: Mapping | None = None, concept_texture: str = CONCEPT_TEXTURE,
                         placeholder: str = PLACEHOLDER) -> Path:
    """A few images of the held-out concept texture, captioned with `placeholder` in place of its name."""
    images, attrs = concept_samples(count, seed, size, only=only, concept_texture=concept_texture)
    return _write(Path(out_dir), images, attrs, concept=placeholder)


def concept_samples(count: int, seed: int, size: int = 32, only: Mapping | None = None,
                    concept_texture: str = CONCEPT_TEXTURE) -> tuple[np.ndarray, list[Attributes]]:
    """Images of the concept texture (other attributes free unless `only` fixes them)."""
    rng = random.Random(f"dopsd-concept:{seed}")
    attrs = [sample_attributes(rng, only=only, held_out=None, textures=(concept_texture,)) for _ in range(count)]
    return np.stack([render(a, size) for a in attrs]), attrs


__all__ = [
    "ATTRIBUTES", "Attributes", "BACKGROUNDS", "BASE_TEXTURES", "COLORS", "CONCEPT_TEXTURE", "DEFAULT_HELD_OUT",
    "HeldOut", "PLACEHOLDER", "POSITIONS", "SHAPES", "SIZES", "TEXTURES", "VOCAB", "captions", "concept_samples",
    "parse_caption", "random_tile", "render", "sample_attributes", "sample_unnamed_textures", "sample_world", "write_concept_folder",
    "write_world_folder",
]
