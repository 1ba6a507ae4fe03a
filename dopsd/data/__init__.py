"""Data sources: image folders (folder.py) and WebDataset shards (wds_source.py; written by shards.py).

The trainer sees a data source through this small surface only:
  num_samples       samples per epoch (global), for the log
  skipped           Counter of bad samples seen by this rank, by kind
  global_offsets    this rank's places in the global batch (they name each sample's noise)
  batches(position) iterator of (batch, position after it) from a position ({} = the start); a
                    position is a JSON-able dict stored in checkpoints, so a resume continues exactly there
A batch is a dict with "image" (B, 3, H, W) in [0, 1], "prompt" (list of B str) and "key"; optionally
"student_context" / "teacher_context" (lists of B cached feature tensors, used instead of the encoders), and
"references" (editing data: one (B, 3, H_i, W_i) tensor in [0, 1] per reference slot; see references.py).
"""
from __future__ import annotations


def build_data(cfg, rank: int = 0, world_size: int = 1):
    if cfg.data.type == "folder":
        from .folder import FolderSource

        return FolderSource(cfg, rank, world_size)
    if cfg.data.type == "webdataset":
        from .wds_source import WebDatasetSource

        return WebDatasetSource(cfg, rank, world_size)
    raise ValueError(f"data.type: unknown {cfg.data.type!r}")
