"""What a dopsd shard sample holds, shared by the writer (shards.py) and the reader (wds_source.py).

A sample is a group of tar members with one key (WebDataset convention: `KEY.ext`):
  KEY.jpg|jpeg|png|webp     the image bytes, as given
  KEY.txt                   caption variants, one per line (what plain tools and plain-tar shards carry)
  KEY.json                  {"captions": [...], "width", "height", ...} (img2dataset's {"caption": ...} works too)
  KEY.features.safetensors  optional cached conditioning, computed by the backend's own encoders:
                            "student.{i}" text features of caption variant i, (L, D) each;
                            "teacher.{i}" teacher features of variant i + the bucketed target image;
                            metadata: format, backend, fingerprint, bucket ("HxW"), variants.
The fingerprint names everything the features depend on (encoder configs and weights, token and pixel limits,
prompt placeholder rule, bucket list), so features made for another model or setting are never used silently.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

FEATURES_EXT = "features.safetensors"
FEATURES_FORMAT = "dopsd-features/1"
# Backends whose contexts are lists of per-sample (L, D) token features, which can be cached sample by sample.
CACHEABLE_BACKENDS = ("zimage",)

# The recipe's ~1 MP aspect-ratio buckets, [height, width] (the authors' released script; the list is symmetric).
PAPER_BUCKETS = [[1024, 1024], [1152, 896], [896, 1152], [1152, 864], [864, 1152], [1248, 832], [832, 1248],
                 [1280, 720], [720, 1280], [1344, 576], [576, 1344]]
_UNIT = 16


# ---------------------------------------------------------------------------------------------------
# Buckets

def default_buckets(resolution: list[int]) -> list[list[int]]:
    """The paper's bucket list for a 1024x1024 base resolution; for another base (tiny models), the same aspect
    ratios scaled to its pixel area and snapped to multiples of 16 (duplicates dropped)."""
    height, width = resolution
    scale = math.sqrt(height * width / (1024 * 1024))
    if abs(scale - 1.0) < 1e-9:
        return [list(b) for b in PAPER_BUCKETS]
    out: list[list[int]] = []
    for bh, bw in PAPER_BUCKETS:
        b = [max(_UNIT, round(bh * scale / _UNIT) * _UNIT), max(_UNIT, round(bw * scale / _UNIT) * _UNIT)]
        if b not in out:
            out.append(b)
    return out


def resolve_buckets(data_cfg) -> list[list[int]]:
    return [list(b) for b in data_cfg.buckets] if data_cfg.buckets else default_buckets(list(data_cfg.resolution))


def assign_bucket(width: int, height: int, buckets: list[list[int]]) -> tuple[int, int]:
    """(height, width) of the bucket whose aspect ratio is nearest the image's (in log space; first on ties)."""
    aspect = math.log(width / height)
    best = min(range(len(buckets)), key=lambda i: (abs(aspect - math.log(buckets[i][1] / buckets[i][0])), i))
    return buckets[best][0], buckets[best][1]


# ---------------------------------------------------------------------------------------------------
# Captions

def caption_variants(values) -> list[str]:
    if isinstance(values, dict):
        values = list(values.values())
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list):
        raise ValueError("captions must be a string, a list or a mapping of strings")
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def sample_captions(sample: dict) -> list[str]:
    """Caption variants of a raw shard sample: json "captions" (list or mapping), else txt lines, else json
    "caption" / "text" / "prompt" (img2dataset). [] when it holds none; ValueError when unreadable."""
    meta = None
    if sample.get("json") is not None:
        meta = json.loads(sample["json"].decode("utf-8"))
        if isinstance(meta, dict) and meta.get("captions") is not None:
            variants = caption_variants(meta["captions"])
            if variants:
                return variants
    if sample.get("txt") is not None:
        variants = [line.strip() for line in sample["txt"].decode("utf-8").splitlines() if line.strip()]
        if variants:
            return variants
    if isinstance(meta, dict):
        for field in ("caption", "text", "prompt"):
            if meta.get(field) is not None:
                variants = caption_variants(meta[field])
                if variants:
                    return variants
    return []


def apply_placeholder(prompt: str, placeholder: str, replacement: str) -> str:
    """The folder dataset's rule: the placeholder is replaced only when a replacement is configured."""
    return prompt.replace(placeholder, replacement) if replacement else prompt


# ---------------------------------------------------------------------------------------------------
# Feature payloads

def pack_features(student: list | None, teacher: list | None, metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    tensors = {}
    for role, feats in (("student", student), ("teacher", teacher)):
        for i, t in enumerate(feats or []):
            tensors[f"{role}.{i}"] = t.detach().to("cpu").clone()  # views of one batch share storage
    return save(tensors, metadata={"format": FEATURES_FORMAT, **{k: str(v) for k, v in metadata.items()}})


def read_features_header(data: bytes) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensor entries {name: {"dtype", "shape", "data_offsets"}}, metadata) from safetensors bytes, without
    materialising tensors (the format: an 8-byte little-endian header length, then a JSON header). Raises
    ValueError when the bytes are not a complete safetensors payload."""
    if len(data) < 8:
        raise ValueError("features payload shorter than a safetensors header")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise ValueError("features payload truncated (header)")
    header = json.loads(data[8:8 + size].decode("utf-8"))
    metadata = header.pop("__metadata__", None) or {}
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + size + end != len(data):
        raise ValueError(f"features payload has {len(data)} bytes, its header describes {8 + size + end}")
    return header, metadata


def load_features(data: bytes) -> dict:
    from safetensors.torch import load

    return load(data)


# ---------------------------------------------------------------------------------------------------
# Encoder fingerprint

def _file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """Small files: sha256 of the content. Weight files: sha256 of size, safetensors header and three 1 MiB
    samples (start, middle, end), so that fingerprinting a 4B encoder takes milliseconds, not a full read."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= 4 * chunk:
            h.update(f.read())
        else:
            if path.suffix == ".safetensors":
                (n,) = struct.unpack("<Q", f.read(8))
                h.update(f.read(min(n, 64 << 20)))
            for offset in (0, size // 2, size - chunk):
                f.seek(offset)
                h.update(f.read(chunk))
    return h.hexdigest()


def _dir_digests(directory: Path) -> dict[str, str]:
    if not directory.is_dir():
        return {}
    return {str(p.relative_to(directory)): _file_digest(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def encoder_files(model_cfg) -> dict[str, Path]:
    """The directories whose files the cached features depend on, by backend."""
    path = Path(model_cfg.path)
    if model_cfg.backend == "zimage":
        teacher = Path(model_cfg.teacher_encoder_path) if model_cfg.teacher_encoder_path else path / "teacher_encoder"
        return {"text_encoder": path / "text_encoder", "tokenizer": path / "tokenizer", "teacher_encoder": teacher}
    return {"text_encoder": path / "text_encoder", "tokenizer": path / "tokenizer"}


def encoder_fingerprint(model_cfg, data_cfg) -> str:
    """A hash of everything cached features depend on (see the module docstring)."""
    settings = {
        "format": FEATURES_FORMAT, "backend": model_cfg.backend, "dtype": model_cfg.dtype,
        "max_text_tokens": model_cfg.max_text_tokens, "teacher_max_tokens": model_cfg.teacher_max_tokens,
        "teacher_pixels": [model_cfg.teacher_min_pixels, model_cfg.teacher_max_pixels],
        "placeholder": [data_cfg.placeholder, data_cfg.placeholder_replacement],
        "buckets": resolve_buckets(data_cfg),
        "files": {name: _dir_digests(d) for name, d in encoder_files(model_cfg).items()},
    }
    if model_cfg.backend == "zimage" and model_cfg.teacher_context == "reference":  # (existing fingerprints stay)
        settings["teacher_context"] = model_cfg.teacher_context
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def feature_dims(model_cfg) -> int | None:
    """Width D of the cached (L, D) features (the text encoder's hidden size), read from its config file."""
    config = Path(model_cfg.path) / "text_encoder" / "config.json"
    try:
        return int(json.loads(config.read_text())["hidden_size"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


def check_features(header: dict, metadata: dict, *, fingerprint: str, variants: int, bucket: tuple[int, int],
                   dim: int | None, max_student: int, max_teacher: int) -> tuple[str, str] | None:
    """None if the payload fits this run, else (kind, why): kind "feature_fingerprint" or "bad_features"."""
    if metadata.get("format") != FEATURES_FORMAT:
        return "bad_features", f"unknown features format {metadata.get('format')!r}"
    if metadata.get("fingerprint") != fingerprint:
        return "feature_fingerprint", (f"made with encoder fingerprint {metadata.get('fingerprint')} "
                                       f"({metadata.get('backend')}), this run expects {fingerprint}")
    if metadata.get("bucket") != f"{bucket[0]}x{bucket[1]}":
        return "bad_features", f"made for bucket {metadata.get('bucket')}, the image falls in {bucket[0]}x{bucket[1]}"
    for role, limit in (("student", max_student), ("teacher", max_teacher)):
        names = [k for k in header if k.startswith(role + ".")]
        if not names:
            continue
        if sorted(names) != sorted(f"{role}.{i}" for i in range(variants)):
            return "bad_features", f"{len(names)} {role} features for {variants} caption variants"
        for name in names:
            entry = header[name]
            shape = entry.get("shape", [])
            if entry.get("dtype") not in ("F32", "BF16", "F16") or len(shape) != 2 or not 1 <= shape[0] <= limit \
                    or (dim is not None and shape[1] != dim):
                return "bad_features", f"{name}: {entry.get('dtype')} {shape}, expected (1..{limit}, {dim}) floats"
    return None

