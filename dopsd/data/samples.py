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
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from .images import IMAGE_EXTS, decode_image
from .references import load_reference, stack_slots
from .sampler import sample_seed
from .shard_format import caption_variants, sample_captions


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


def with_default(captions: Callable[[], list[str]], default: str) -> Callable[[], list[str]]:
    """`captions` (the sample's own, raising BadSample) under a dataset's `caption` setting (data.caption):
    - without "{caption}" it is the default caption, used only when the sample has none of its own;
    - with "{caption}" it is a template that every own variant is put into ("a photo of [V] dog, {caption}");
      a sample without a caption is then skipped as missing_caption, as without a default."""
    if not default:
        return captions

    def resolve() -> list[str]:
        if "{caption}" in default:
            return [default.replace("{caption}", v) for v in captions()]
        try:
            return captions()
        except BadSample as e:
            if e.kind != "missing_caption":
                raise  # a caption file that exists but is broken is the user's mistake, not a missing caption
            return [default]
    return resolve


def first_captions(*sources: Callable[[], list[str]]) -> list[str]:
    """The captions of the first source that has some (the others raise BadSample "missing_caption")."""
    for source in sources[:-1]:
        try:
            return source()
        except BadSample as e:
            if e.kind != "missing_caption":
                raise
    return sources[-1]()


def crop_rng(crop: str, *names: int) -> random.Random | None:
    """data.crop: the generator of a random crop's offset for the sample named by `names` (train.seed, epoch,
    sample), None for the centre crop; a pure function of them, as caption_dropped."""
    return random.Random(sample_seed(*names, 0xC409)) if crop == "random" else None


def caption_dropped(p: float, *names: int) -> bool:
    """data.caption_dropout: whether the sample named by `names` (train.seed, epoch, sample) gets the empty
    caption this time; a pure function of them, so every rank layout and every resume drop the same samples."""
    return p > 0 and random.Random(sample_seed(*names, 0xD409)).random() < p


# Manifest lines (JSONL: one object per line; paths relative to the manifest): the fields read, in order.
IMAGE_FIELDS = ("image", "path", "file_name", "file")
CAPTION_FIELDS = ("captions", "caption", "text", "prompt")


def manifest_object(line: str, number: int) -> dict:
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise BadSample("bad_record", f"line {number}: {e}") from None
    if not isinstance(obj, dict):
        raise BadSample("bad_record", f"line {number}: not a JSON object")
    return obj


def _beside(base: Path, name: str) -> Path:
    return Path(name) if Path(name).is_absolute() else base / name


def manifest_image(obj: dict, number: int, base: Path) -> Path:
    image = next((obj[k] for k in IMAGE_FIELDS if isinstance(obj.get(k), str)), None)
    if image is None:
        raise BadSample("missing_image", f"line {number}: no image path ({'/'.join(IMAGE_FIELDS)})")
    return _beside(base, image)


def manifest_captions(obj: dict, number: int) -> list[str]:
    try:
        captions = next((v for v in (caption_variants(obj[k]) for k in CAPTION_FIELDS if obj.get(k) is not None)
                         if v), [])
    except ValueError as e:
        raise BadSample("bad_caption", f"line {number}: {e}") from None
    if not captions:
        raise BadSample("missing_caption", f"line {number}: no caption ({'/'.join(CAPTION_FIELDS)})")
    return captions


def manifest_references(obj: dict, number: int, base: Path) -> list[Path]:
    refs = obj.get("references") or []
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise BadSample("bad_reference", f"line {number}: references must be a list of paths")
    return [_beside(base, r) for r in refs]


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


# ---------------------------------------------------------------------------------------------------
# Descriptions (`describe()` of every source; the shape is in dopsd/data/__init__.py)

def description(datasets: list[dict], steps_per_epoch: int) -> dict:
    """The whole data set from its datasets' entries: their totals, and the entries themselves."""
    skipped: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    for d in datasets:
        skipped.update(d["skipped"])
        buckets.update(d["buckets"])
    return {"samples": sum(d["samples"] for d in datasets), "steps_per_epoch": steps_per_epoch,
            "skipped": dict(skipped), "buckets": dict(buckets),
            "bad_files": [f for d in datasets for f in d["bad_files"]], "datasets": datasets}
