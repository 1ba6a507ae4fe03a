"""Several datasets as one data source (`data.datasets`): folders, JSONL manifests and shards mixed.

  data:
    resolution: [1024, 1024]
    datasets:
      - {path: /data/dog, type: folder, caption: "a photo of [V] dog", repeats: 10}
      - {path: /data/reg.jsonl, type: manifest, aspect_buckets: true}
      - {path: "/data/laion/shard-{000000..000099}.tar", type: webdataset}

Each entry is a dataset with the keys of `DatasetConfig` (dopsd/config.py); a key it leaves out takes the value
of data.<key> (type, resolution, buckets, aspect_buckets, crop, caption, caption_dropout, placeholder_replacement,
cached_features; everything else, e.g. num_workers, max_bad_fraction, shuffle, is data's). Each dataset is
built as the source of its type would be alone (folder.py, wds_source.py); the single `data.path` form is the
one-element list without repeats.

What an epoch is. Every global batch (train.batch_size x ranks) comes from one dataset, so the shapes agree on
every rank and each dataset's own rules (one bucket per global batch for folders, fixed steps per rank for shards)
hold unchanged. Dataset i has S_i steps per epoch of its own (what it would have alone).
- repeats (the default, repeats: 1): an epoch has sum_i S_i x repeats_i steps, of which dataset i serves exactly
  S_i x repeats_i, i.e. `repeats_i` whole epochs of its own: every sample of dataset i appears repeats_i times
  per epoch (folders and manifests exactly; shards as exactly as they do alone, see wds_source.py).
- weight (set on every dataset, repeats left at 1): an epoch has sum_i S_i steps (as many as one pass over
  everything), of which dataset i serves its share weight_i / sum(weights) (largest remainder). A dataset then
  runs through its own epochs at its own pace, across the mixture's epochs: no exactly-once promise.
Which dataset serves each step of epoch e is a seeded shuffle of those slots, a function of (train.seed, e) alone
(in order, dataset 0's slots first, with data.shuffle: false), the same on every rank.

Position (the checkpoint's data position): {"epoch", "step_in_epoch", "datasets": [each dataset's own position],
"layout": [[path, repeats, weight], ...], "batch_size", "world_size"}. Each dataset keeps its own position, so a
resume mid-epoch continues every dataset exactly where it was; a checkpoint made with another list of datasets
is a DataError. Batches carry "dataset": the index of the dataset that served them.
"""
from __future__ import annotations

import dataclasses
import random
from collections import Counter

from . import build_data
from .errors import DataError
from .folder import check_global_batch
from .sampler import sample_seed
from .samples import description
from .wds_source import apportion

_OWN = ("repeats", "weight")  # the entry's own keys; every other key it sets replaces data.<key>


def dataset_config(cfg, entry):
    """The run config as dataset `entry` sees it alone: data.<key> replaced by each key the entry sets."""
    overrides = {f.name: getattr(entry, f.name) for f in dataclasses.fields(entry)
                 if f.name not in _OWN and getattr(entry, f.name) is not None}
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, datasets=[], **overrides))


class MixedSource:
    """The data-source surface of dopsd/data/__init__.py over data.datasets (see the module docstring)."""

    def __init__(self, cfg, rank: int = 0, world_size: int = 1):
        self.entries = list(cfg.data.datasets)
        self.sources = []
        for i, entry in enumerate(self.entries):
            try:  # (a collective for shards: every rank builds every dataset, in the same order)
                self.sources.append(build_data(dataset_config(cfg, entry), rank, world_size))
            except DataError as e:  # name the entry: "data.path" alone would not say which
                raise type(e)(f"data.datasets[{i}] ({entry.path}): {e}") from None
        self.seed, self.shuffle = cfg.train.seed, cfg.data.shuffle
        self.batch_size, self.world = cfg.train.batch_size, world_size
        self.weighted = any(e.weight > 0 for e in self.entries)
        own = [s.steps_per_epoch for s in self.sources]
        if self.weighted:
            self.quota = apportion(sum(own), [e.weight for e in self.entries])
            self.num_samples = sum(s.num_samples for s in self.sources)
        else:
            self.quota = [n * e.repeats for n, e in zip(own, self.entries)]
            self.num_samples = sum(s.num_samples * e.repeats for s, e in zip(self.sources, self.entries))
        self.steps_per_epoch = sum(self.quota)
        self.global_offsets = self.sources[0].global_offsets  # the same in every dataset: rank x batch + j
        self.layout = [[e.path, e.repeats, e.weight] for e in self.entries]

    @property
    def skipped(self) -> Counter:
        return sum((s.skipped for s in self.sources), Counter())

    def schedule(self, epoch: int) -> list[int]:
        """The dataset of each step of `epoch`: a pure function of (seed, epoch), the same on every rank."""
        order = [i for i, q in enumerate(self.quota) for _ in range(q)]
        if self.shuffle:
            random.Random(sample_seed(self.seed, epoch, 0x313)).shuffle(order)
        return order

    def describe(self) -> dict:
        datasets = [{**s.dataset_entry(), "repeats": e.repeats, "weight": e.weight, "steps_in_epoch": q}
                    for s, e, q in zip(self.sources, self.entries, self.quota)]
        return description(datasets, self.steps_per_epoch)

    def _restore(self, position: dict) -> tuple[int, int, list[dict]]:
        if not position:
            return 0, 0, [{} for _ in self.sources]
        if "datasets" not in position:
            raise DataError("data.datasets: the checkpoint's data position was made with one dataset (data.path); "
                            "resuming needs the same data settings (restore data.path, or start a new output.dir)")
        if position.get("layout") != self.layout:
            raise DataError(f"data.datasets: the checkpoint's data position was made with the datasets "
                            f"{position.get('layout')} ([path, repeats, weight]), this run has {self.layout}; "
                            f"resuming needs the same list (restore it, or start a new output.dir)")
        check_global_batch(position, self.batch_size, self.world)
        return int(position["epoch"]), int(position["step_in_epoch"]), list(position["datasets"])

    def batches(self, position: dict):
        epoch, step, positions = self._restore(position or {})
        streams = [None] * len(self.sources)  # started on first use: a dataset's readers only when it serves
        while True:
            order = self.schedule(epoch)
            for t in range(step, len(order)):
                i = order[t]
                if streams[i] is None:
                    streams[i] = self.sources[i].batches(positions[i])
                batch, positions[i] = next(streams[i])
                batch["dataset"] = i
                done = t + 1 == len(order)
                yield batch, {"epoch": epoch + done, "step_in_epoch": 0 if done else t + 1,
                              "datasets": list(positions), "layout": self.layout,
                              "batch_size": self.batch_size, "world_size": self.world}
            epoch, step = epoch + 1, 0
