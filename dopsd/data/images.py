"""Image files and pixels, for every data module: the image extensions, full decoding, the recipe's resize and
centre crop, and the conversion to the (3, H, W) tensors in [0, 1] that batches carry. Imports no data module."""
from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Extensions of image files (folder, manifest) and image members (shards); a shard sample whose members include
# several takes the first of these as its image.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower()[1:] in IMAGE_EXTS


def decode_image(source: bytes | str | Path) -> Image.Image:
    """Open and decode in full (a truncated file passes a header check and fails later otherwise). A file is
    closed before this returns (PIL's errors name it)."""
    if isinstance(source, bytes):
        image = Image.open(io.BytesIO(source))
        image.load()
        return image
    with Image.open(source) as image:
        image.load()
        return image.copy()  # closing destroys the image itself


def resize_center_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """Bicubic resize so the image covers (height, width), then centre-crop (the recipe's bucketing step)."""
    return resize_crop(img, height, width)


def resize_crop(img: Image.Image, height: int, width: int, rng: random.Random | None = None) -> Image.Image:
    """Bicubic resize so the image covers (height, width), then crop: centred, or (data.crop: random) at an
    offset drawn from `rng`, which the caller seeds per (seed, epoch, sample) so every rank and a resume agree."""
    img = img.convert("RGB")
    scale = max(height / img.height, width / img.width)
    new_w, new_h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    img = img.resize((new_w, new_h), Image.BICUBIC)
    if rng is None:
        left, top = (new_w - width) // 2, (new_h - height) // 2
    else:
        left, top = rng.randint(0, new_w - width), rng.randint(0, new_h - height)
    return img.crop((left, top, left + width, top + height))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
