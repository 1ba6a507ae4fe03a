"""Data sources: image folders (folder.py) and WebDataset shards (wds_source.py; written by shards.py).

Modules; each imports only modules on the lines above it (no cycle):
  errors (DataError); images (IMAGE_EXTS, decoding, resize + crop, tensors); shard_format (sample layout, buckets,
    caption fields, features); sampler (global batches); synthetic (test images): import no data module
  references (editing references) -> images;  shard_io (tar reading, indexes) -> errors, images
  samples (`check_sample`, the one validity check and its kinds; `collate`) -> images, references, shard_format
  folder, wds_source (the two sources) and shards (make-shards) -> samples and the modules above

The trainer sees a data source through this small surface only:
  num_samples       samples per epoch (global), for the log
  skipped           Counter of bad samples seen by this rank, by kind
  global_offsets    this rank's places in the global batch (they name each sample's noise)
  batches(position) iterator of (batch, position after it) from a position ({} = the start); a
                    position is a JSON-able dict stored in checkpoints, so a resume continues exactly there
A batch is a dict with "image" (B, 3, H, W) in [0, 1], "prompt" (list of B str) and "key"; optionally
"student_context" / "teacher_context" (lists of B cached feature tensors, used instead of the encoders), and
"references" (editing data: one (B, 3, H_i, W_i) tensor in [0, 1] per reference slot; see references.py).

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

__all__ = ["DataError", "DataPathError", "build_data"]


def build_data(cfg, rank: int = 0, world_size: int = 1):
    if cfg.data.type == "folder":
        from .folder import FolderSource

        return FolderSource(cfg, rank, world_size)
    if cfg.data.type == "webdataset":
        from .wds_source import WebDatasetSource

        return WebDatasetSource(cfg, rank, world_size)
    raise DataError(f"data.type: unknown {cfg.data.type!r} (folder or webdataset)")
