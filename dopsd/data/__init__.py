"""Data sources: image folders and JSONL manifests (folder.py), WebDataset shards (wds_source.py; written by
shards.py), and several of them mixed (mixture.py, `data.datasets`).

Modules; each imports only modules on the lines above it (no cycle):
  errors (DataError); images (IMAGE_EXTS, decoding, resize + crop, tensors); shard_format (sample layout, buckets,
    caption fields, features); sampler (global batches): import no data module
  references (editing references) -> images;  shard_io (tar reading, indexes) -> errors, images
  samples (`check_sample`, the one validity check and its kinds; captions and their precedence; caption dropout;
    manifest lines; `collate`; `description`) -> images, references, sampler, shard_format
  folder, wds_source (the two sources) and shards (make-shards) -> samples and the modules above
  mixture (data.datasets) -> this package's build_data, wds_source (apportion)

Configuration (DataConfig in dopsd/config.py). One dataset: data.type (folder | manifest | webdataset) and
data.path. Several: data.datasets, a list of {path, type, repeats, weight, caption, caption_dropout, resolution,
buckets, aspect_buckets, crop, placeholder_replacement, cached_features}, each key it leaves out taken from data.*;
mixture.py defines what an epoch then is. Your own images: data.caption (a default caption, or a "{caption}"
template, e.g. "a photo of [V] dog"; caption files optional with a default; precedence: manifest field, NAME.txt,
NAME.json, data.caption), data.caption_dropout (the empty caption "" with that probability, drawn per (train.seed,
epoch, sample): rank-layout and resume independent), data.aspect_buckets / data.buckets (folders and manifests
bucketed by aspect ratio like shards; otherwise every image to data.resolution), data.crop (center | random,
seeded per (train.seed, epoch, sample)). Details in folder.py. Shards with cached features refuse caption
dropout, a "{caption}" template and random crops (DataError naming the key): their features were made for the
shard's own captions and centre crops; set data.cached_features=false to encode live.

The trainer sees a data source through this small surface only:
  num_samples       samples per epoch (global), for the log
  steps_per_epoch   steps (global batches) per epoch, the same on every rank
  skipped           Counter of bad samples seen by this rank, by kind
  global_offsets    this rank's places in the global batch (they name each sample's noise)
  batches(position) iterator of (batch, position after it) from a position ({} = the start); a
                    position is a JSON-able dict stored in checkpoints, so a resume continues exactly there
  describe()        what the data hold, for `dopsd train --check` (no model needed; folders are fully scanned
                    when the source is built, shards are surveyed from their indexes):
    {"samples": int,                 usable samples, all datasets (each once: repeats not counted)
     "steps_per_epoch": int,
     "skipped": {kind: n},           bad samples found so far, by kind (samples.py names the kinds)
     "buckets": {"HxW": n},          usable samples per target size (folders and manifests; shards: {} until read)
     "bad_files": [{"path", "kind", "why"}, ...],   every skipped sample (a manifest line: "file.jsonl:N") and
                                     every shard known lost (missing, truncated)
     "datasets": [{"path", "type", "samples", "skipped", "bad_files", "buckets", "steps_per_epoch",
                   and with data.datasets: "repeats", "weight", "steps_in_epoch" (the steps it serves per
                   epoch of the mixture)}, ...]}          one entry per dataset, in order
A batch is a dict with "image" (B, 3, H, W) in [0, 1], "prompt" (list of B str; "" is a dropped caption) and "key";
optionally "student_context" / "teacher_context" (lists of B cached feature tensors, used instead of the encoders),
"references" (editing data: one (B, 3, H_i, W_i) tensor in [0, 1] per reference slot; see references.py), "shard"
(shards) and "dataset" (with data.datasets: the index of the dataset that served it).

Errors. Data that cannot be trained on raise `DataError` (dopsd/data/errors.py, a ValueError; `DataPathError`,
also a FileNotFoundError, when data.path names nothing), with a one-line message naming the key and what to do.
`build_data` makes every check it can before any batch: data.path exists, patterns match shard files, shard
indexes are read (plain shards without index are counted once), missing or truncated shards are set against
data.max_bad_fraction, and the folder is scanned in full. It needs no model weights and no backend; call it before
loading them, so that a data mistake costs seconds. With a process group it is a collective (rank 0 reads the shard
indexes and broadcasts them): every rank must call it. Cached features (webdataset with data.cached_features) are
matched against a fingerprint of the encoder files under model.path, so those files must exist by then (a tiny model
built by model.make_tiny_if_missing must be written first). Later errors (data.max_bad_fraction exceeded mid-run,
no shard of a reader yields a sample, a checkpoint position made with another batch size) come from `batches()`.
"""
from __future__ import annotations

from .errors import DataError, DataPathError

__all__ = ["DataError", "DataPathError", "build_data", "cached_everywhere"]


def datasets_of(cfg) -> list:
    """The data config of every dataset of the run (data itself, or each data.datasets entry as it sees it)."""
    if not cfg.data.datasets:
        return [cfg.data]
    from .mixture import dataset_config

    return [dataset_config(cfg, entry).data for entry in cfg.data.datasets]


def cached_everywhere(cfg) -> bool:
    """Whether every dataset may hand cached features (shards with data.cached_features): then the trainer can
    leave the live teacher encoder out; with any folder or manifest it needs it."""
    return all(d.type == "webdataset" and d.cached_features for d in datasets_of(cfg))


def build_data(cfg, rank: int = 0, world_size: int = 1):
    if cfg.data.datasets:
        from .mixture import MixedSource

        return MixedSource(cfg, rank, world_size)
    if cfg.data.type in ("folder", "manifest"):
        from .folder import FolderSource

        return FolderSource(cfg, rank, world_size)
    if cfg.data.type == "webdataset":
        from .wds_source import WebDatasetSource

        return WebDatasetSource(cfg, rank, world_size)
    raise DataError(f"data.type: unknown {cfg.data.type!r} (folder, manifest or webdataset)")
