"""What makes a raw sample usable, judged in one place for the folder dataset (folder.py), make-shards (shards.py)
and the shard reader (wds_source.py); and the batch they all make of usable samples (`collate`).

`check_sample` decides, in this order: caption variants present and parseable, the image decodes in full, the
references (see references.py) run 0..n-1, decode and pass the pipeline's checks. A sample that fails raises
`BadSample`, whose `kind` is the counter it is skipped under (stable names, in logs and `skipped`):
"missing_caption", "bad_caption", "bad_image", "bad_reference"; and, found before the check by the source's own
reading, "missing_image" (no image member or path) and "bad_record" (a manifest line that is not a JSON object).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from .images import IMAGE_EXTS, decode_image
from .references import load_reference, stack_slots
from .shard_format import sample_captions


class BadSample(Exception):
    """A sample that cannot be trained on; `kind` names its counter, the message says why."""

    def __init__(self, kind: str, why: str):
        super().__init__(why)
        self.kind = kind


@dataclass
class Sample:
    image: Image.Image  # decoded in full, as stored
    captions: list[str]
    references: tuple[Image.Image, ...] = ()  # prepared as the pipeline does, in index order
    reference_sources: tuple = ()  # what they were read from (bytes or paths)


# ---------------------------------------------------------------------------------------------------
# Captions

def read_captions(path: Path) -> list[str]:
    """Caption variants from a .txt (one per non-empty line) or .json (list or mapping of strings)."""
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        values = list(data.values()) if isinstance(data, dict) else data
        if not isinstance(values, list):
            raise ValueError("caption JSON must be a list or a mapping of strings")
        variants = [v.strip() for v in values if isinstance(v, str) and v.strip()]
    else:
        variants = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not variants:
        raise ValueError("caption file holds no prompt")
    return variants


def folder_captions(image: Path) -> list[str]:
    """Caption variants of a folder image, from NAME.txt or else NAME.json beside it."""
    caption = next((c for c in (image.with_suffix(".txt"), image.with_suffix(".json")) if c.exists()), None)
    if caption is None:
        raise BadSample("missing_caption", "no .txt or .json caption beside it")
    try:
        return read_captions(caption)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadSample("bad_caption", f"{caption.name}: {e}") from None


def shard_captions(raw: dict) -> list[str]:
    """Caption variants of a raw shard sample (see shard_format.sample_captions)."""
    try:
        captions = sample_captions(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadSample("bad_caption", f"{type(e).__name__}: {e}") from None
    if not captions:
        raise BadSample("missing_caption", "no caption (json captions/caption or txt)")
    return captions


def image_member(raw: dict) -> str:
    """The extension of a raw shard sample's image member: the first of IMAGE_EXTS it holds."""
    ext = next((e for e in IMAGE_EXTS if raw.get(e) is not None), None)
    if ext is None:
        raise BadSample("missing_image", f"no {'/'.join(IMAGE_EXTS)} member")
    return ext


# ---------------------------------------------------------------------------------------------------
# The check

def check_sample(image: bytes | Path, captions: Callable[[], list[str]],
                 references: Callable[[], list] = list) -> Sample:
    """The sample, or BadSample. Each part is read when its turn comes: `captions()` (raises BadSample), then the
    image (bytes or a file) is decoded, then `references()` gives the reference sources in index order (a
    ValueError for a gap) and each is decoded and prepared."""
    variants = captions()
    try:
        decoded = decode_image(image)
    except Exception as e:  # PIL raises many types for bad bytes
        raise BadSample("bad_image", f"{type(e).__name__}: {e}") from None
    try:
        sources = tuple(references())
    except Exception as e:
        raise BadSample("bad_reference", f"{type(e).__name__}: {e}") from None
    prepared = []
    for slot, source in enumerate(sources):
        try:
            prepared.append(load_reference(source))
        except Exception as e:  # PIL raises many types for bad bytes; the pipeline's checks raise ValueError
            raise BadSample("bad_reference", f"reference {slot}: {type(e).__name__}: {e}") from None
    return Sample(decoded, variants, tuple(prepared), sources)


# ---------------------------------------------------------------------------------------------------
# Batches

def collate(samples: list[dict]) -> dict:
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "prompt": [s["prompt"] for s in samples],
        "key": [s["key"] for s in samples],
    }
    if any(s.get("references") for s in samples):  # one (B, 3, H_i, W_i) tensor per reference slot
        batch["references"] = stack_slots([s.get("references", []) for s in samples])
    return batch
