"""`dopsd make-shards`: write WebDataset tar shards (with optional cached encoder features) from
  - an image folder (the folder dataset's format: NAME.png|jpg|jpeg|webp beside NAME.txt or NAME.json),
  - a JSONL manifest (one {"image": path, "captions": [...] | "caption": str, "key": optional} per line; paths
    relative to the manifest), or
  - existing WebDataset / img2dataset shards (jpg|png|webp + txt + json per key).

Editing data: reference images (folder `NAME.refN.png`, manifest "references": [paths], shard members
`KEY.refN.png`; see references.py) are checked like the pipeline checks them and stored as members
`KEY.ref0.png`, `KEY.ref1.png`, ...; a sample with a bad reference is skipped ("bad_reference"). Cached features
are text-to-image only (Z-Image): --features with editing data is an error.

Output: OUT/shard-000000.tar, ... written by `webdataset.ShardWriter` (a shard closes at --samples-per-shard
samples or --shard-size-mb), each beside an index OUT/shard-000000.tar.json ({"samples", input range, skipped
inputs, backend, fingerprint, "complete": true}) that the reader uses to size epochs; OUT/dataset.json holds the
settings and totals. The sample layout is in shard_format.py.

Features (--features student|all, needs --config): the backend of the run config is loaded and its own
`encode_student` (every caption variant) and `encode_teacher` (every variant + the target image, centre-cropped
to its aspect-ratio bucket exactly as the reader does) compute them, so cached features equal live ones.

Resumable: a shard is finished once its index exists (shards are written under NAME.partial and renamed when
complete). A rerun with the same settings skips finished shards and the inputs they cover, and continues with
the next shard. Bad inputs (unreadable image, no caption, unreadable shard) are skipped with a warning and
counted; they never stop the run.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image

from .images import IMAGE_EXTS, is_image_file, resize_center_crop, to_tensor
from .references import folder_layout, member_name, member_slots, ordered, reference_files
from .samples import (CAPTION_FIELDS, IMAGE_FIELDS, BadSample, check_sample, folder_captions, image_member,
                      manifest_captions, manifest_image, manifest_object, manifest_references, shard_captions,
                      with_default)
from .shard_format import (CACHEABLE_BACKENDS, FEATURES_EXT, apply_placeholder, assign_bucket,
                           encoder_fingerprint, pack_features, resolve_buckets)

log = logging.getLogger(__name__)

PATTERN = "shard-%06d.tar"
FEATURE_MODES = ("none", "student", "all")


@dataclass
class Record:
    """One input sample; `load()` returns (image bytes, extension, caption variants, extra json fields,
    references as [(bytes, extension), ...] in index order) or raises BadSample (samples.py)."""
    index: int
    name: str
    source: str
    load: Callable[[], tuple[bytes, str, list[str], dict, list[tuple[bytes, str]]]]


def _reference_bytes(paths: list[Path]) -> list[tuple[bytes, str]]:
    try:
        return [(p.read_bytes(), p.suffix[1:].lower()) for p in paths]
    except OSError as e:
        raise BadSample("bad_reference", str(e)) from None


# ---------------------------------------------------------------------------------------------------
# Inputs

def folder_records(root: Path, caption: str = "") -> tuple[int, Iterator[Record]]:
    paths, refs = folder_layout(sorted(p for p in root.iterdir() if is_image_file(p)))

    def record(i: int, path: Path) -> Record:
        def load():
            captions = with_default(lambda: folder_captions(path), caption)()
            try:
                ref_paths = reference_files(refs.get(path.stem, {}))
            except ValueError as e:
                raise BadSample("bad_reference", str(e)) from None
            return path.read_bytes(), path.suffix[1:].lower(), captions, {}, _reference_bytes(ref_paths)
        return Record(i, path.stem, str(path), load)

    return len(paths), (record(i, p) for i, p in enumerate(paths))


def manifest_records(path: Path, caption: str = "") -> tuple[int, Iterator[Record]]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def record(i: int, line: str) -> Record:
        def load():
            obj = manifest_object(line, i + 1)
            image_path = manifest_image(obj, i + 1, path.parent)
            captions = with_default(lambda: manifest_captions(obj, i + 1), caption)()
            try:
                data = image_path.read_bytes()
            except OSError as e:
                raise BadSample("bad_image", f"{image_path}: {e}") from None
            references = _reference_bytes(manifest_references(obj, i + 1, path.parent))
            extra = {k: v for k, v in obj.items() if k not in (*IMAGE_FIELDS, *CAPTION_FIELDS, "references")}
            return data, image_path.suffix[1:].lower(), captions, extra, references

        try:
            obj = json.loads(line)
            name = str(obj.get("key") or Path(str(obj.get("image") or obj.get("path"))).stem)
        except (ValueError, AttributeError, TypeError):
            name = f"line{i + 1}"
        return Record(i, name, f"{path}:{i + 1}", load)

    return len(lines), (record(i, line) for i, line in enumerate(lines))


def shard_records(urls: list[str], on_error: Callable[[str, str, str], None]) -> Iterator[Record]:
    import tarfile

    from .shard_io import first_line, tar_samples

    current = {"url": "?"}

    def handler(exn: Exception) -> bool:
        kind = "truncated_shard" if isinstance(exn, (tarfile.TarError, EOFError)) else "unreadable_shard"
        on_error(kind, current["url"], f"{type(exn).__name__}: {first_line(exn)}")
        return True

    def source():
        for url in urls:
            current["url"] = url
            yield {"url": url}

    for i, sample in enumerate(tar_samples(source(), handler)):
        def load(sample=sample):
            ext = image_member(sample)
            captions = shard_captions(sample)
            extra = {}
            if sample.get("json") is not None:
                meta = json.loads(sample["json"].decode("utf-8"))
                if isinstance(meta, dict):  # img2dataset metadata (url, status, original size, ...)
                    extra = {"meta": {k: v for k, v in meta.items() if k not in ("captions", "references")}}
            try:
                references = ordered(member_slots(sample))
            except ValueError as e:
                raise BadSample("bad_reference", str(e)) from None
            return sample[ext], ext, captions, extra, references
        key = str(sample["__key__"])
        yield Record(i, key.rsplit("/", 1)[-1], f"{sample['__url__']} key {key}", load)


# ---------------------------------------------------------------------------------------------------
# Features

class FeatureEncoder:
    """The run config's backend, used for its encoders only (its DiT and VAE are never loaded: parts load on use)."""

    def __init__(self, cfg, mode: str, device: str = "auto"):
        from ..models import load_backend

        if cfg.model.backend not in CACHEABLE_BACKENDS:
            raise ValueError(f"--features: backend {cfg.model.backend!r} cannot cache features (its contexts are not "
                             f"per-sample token features); supported: {', '.join(CACHEABLE_BACKENDS)}")
        if mode == "all" and cfg.model.teacher_context == "reference":
            raise ValueError("--features all: model.teacher_context=reference gives the target image to the DiT "
                             "itself, there are no teacher features to cache; use --features student")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.mode = mode
        self.data_cfg = cfg.data
        self.buckets = resolve_buckets(cfg.data)
        self.fingerprint = encoder_fingerprint(cfg.model, cfg.data)
        self.backend_name = cfg.model.backend
        self.backend = load_backend(cfg.model, device=device)

    @torch.no_grad()
    def __call__(self, image: Image.Image, captions: list[str]) -> tuple[bytes, tuple[int, int]]:
        height, width = assign_bucket(image.width, image.height, self.buckets)
        prompts = [apply_placeholder(c, self.data_cfg.placeholder, self.data_cfg.placeholder_replacement)
                   for c in captions]
        student = self.backend.encode_student(prompts)
        teacher = None
        if self.mode == "all":
            pixels = to_tensor(resize_center_crop(image, height, width))  # what the reader feeds the teacher
            teacher = self.backend.encode_teacher(prompts, pixels.unsqueeze(0).expand(len(prompts), -1, -1, -1))
        for name, feats in (("encode_student", student), ("encode_teacher", teacher)):
            if feats is not None and not (isinstance(feats, list) and all(torch.is_tensor(t) and t.dim() == 2
                                                                          for t in feats)):
                raise TypeError(f"{self.backend_name}.{name} must return a list of (L, D) tensors to be cached")
        payload = pack_features(student, teacher, {"backend": self.backend_name, "fingerprint": self.fingerprint,
                                                   "bucket": f"{height}x{width}", "variants": len(prompts)})
        return payload, (height, width)


# ---------------------------------------------------------------------------------------------------
# Writing

def _stored(data: bytes, ext: str) -> tuple[bytes, str]:
    """Image bytes as given when the reader takes the format, else re-encoded as PNG."""
    ext = "jpg" if ext == "jpeg" else ext
    if ext in IMAGE_EXTS:
        return data, ext
    buf = io.BytesIO()
    with Image.open(io.BytesIO(data)) as image:
        image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue(), "png"


def _key(index: int, name: str) -> str:
    # WebDataset splits KEY.ext at the first dot of the file name: keys carry no dots
    return f"{index:08d}_{re.sub(r'[^A-Za-z0-9_-]+', '_', name)[:48]}"


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _finished_shards(out: Path) -> list[dict]:
    done = []
    while True:
        shard = out / (PATTERN % len(done))
        index = shard.with_name(shard.name + ".json")
        try:
            ix = json.loads(index.read_text()) if index.is_file() and shard.is_file() else None
        except ValueError:
            ix = None
        if not ix or not ix.get("complete"):
            return done
        done.append(ix)


def _clear(out: Path, first: int) -> None:
    """Remove shards from number `first` on (an unfinished one, or all of them for --overwrite)."""
    for path in out.glob("shard-*.tar*"):
        m = re.match(r"shard-(\d+)\.tar", path.name)
        if m and int(m.group(1)) >= first:
            path.unlink()


def open_input(spec: str, on_error: Callable[[str, str, str], None],
               caption: str = "") -> tuple[str, int | None, Iterator[Record]]:
    """`caption`: data.caption of the --config (a default caption or template, as training applies it)."""
    path = Path(spec)
    if path.is_dir() and any(is_image_file(p) for p in path.iterdir()):
        return ("folder", *folder_records(path, caption))
    if path.is_file() and path.suffix.lower() in (".jsonl", ".ndjson"):
        return ("manifest", *manifest_records(path, caption))
    from .shard_io import expand_shard_urls

    return "shards", None, shard_records(expand_shard_urls(spec), on_error)


def make_shards(input: str, output: str, *, samples_per_shard: int = 1000, shard_size_mb: float = 1024.0,
                features: str = "none", cfg=None, device: str = "auto", progress: bool = True,
                overwrite: bool = False) -> dict:
    """Write (or complete) the shards; returns a summary (see the module docstring)."""
    import webdataset as wds
    from tqdm.auto import tqdm

    if features not in FEATURE_MODES:
        raise ValueError(f"--features: {features!r} is not one of {', '.join(FEATURE_MODES)}")
    if features != "none" and cfg is None:
        raise ValueError("--features needs --config (the run config whose model computes them)")
    if samples_per_shard <= 0 or shard_size_mb <= 0:
        raise ValueError("--samples-per-shard and --shard-size-mb must be > 0")
    out = Path(output)
    if Path(input).resolve() == out.resolve():
        raise ValueError("make-shards: the output directory must differ from the input")
    out.mkdir(parents=True, exist_ok=True)
    encoder = FeatureEncoder(cfg, features, device) if features != "none" else None
    settings = {"input": str(input), "samples_per_shard": samples_per_shard, "shard_size_mb": shard_size_mb,
                "features": features, "backend": encoder.backend_name if encoder else None,
                "fingerprint": encoder.fingerprint if encoder else None,
                "buckets": encoder.buckets if encoder else None}
    manifest = out / "dataset.json"
    previous = json.loads(manifest.read_text()) if manifest.is_file() else None
    if previous is not None and previous.get("settings") != settings and not overwrite:
        raise ValueError(f"make-shards: {out} holds shards made with other settings ({previous.get('settings')}); "
                         f"use another output directory or --overwrite")
    if overwrite:
        _clear(out, 0)
    done = [] if overwrite else _finished_shards(out)
    _clear(out, len(done))
    start = done[-1]["next_input"] if done else 0
    _write_json(manifest, {"settings": settings, "complete": False})

    skipped: Counter[str] = Counter()
    st = {"pending": Counter(), "count": 0, "range_start": start, "next": start, "file": None, "written": 0,
          "new_shards": 0, "bytes": 0}

    def on_error(kind: str, where: str, why: str) -> None:
        log.warning("make-shards: skipping %s (%s): %s", where, kind, why)
        skipped[kind] += 1
        st["pending"][kind] += 1

    def opener(fname: str):
        st["file"] = open(fname + ".partial", "wb")
        return st["file"]

    def finished(fname: str) -> None:  # ShardWriter calls this once a shard is closed
        st["file"].close()
        os.replace(fname + ".partial", fname)
        _write_json(Path(fname + ".json"), {
            "shard": Path(fname).name, "samples": st["count"], "first_input": st["range_start"],
            "next_input": st["next"], "skipped_inputs": dict(st["pending"]), "bytes": os.path.getsize(fname),
            "features": features, "backend": settings["backend"], "fingerprint": settings["fingerprint"],
            "complete": True})
        st.update(pending=Counter(), count=0, range_start=st["next"], new_shards=st["new_shards"] + 1)

    kind, total, records = open_input(input, on_error, cfg.data.caption if cfg is not None else "")
    writer = None
    bar = tqdm(total=total, initial=min(start, total or start), desc="make-shards", unit="sample",
               disable=not progress, dynamic_ncols=True)
    last = start - 1
    try:
        for record in records:
            if record.index < start:  # covered by a finished shard
                continue
            last = record.index
            bar.update(1)
            try:
                data, ext, captions, extra, references = record.load()
                # the reader's checks, made here so that shards hold no sample it would refuse
                checked = check_sample(data, lambda: captions, lambda: [ref_data for ref_data, _ in references])
            except BadSample as e:
                on_error(e.kind, record.source, str(e))
                continue
            image = checked.image
            if references and encoder is not None:
                raise ValueError(f"make-shards --features: cached features are for text-to-image data (Z-Image); "
                                 f"{record.source} has reference images (editing data, which FLUX.2-klein encodes "
                                 f"live). Write these shards without --features")
            data, ext = _stored(data, ext)
            info = {"captions": captions, "width": image.width, "height": image.height, "source": record.source,
                    **extra}
            sample = {"__key__": _key(record.index, record.name), ext: data,
                      "txt": "\n".join(c.replace("\n", " ") for c in captions).encode("utf-8")}
            for slot, (ref_data, ref_ext) in enumerate(references):
                ref_data, ref_ext = _stored(ref_data, ref_ext)
                sample[member_name(slot, ref_ext)] = ref_data
            if references:
                info["references"] = [{"width": r.width, "height": r.height} for r in checked.references]  # prepared
            if encoder is not None:
                payload, bucket = encoder(image, captions)
                sample[FEATURES_EXT] = payload
                info["bucket"] = list(bucket)
            sample["json"] = json.dumps(info).encode("utf-8")
            if writer is None:
                writer = wds.ShardWriter(str(out / PATTERN), maxcount=samples_per_shard,
                                         maxsize=int(shard_size_mb * 2 ** 20), post=finished, start_shard=len(done),
                                         verbose=0, opener=opener, encoder=False, mtime=0.0)
            st["next"] = record.index  # a rollover inside write() ends the previous shard before this input
            writer.write(sample)
            st["count"] += 1
            st["written"] += 1
            st["bytes"] += len(data)
        st["next"] = last + 1
        if writer is not None:
            writer.close()
    finally:
        bar.close()
    shards = done + _finished_shards(out)[len(done):]
    summary = {
        "output": str(out), "input": str(input), "input_kind": kind, "features": features,
        "shards": len(shards), "shards_written": st["new_shards"], "shards_skipped": len(done),
        "samples": sum(ix["samples"] for ix in shards), "samples_written": st["written"],
        "samples_in_skipped_shards": sum(ix["samples"] for ix in done), "skipped": dict(skipped),
        "skipped_total": dict(sum((Counter(ix.get("skipped_inputs", {})) for ix in shards), Counter()) +
                              st["pending"]),
    }
    _write_json(manifest, {"settings": settings, "complete": True, **{k: v for k, v in summary.items()
                                                                     if k not in ("output", "input")}})
    return summary
