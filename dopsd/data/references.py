"""Reference images of editing samples (the FLUX.2-klein editing task): names, checks and preprocessing.

An editing sample is a target image, its caption (the edit instruction) and reference images 0..n-1 (the
inputs the instruction edits; reference i is the pipeline's `image[i]`). Where they live:
  folder     NAME.png + NAME.txt|json + NAME.ref0.png, NAME.ref1.jpg, ...  (any of png, jpg, jpeg, webp)
  shards     KEY.png + KEY.txt|json + KEY.ref0.png, KEY.ref1.png, ...      (tar members; WebDataset ext "ref0.png")
  manifest   {"image": ..., "captions": ..., "references": [path, ...]}      (input of make-shards)
Indices run from 0 without gaps. A sample whose reference is missing from the sequence, undecodable or refused
by the pipeline is skipped and counted as "bad_reference": an instruction without its input teaches nothing.

Preprocessing is `Flux2KleinPipeline(image=[...])`'s, through its own image-processor helpers: a reference
under 64 px a side or with an aspect ratio above 8 is refused, one above 1 MP is resized to 1 MP (Lanczos),
then both sides are floored to multiples of 16 (the real klein's VAE factor 8 x the 2x2 patchify, and a multiple
of every klein's unit) by a centre crop. References keep their own sizes (no bucket list): a batch holds samples
whose targets share a bucket and whose references have identical sizes.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from PIL import Image

from .images import IMAGE_EXTS, decode_image, to_tensor

REF_UNIT = 16
REF_MAX_AREA = 1024 * 1024

_MEMBER = re.compile(rf"^ref(\d+)\.({'|'.join(IMAGE_EXTS)})$")
_STEM = re.compile(r"^(.+)\.ref(\d+)$")


def member_slot(ext: str) -> int | None:
    """Reference index of a shard member extension ("ref0.png" -> 0), None for other members."""
    m = _MEMBER.match(ext.lower())
    return int(m.group(1)) if m else None


def member_slots(sample: dict) -> dict[int, tuple[bytes, str]]:
    """A raw shard sample's reference members by index: {i: (bytes, extension)}."""
    return {slot: (data, key.split(".", 1)[1]) for key, data in sample.items()
            if isinstance(key, str) and (slot := member_slot(key)) is not None}


def member_name(slot: int, ext: str) -> str:
    return f"ref{slot}.{ext}"


def split_stem(stem: str) -> tuple[str, int] | None:
    """("NAME", i) for a folder file stem "NAME.ref<i>", else None."""
    m = _STEM.match(stem)
    return (m.group(1), int(m.group(2))) if m else None


def folder_layout(paths: list[Path]) -> tuple[list[Path], dict[str, dict[int, list[Path]]]]:
    """Split a folder's image files into samples and references: (sample images, {sample stem: {index: files}}).
    `X.refN.<ext>` is a reference when an image with stem X exists; otherwise it is a sample of its own."""
    stems = {p.stem for p in paths}
    samples, refs = [], {}
    for path in paths:
        owner = split_stem(path.stem)
        if owner is not None and owner[0] in stems:
            refs.setdefault(owner[0], {}).setdefault(owner[1], []).append(path)
        else:
            samples.append(path)
    return samples, refs


def reference_files(slots: dict[int, list[Path]]) -> list[Path]:
    """One file per reference index, in order; ValueError on a gap or on two files for one index."""
    for files in slots.values():
        if len(files) > 1:
            raise ValueError(f"several files for one reference: {sorted(f.name for f in files)}")
    return ordered({i: files[0] for i, files in slots.items()})


def ordered(slots: dict[int, object]) -> list:
    """Values of references 0..n-1 in order; ValueError when the indices have a gap."""
    if sorted(slots) != list(range(len(slots))):
        raise ValueError(f"reference indices {sorted(slots)} do not run 0..{len(slots) - 1}")
    return [slots[i] for i in range(len(slots))]


def prepare_reference(img: Image.Image) -> Image.Image:
    """The pipeline's reference preprocessing (see the module docstring); ValueError when it refuses the image."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    Flux2ImageProcessor.check_image_input(img)
    img = Flux2ImageProcessor._resize_if_exceeds_area(img, REF_MAX_AREA).convert("RGB")
    width, height = (img.width // REF_UNIT) * REF_UNIT, (img.height // REF_UNIT) * REF_UNIT
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


def load_reference(source: bytes | str | Path) -> Image.Image:
    """Decode in full (a truncated file passes a header check and fails later otherwise) and preprocess."""
    return prepare_reference(decode_image(source))


def reference_sizes(images: list[Image.Image]) -> tuple[tuple[int, int], ...]:
    """(height, width) of each prepared reference: part of the batch bucket key."""
    return tuple((im.height, im.width) for im in images)


def reference_tensors(paths: list[str | Path]) -> list[torch.Tensor]:
    """(3, H, W) tensors in [0, 1] of reference files, preprocessed (validation and `dopsd sample` inputs)."""
    return [to_tensor(load_reference(Path(p))) for p in paths]


def stack_slots(per_sample: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per-sample reference lists -> one (B, 3, H_i, W_i) tensor per slot (what backends take)."""
    counts = {len(refs) for refs in per_sample}
    if len(counts) != 1:
        raise ValueError(f"a batch mixes samples with {sorted(counts)} references")
    return [torch.stack([refs[i] for refs in per_sample]) for i in range(counts.pop())]
