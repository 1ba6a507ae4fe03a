"""WebDataset shards as a data source (`data.type: webdataset`), built on the `webdataset` library.

(Named wds_source, not webdataset, so that it never shadows the library.)

Shards: `data.path` is a brace pattern (`/data/shard-{000000..000099}.tar`), several joined by `::`, a directory
of `.tar` files, or `pipe:` URLs (`pipe:aws s3 cp s3://bucket/shard-000001.tar -`). Shards written by
`dopsd make-shards` and by a plain `tar` of `KEY.jpg` + `KEY.txt` files both read (see shard_format.py).

Order. Every epoch the shard list is shuffled with (train.seed, epoch), the same on every rank; `split_by_node`
gives rank r every world_size-th shard and `split_by_worker` deals those to the rank's reader workers. Each
worker streams its shards through a seeded shuffle buffer (`data.shuffle_buffer`) into aspect-ratio buckets
(`data.buckets`); a batch is emitted when a bucket holds `train.batch_size` samples, so a batch never mixes sizes.
Editing samples (members `KEY.ref0.png`, `KEY.ref1.png`, ...; see references.py) are bucketed by their target's
bucket and their references' preprocessed sizes together, and batches carry "references" (one (B, 3, H_i, W_i)
tensor per slot). Ranks may hold different buckets at one step; the model calls per step do not depend on sizes.

Fixed steps per epoch. Every rank runs `steps_per_epoch` steps per epoch (`data.steps_per_epoch`, default
ceil(samples / (ranks x batch)) from the shard indexes make-shards writes; plain shards are counted once on
rank 0), so no rank runs out before another. The rank's steps are apportioned to its workers by their sample
counts. A worker whose shards run out before its budget starts over on them (repeats); one with more samples
than its budget leaves the rest for next epoch's shuffle (unused this epoch), as do samples left in a partly
filled bucket. When the shards split evenly (equal shard sizes, shard count a multiple of ranks x workers,
bucket counts multiples of the batch size), every sample is used exactly once per epoch.
`data.sampling: resampled` instead draws each worker's shards with replacement (no per-epoch coverage).

Captions and crops as for folders (folder.py): data.caption is the default caption of samples without one, or
a "{caption}" template; data.caption_dropout replaces a sample's caption by "" with that probability and data.crop:
random crops at a random offset, both drawn per (train.seed, epoch, shard name + key), so the same on any rank
layout. With cached features (data.cached_features and a backend that caches) these three are refused (DataError
naming the key): the features were made for the shard's own captions and centre crops.

Resume. The position (epoch, seed, steps and samples consumed by this rank, batches taken from each worker,
bad-sample counters) is stored in every checkpoint. A resume replays each worker's stream up to the batches it
had delivered (images are decoded to make the same decisions, but not resized, features not loaded), so the
run continues with exactly the batches the uninterrupted run would have had: nothing repeated, nothing skipped.

Bad input: an unreadable or missing shard, a truncated tar, an undecodable image, a sample without caption, a
missing, undecodable or refused reference image, features of the wrong shape or fingerprint are skipped with a
warning naming shard and key, and counted by kind in `skipped` (a lost shard counts once per visit there).
`data.max_bad_fraction` bounds the fraction of bad samples; exceeding it raises DataError (dopsd/data/errors.py):
- A shard that is lost (missing, unreadable, truncated, or yielding fewer samples than its index lists) counts
  the samples lost in it as bad and as read: its index's count (minus the samples read from it, when truncated),
  or 1 when its count is unknown (plain shards read with data.steps_per_epoch set, pipe: URLs without index).
  So 10% of shards missing is ~10% of bad samples, not one bad sample per shard.
- When the source is built (rank 0 checks, every rank raises): local shard files that do not exist, or whose size
  differs from their index's (then the readable samples of just those shards are counted), are set against the
  whole data set; more than max_bad_fraction of its samples lost stops the run before any model is loaded. Fewer
  are logged, and counted again as the shards are visited.
- While reading, per rank, on the counters of everything it has read this run: samples lost in shards, checked as
  soon as a shard is lost, against the samples the rank reads by the end of the current epoch (a single lost shard
  early in an epoch is judged against the epoch, not against the few samples read before it); bad samples,
  checked against the samples read once there are 1 / max_bad_fraction of them (0: at once); and both together
  at every epoch end. The counters are stored in every position, so a resume continues them exactly.
Data that yield nothing (no shard file exists, no shard of a reader yields a sample) raise DataError too, and so
does a checkpoint position made with another train.batch_size, data.num_workers or data.steps_per_epoch.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import multiprocessing
import random
import tarfile
import zlib
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from ..dist import broadcast_object
from .errors import DataError, DataPathError
from .images import resize_crop, to_tensor
from .references import member_slots, ordered, reference_sizes
from .samples import (BadSample, caption_dropped, check_sample, collate, crop_rng, description, image_member,
                      shard_captions, with_default)
from .sampler import sample_seed
from .shard_io import (count_samples, expand_shard_urls, first_line, local_path, read_index, split_shards,
                       tar_samples)
from .shard_format import (CACHEABLE_BACKENDS, FEATURES_EXT, apply_placeholder, assign_bucket, check_features,
                           encoder_fingerprint, feature_dims, load_features, read_features_header, resolve_buckets)

log = logging.getLogger(__name__)

FLUSH_EVENTS = 64  # a worker reports bad samples without waiting for a batch once this many are pending

__all__ = ["DataError", "DataPathError", "Reader", "WebDatasetSource", "apportion", "round_robin"]


# ---------------------------------------------------------------------------------------------------
# Budgets

def apportion(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights` (largest remainder; equal split when all weights are 0)."""
    if not any(weights):
        weights = [1] * len(weights)
    quotas = [total * w / sum(weights) for w in weights]
    out = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(quotas[i] - out[i]), i))
    for i in by_remainder[:total - sum(out)]:
        out[i] += 1
    return out


def round_robin(budgets: list[int]) -> list[int]:
    """The worker of each step: round-robin over workers until each has delivered its budget (the order in which
    a DataLoader returns the batches of iterable-dataset workers)."""
    return [w for r in range(max(budgets, default=0)) for w in range(len(budgets)) if r < budgets[w]]


@dataclass
class EpochPlan:
    shards: list[list[str]]  # per worker (epoch mode); resampled workers draw from all shards
    budgets: list[int]  # batches per worker
    order: list[int]  # worker of each step


# ---------------------------------------------------------------------------------------------------
# The per-worker stream (runs in DataLoader worker processes; everything here is picklable)

@dataclass
class _Item:
    key: str
    shard: str
    image: Image.Image
    bucket: tuple[int, int]
    prompt: str
    variant: int
    features: bytes | None = None
    roles: tuple[str, ...] = ()
    references: tuple[Image.Image, ...] = ()  # prepared as the pipeline does
    crop: random.Random | None = None  # data.crop: random (None: centre)

    @property
    def batch_key(self) -> tuple:
        """Samples that may share a batch: same target bucket, same reference sizes."""
        return self.bucket, reference_sizes(list(self.references))


@dataclass
class Reader:
    rank: int
    batch_size: int
    seed: int
    buckets: list[list[int]]
    sampling: str
    shuffle: bool
    shuffle_buffer: int
    placeholder: str
    replacement: str
    all_urls: list[str]
    world: int = 1
    workers: int = 1
    steps_per_epoch: int = 1
    counts: dict[str, int] | None = None
    use_features: bool = False
    fingerprint: str = ""
    feature_dim: int | None = None
    max_student_tokens: int = 512
    max_teacher_tokens: int = 1024
    expected_samples: int = 0
    caption: str = ""  # data.caption (see folder.py)
    caption_dropout: float = 0.0
    crop: str = "center"

    def plan(self, epoch: int) -> EpochPlan:
        """Shards, batch budgets and step order of this rank's workers in `epoch` (the same in every process)."""
        equal = apportion(self.steps_per_epoch, [1] * self.workers)
        if self.sampling == "resampled":
            return EpochPlan([], equal, round_robin(equal))
        order = list(self.all_urls)
        if self.shuffle:
            random.Random(sample_seed(self.seed, epoch, 0x5A4D)).shuffle(order)
        shards = [split_shards(order, self.rank, self.world, w, self.workers) for w in range(self.workers)]
        budgets = equal
        if self.counts is not None:
            budgets = apportion(self.steps_per_epoch, [sum(self.counts.get(u, 0) for u in s) for s in shards])
        return EpochPlan(shards, budgets, round_robin(budgets))

    # --- raw samples -----------------------------------------------------------------------------
    def _raw_samples(self, epoch: int, worker: int, shards: list[str], events: list, state: dict):
        """An endless stream of raw samples, pass after pass: this worker's shards again and again (epoch), or
        as many shards drawn with replacement from all of them (resampled). Each pass is shuffled on its own, so
        that a pass never mixes with the next. DataError when a whole pass yields nothing.

        Events are (kind, shard, key, why, lost): key "-" for a shard-level event, `lost` the samples lost in a
        shard as far as its known count tells (0: unknown, or none lost)."""

        def handler(exn: Exception) -> bool:
            why = f"{type(exn).__name__}: {first_line(exn)}"
            if isinstance(exn, (tarfile.TarError, EOFError)):
                kind = "truncated_shard"
            elif isinstance(exn, OSError):
                kind = "unreadable_shard"
            else:
                events.append(("bad_sample", state.get("url", "?"), "-", why, 0))
                return True
            if state["failure"] is None:  # one report per shard visit, made once the visit is over
                state["failure"] = (kind, why)
            return True

        def visit(url: str):
            """One shard's samples, then its report if it failed or yielded fewer samples than its count."""
            state["url"], state["failure"] = url, None
            read = 0
            for sample in tar_samples(iter([{"url": url}]), handler):
                read += 1
                state["read"] += 1
                yield sample
            expected = self.counts.get(url) if self.counts is not None else None
            failure = state["failure"]
            if failure is None and expected is not None and read < expected:
                failure = ("truncated_shard", f"ended after {read} of the {expected} samples its index lists")
            if failure is not None:
                lost = max(expected - read, 0) if expected is not None else 0
                why = failure[1] + (f" ({lost} samples lost)" if lost else "")
                events.append((failure[0], url, "-", why, lost))

        pool = self.all_urls if self.sampling == "resampled" else shards
        draws = random.Random(sample_seed(self.seed, epoch, self.rank, worker, 0x5E))
        for n in itertools.count():
            urls = [draws.choice(pool) for _ in pool] if self.sampling == "resampled" else list(pool)
            samples = (sample for url in urls for sample in visit(url))
            if self.shuffle and self.shuffle_buffer > 1:
                rng = random.Random(sample_seed(self.seed, epoch, self.rank, worker, n, 0xB0F))
                samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
            before = state["read"]
            for sample in samples:
                state["raw"] += 1
                yield sample
            if state["read"] == before:
                raise DataError(f"data.path: none of the {len(pool)} shards of rank {self.rank} reader {worker} "
                                f"yields a sample ({', '.join(pool[:3])}{', ...' if len(pool) > 3 else ''}); the "
                                f"warnings above say why for each (not a tar, missing, unreadable)")

    # --- per sample checks (cheap enough to replay on resume) -------------------------------------
    def _inspect(self, raw: dict, epoch: int, events: list) -> _Item | None:
        key, url = str(raw.get("__key__", "?")), str(raw.get("__url__", "?"))

        def skip(kind: str, why: str) -> None:
            events.append((kind, url, key, why, 0))

        try:
            sample = check_sample(raw[image_member(raw)], with_default(lambda: shard_captions(raw), self.caption),
                                  lambda: [data for data, _ in ordered(member_slots(raw))])
        except BadSample as e:
            return skip(e.kind, str(e))
        image, captions, references = sample.image, sample.captions, sample.references
        bucket = assign_bucket(image.width, image.height, self.buckets)
        name = zlib.crc32(f"{Path(url).name}/{key}".encode())  # the sample, whatever rank or worker reads it
        rng = random.Random(sample_seed(self.seed, epoch, name))
        variant = rng.randrange(len(captions))
        prompt = apply_placeholder(captions[variant], self.placeholder, self.replacement)
        if caption_dropped(self.caption_dropout, self.seed, epoch, name):
            prompt = ""  # (refused with cached features: the empty caption's are not in the shard)
        item = _Item(key, url, image, bucket, prompt, variant, references=references,
                     crop=crop_rng(self.crop, self.seed, epoch, name))
        payload = raw.get(FEATURES_EXT)
        if self.use_features and payload is not None:
            try:
                header, meta = read_features_header(payload)
            except (ValueError, UnicodeDecodeError) as e:
                return skip("bad_features", str(e))
            problem = check_features(header, meta, fingerprint=self.fingerprint, variants=len(captions),
                                     bucket=bucket, dim=self.feature_dim, max_student=self.max_student_tokens,
                                     max_teacher=self.max_teacher_tokens)
            if problem is not None:
                return skip(*problem)
            item.features = payload
            item.roles = tuple(r for r in ("student", "teacher") if f"{r}.{variant}" in header)
        return item

    def _finish(self, items: list[_Item]) -> dict:
        height, width = items[0].bucket
        batch = collate([{"image": to_tensor(resize_crop(it.image, height, width, it.crop)), "prompt": it.prompt,
                          "key": it.key, "references": [to_tensor(r) for r in it.references]} for it in items])
        batch["shard"] = [it.shard for it in items]
        roles = [r for r in ("student", "teacher") if all(r in it.roles for it in items)]
        if roles:
            loaded = [load_features(it.features) for it in items]
            for role in roles:
                batch[f"{role}_context"] = [f[f"{role}.{it.variant}"] for f, it in zip(loaded, items)]
        return batch

    # --- batches ---------------------------------------------------------------------------------
    def worker_records(self, epoch: int, worker: int, plan: EpochPlan, skip: int):
        """This worker's batches of `epoch` after its first `skip` ones (replayed, not delivered), each with a
        "_meta" entry: worker, batch index, bad-sample events since the previous record, samples read. Records
        without "image" carry events only (so a flood of bad samples reaches the ceiling check early)."""
        budget = plan.budgets[worker]
        if skip >= budget:
            return
        events: list = []
        state = {"raw": 0, "read": 0, "failure": None}  # samples inspected / read from the tar stream (ahead by
        # the shuffle buffer); the first error of the shard being read
        seen_at = 0
        emitted = 0
        bad_run = 0
        bad_limit = 2 * (self.expected_samples or 10_000) + self.shuffle_buffer + 100
        pending: dict[tuple, list[_Item]] = {}
        shards = plan.shards[worker] if plan.shards else []

        def meta() -> dict:
            nonlocal seen_at
            out = {"epoch": epoch, "worker": worker, "batch": emitted, "events": list(events),
                   "seen": state["raw"] - seen_at}
            events.clear()
            seen_at = state["raw"]
            return out

        for raw in self._raw_samples(epoch, worker, shards, events, state):
            item = self._inspect(raw, epoch, events)
            if item is None:
                bad_run += 1
                if bad_run > bad_limit:
                    last = f"{events[-1][0]} in {events[-1][1]} key {events[-1][2]}: {events[-1][3]}" if events else "?"
                    raise DataError(f"data.path: rank {self.rank} reader {worker} read {bad_run} bad samples in a row "
                                    f"and no usable one (last: {last}); see the warnings above")
                if emitted >= skip and len(events) >= FLUSH_EVENTS:
                    yield {"_meta": meta()}
                continue
            bad_run = 0
            members = pending.setdefault(item.batch_key, [])
            members.append(item)
            if len(members) < self.batch_size:
                continue
            del pending[item.batch_key]
            if emitted < skip:  # replay: delivered before the checkpoint
                emitted += 1
                meta()
                continue
            batch = self._finish(members)
            batch["_meta"] = meta()
            emitted += 1
            yield batch
            if emitted >= budget:
                return


class _Stream(torch.utils.data.IterableDataset):
    """All epochs of one rank from a position on: DataLoader worker i runs reader worker i, epoch after epoch
    (one set of worker processes for the whole run)."""

    def __init__(self, reader: Reader, epoch: int, done: list[int]):
        self.reader, self.epoch, self.done = reader, epoch, done

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        try:
            for epoch in itertools.count(self.epoch):
                skip = self.done[worker] if epoch == self.epoch else 0
                yield from self.reader.worker_records(epoch, worker, self.reader.plan(epoch), skip)
        except DataError as e:  # handed over as a record: torch would wrap a worker's traceback into the message
            yield {"_fatal": str(e)}


# ---------------------------------------------------------------------------------------------------
# Shards lost before reading

def _lost_entry(kind: str, samples: int, why: str, counted: bool, shards: int = 1) -> dict:
    """`samples` lost (0: unknown, weighs 1); `counted`: they are part of the shard counts (the shard is listed and
    indexed), else they add to the data set's size."""
    return {"kind": kind, "samples": samples, "why": why, "counted": counted, "shards": shards}


def _is_directory(path: str) -> bool:
    return "::" not in path and not path.startswith("pipe:") and "{" not in path and Path(path).is_dir()


def _directory_losses(directory: Path, listed: set[str], indexed_samples: int, lost: dict) -> int:
    """Shards of a make-shards directory that are gone: NAME.tar.json without NAME.tar, and shards its complete
    dataset.json counts beyond the ones found. Adds them to `lost`; returns how many shards are gone."""
    gone = 0
    orphan_samples = 0
    for index in sorted(directory.glob("*.tar.json")):
        tar = str(index.with_name(index.name[:-len(".json")]))
        if tar in listed:
            continue
        ix = read_index(tar)
        n = ix["samples"] if isinstance(ix, dict) and isinstance(ix.get("samples"), int) else 0
        lost[tar] = _lost_entry("unreadable_shard", n, "the file does not exist, its index does", counted=False)
        gone += 1
        orphan_samples += n
    try:
        manifest = json.loads((directory / "dataset.json").read_text())
    except (OSError, ValueError):
        return gone
    if not isinstance(manifest, dict) or not manifest.get("complete"):
        return gone
    shards, samples = manifest.get("shards"), manifest.get("samples")
    if isinstance(shards, int) and isinstance(samples, int) and shards > len(listed) + gone:
        n = shards - len(listed) - gone
        lost[str(directory / "dataset.json")] = _lost_entry(
            "unreadable_shard", max(samples - indexed_samples - orphan_samples, 0),
            f"it lists {shards} shards, {n} of them gone with their indexes", counted=False, shards=n)
        gone += n
    return gone


# ---------------------------------------------------------------------------------------------------
# The data source

class WebDatasetSource:
    """The data-source surface of dopsd/data/__init__.py over WebDataset shards (see the module docstring)."""

    def __init__(self, cfg, rank: int = 0, world_size: int = 1):
        d = cfg.data
        self.rank, self.world = rank, world_size
        self.batch_size = cfg.train.batch_size
        self.seed = cfg.train.seed
        self.max_bad_fraction = d.max_bad_fraction
        self.path = d.path
        self.urls = expand_shard_urls(d.path)
        survey = broadcast_object(self._safe_survey(d) if rank == 0 else None)
        if "error" in survey:  # raised on every rank alike
            kind, message = survey["error"]
            raise (DataPathError if kind == "path" else DataError)(message)
        counts = survey["counts"]
        self.counts: dict[str, int] | None = counts
        known = counts is not None
        self.num_samples = sum(counts.values()) if known else d.steps_per_epoch * self.batch_size * world_size
        self.steps_per_epoch = d.steps_per_epoch or -(-self.num_samples // (self.batch_size * world_size))
        if self.steps_per_epoch <= 0:
            raise DataError(f"data.path: the shards in {d.path!r} hold no readable sample (the warnings above name "
                            f"each shard)")
        self._check_lost_shards(survey, d.path)
        self.sampling = d.sampling
        if d.sampling == "epoch":
            mine = len(range(rank, len(self.urls), world_size))
            if len(self.urls) < world_size:  # (on every rank alike, not only on those without a shard)
                raise DataError(f"data.path: {len(self.urls)} shards for {world_size} ranks; every rank needs at "
                                f"least one (write smaller shards, or use data.sampling=resampled)")
            self.workers = min(max(1, d.num_workers), mine)
        else:
            self.workers = max(1, d.num_workers)
        self.use_loader = d.num_workers > 0
        use_features = d.cached_features and cfg.model.backend in CACHEABLE_BACKENDS
        if d.cached_features and not use_features and rank == 0:
            log.info("data: backend %s does not use cached features (supported: %s); encoding live",
                     cfg.model.backend, ", ".join(CACHEABLE_BACKENDS))
        self._check_cached_settings(d, use_features)
        fingerprint = broadcast_object(encoder_fingerprint(cfg.model, d) if use_features and rank == 0 else None)
        self.reader = Reader(
            rank=rank, batch_size=self.batch_size, seed=self.seed, buckets=resolve_buckets(d), sampling=d.sampling,
            shuffle=d.shuffle, shuffle_buffer=d.shuffle_buffer, placeholder=d.placeholder,
            replacement=d.placeholder_replacement, all_urls=self.urls, world=world_size, workers=self.workers,
            steps_per_epoch=self.steps_per_epoch, counts=counts, use_features=use_features,
            fingerprint=fingerprint or "", feature_dim=feature_dims(cfg.model) if use_features else None,
            max_student_tokens=cfg.model.max_text_tokens, max_teacher_tokens=cfg.model.teacher_max_tokens,
            expected_samples=sum(counts.values()) if known else 0, caption=d.caption,
            caption_dropout=d.caption_dropout, crop=d.crop)
        self.lost_shards = survey["lost"]
        self.global_offsets = [rank * self.batch_size + j for j in range(self.batch_size)]
        self.skipped: Counter[str] = Counter()  # everything this rank has seen so far, by kind
        self._committed: Counter[str] = Counter()  # ... in the batches it has consumed (stored in positions)
        self.seen = self.bad = self.lost = 0  # samples read, bad, and lost in shards (part of both) by this rank
        self._committed_seen = self._committed_bad = self._committed_lost = 0
        self._pending: dict[tuple[int, int, int], dict] = {}  # counters of records not consumed yet
        if rank == 0:
            log.info("data: %d shards, %s samples, %d steps per epoch x %d ranks x batch %d, %d reader workers "
                     "per rank, %s sampling, buckets %s%s", len(self.urls), self.num_samples if known else "?",
                     self.steps_per_epoch, world_size, self.batch_size, self.workers, d.sampling,
                     self.reader.buckets, ", cached features used when present" if use_features else "")

    @staticmethod
    def _check_cached_settings(d, use_features: bool) -> None:
        """Settings that change a sample's caption or pixels after make-shards cached its features: refused when
        those features are used (they were made for the shard's own captions and centre crops)."""
        problems = [("data.caption_dropout", d.caption_dropout > 0, "the empty caption's features are not in them"),
                    ("data.caption", "{caption}" in d.caption, "the template's captions were not encoded"),
                    ("data.crop", d.crop == "random", "their teacher features hold the centre crop")]
        for key, found, why in problems:
            if use_features and found:
                raise DataError(f"{key}: {getattr(d, key[5:])!r} does not go with the features cached in the shards "
                                f"(data.cached_features=true): {why}; set data.cached_features=false to encode "
                                f"live, or leave {key} at its default")

    def dataset_entry(self) -> dict:
        """This dataset's part of `describe()` (dopsd/data/__init__.py). Buckets are only known once read: {}."""
        return {"path": self.path, "type": "webdataset", "samples": self.num_samples, "skipped": dict(self.skipped),
                "bad_files": [{"path": str(local_path(u) or u), "kind": e["kind"], "why": e["why"]}
                              for u, e in self.lost_shards.items()],
                "buckets": {}, "steps_per_epoch": self.steps_per_epoch}

    def describe(self) -> dict:
        return description([self.dataset_entry()], self.steps_per_epoch)

    def _safe_survey(self, d) -> dict:
        """_survey, with its errors handed to every rank (an exception on rank 0 alone would leave the others
        waiting in the broadcast)."""
        try:
            return self._survey(d)
        except DataError as e:
            return {"error": ("data", str(e))}
        except OSError as e:
            return {"error": ("data", f"data.path: {type(e).__name__}: {first_line(e)}")}

    def _survey(self, d) -> dict:
        """Rank 0, before any batch: samples per shard ("counts": from the indexes make-shards writes, else counted
        by reading the shards once; None with data.steps_per_epoch and plain shards), the shards already lost
        ("lost": see _lost_entry) and how many shards the data set has ("shards"); {"error": ...} when no named file
        exists. Lost: local files that do not exist; files whose size differs from their index's (only these are
        read, to count what is left); for a directory, indexes without their shard, and shards that its dataset.json
        (make-shards' manifest) lists beyond those. Stats and small reads: no model, backend or process group."""
        files = {u: local_path(u) for u in self.urls}
        absent = [u for u, f in files.items() if f is not None and not f.is_file()]
        if len(absent) == len(self.urls):
            hint = ""
            if any(c in d.path for c in "*?["):
                hint = ("; glob patterns are not expanded: use a directory or a brace pattern like "
                        "shard-{000000..000099}.tar")
            which = "the shard file" if len(self.urls) == 1 else f"any of the {len(self.urls)} shard files"
            return {"error": ("path", f"data.path: {d.path!r} names no existing file: {which} "
                                      f"({self.urls[0]}{', ...' if len(self.urls) > 1 else ''}) does not exist{hint}")}
        indexes = {u: read_index(u) for u in self.urls}
        known = {u: ix["samples"] for u, ix in indexes.items() if ix is not None and isinstance(ix.get("samples"), int)}
        lost = {u: _lost_entry("unreadable_shard", known.get(u, 0), "the file does not exist", counted=u in known)
                for u in absent}
        for u, n in known.items():
            size = indexes[u].get("bytes")
            if u in lost or not isinstance(size, int) or files[u] is None or files[u].stat().st_size == size:
                continue
            readable = count_samples([u])[u]
            if readable < n:
                lost[u] = _lost_entry("truncated_shard", n - readable, f"{files[u].stat().st_size} bytes where its "
                                      f"index says {size}: {readable} of its {n} samples readable", counted=True)
        shards = len(self.urls)
        if _is_directory(d.path):
            shards += _directory_losses(Path(d.path), set(self.urls), sum(known.values()), lost)
        if len(known) == len(self.urls):
            counts = dict(known)
        elif d.steps_per_epoch:
            counts = None
        else:
            unindexed = [u for u in self.urls if u not in known]
            log.warning("data: %d of %d shards have no index (NAME.tar.json from dopsd make-shards); counting their "
                        "samples by reading them once (set data.steps_per_epoch to skip this)", len(unindexed),
                        len(self.urls))
            counted = count_samples([u for u in unindexed if u not in lost])
            counts = {u: known[u] if u in known else counted.get(u, 0) for u in self.urls}
        return {"counts": counts, "lost": lost, "shards": shards}

    def _check_lost_shards(self, survey: dict, path: str) -> None:
        """data.max_bad_fraction over the whole data set for the shards known lost before reading (every rank)."""
        lost = survey["lost"]
        if not lost:
            return
        f = self.max_bad_fraction
        samples = sum(e["samples"] or 1 for e in lost.values())  # unknown counts weigh 1, as when read
        total = (sum(self.counts.values()) if self.counts is not None else self.num_samples) + sum(
            e["samples"] or 1 for e in lost.values() if not e["counted"])
        names = ", ".join(f"{Path(local_path(u) or u).name} ({e['why']})" for u, e in list(lost.items())[:5])
        names += f" and {len(lost) - 5} more" if len(lost) > 5 else ""
        by_index = " (counted from the shard indexes)" if any(e["samples"] for e in lost.values()) else ""
        what = (f"{sum(e['shards'] for e in lost.values())} of the {survey['shards']} shards of data.path are missing "
                f"or truncated: {samples} of {total} samples lost{by_index}")
        if f < 1.0 and samples > f * total:
            raise DataError(f"data: {what}, {samples / max(total, 1):.1%} > data.max_bad_fraction={f}: {names}. "
                            f"Restore them (re-run dopsd make-shards with the same input and output), take them out "
                            f"of data.path ({path!r}), or raise data.max_bad_fraction")
        if self.rank == 0:
            log.warning("data: %s, within data.max_bad_fraction=%s; they count as bad samples when read: %s",
                        what, f, names)

    def plan(self, epoch: int) -> EpochPlan:
        return self.reader.plan(epoch)

    # --- accounting ------------------------------------------------------------------------------
    def _account(self, meta: dict) -> None:
        """Counts a record's events: a bad sample weighs 1; a lost shard the samples lost in it (1 if unknown), which
        are also counted as read (the samples actually read from it are in meta["seen"])."""
        key = (meta["epoch"], meta["worker"], meta["batch"])
        slot = self._pending.setdefault(key, {"kinds": Counter(), "seen": 0, "bad": 0, "lost": 0})
        bad = shard_weight = lost = 0
        for kind, shard, sample_key, why, shard_lost in meta["events"]:
            log.warning("data: skipping %s key %s (%s): %s", shard, sample_key, kind, why)
            self.skipped[kind] += 1
            slot["kinds"][kind] += 1
            weight = shard_lost or 1
            bad += weight
            lost += shard_lost
            if sample_key == "-":  # not a raw sample: what it stands for counts as read
                shard_weight += weight
        self.bad += bad
        self.lost += lost
        self.seen += meta["seen"] + shard_weight
        for name, value in (("seen", meta["seen"] + shard_weight), ("bad", bad), ("lost", lost)):
            slot[name] += value
        self._check_ceiling(meta["epoch"])

    def _commit(self, meta: dict) -> None:
        slot = self._pending.pop((meta["epoch"], meta["worker"], meta["batch"]), None)
        if slot is None:
            return
        self._committed.update(slot["kinds"])
        self._committed_bad += slot["bad"]
        self._committed_seen += slot["seen"]
        self._committed_lost += slot["lost"]

    def _check_ceiling(self, epoch: int, epoch_end: bool = False) -> None:
        """DataError when more than data.max_bad_fraction is bad (the three checks of the module docstring)."""
        f = self.max_bad_fraction
        if self.bad == 0 or f >= 1.0:
            return
        rank = f"rank {self.rank}"
        if epoch_end:
            if self.bad > f * max(self.seen, 1):
                self._ceiling(f"{self.bad} of {self.seen} samples read on {rank} were bad",
                              self.bad / max(self.seen, 1))
            return
        if self.lost:  # whole shards: against what the rank reads by the end of this epoch
            horizon = max(self.seen, self.steps_per_epoch * self.batch_size * (epoch + 1))
            if self.lost > f * horizon:
                self._ceiling(f"{self.lost} samples are lost in missing or truncated shards, of the {horizon} {rank} "
                              f"reads by the end of epoch {epoch}", self.lost / horizon)
        bad, seen = self.bad - self.lost, self.seen - self.lost  # bad samples: a running estimate
        if bad and (f == 0 or seen >= 1.0 / f) and bad > f * max(seen, 1):
            self._ceiling(f"{self.bad} of {self.seen} samples read on {rank} were bad", bad / max(seen, 1))

    def _ceiling(self, what: str, fraction: float) -> None:
        f = self.max_bad_fraction
        hint = ""
        if self.lost:
            hint += (f" {self.lost} of the bad samples are in shards that are missing or truncated (counted from "
                     f"their indexes): restore them (re-run dopsd make-shards with the same input and output) or "
                     f"take them out of data.path.")
        if self.skipped.get("feature_fingerprint", 0) * 2 >= self.bad - self.lost > 0:  # features of another model
            hint += (" Cached features were made for another model or setting: re-run dopsd make-shards with "
                     "this config, or set data.cached_features=false to encode live.")
        raise DataError(f"data: {what} ({fraction:.1%} > data.max_bad_fraction={f}): {dict(self.skipped)}. The "
                        f"warnings above name each shard and key.{hint}")

    # --- batches ---------------------------------------------------------------------------------
    def _position(self, epoch: int, step: int, done: list[int]) -> dict:
        return {"epoch": epoch, "step_in_epoch": step, "seed": self.seed, "samples": step * self.batch_size,
                "batch_size": self.batch_size, "steps_per_epoch": self.steps_per_epoch, "workers": self.workers,
                "worker_batches": list(done), "sampling": self.sampling, "skipped": dict(self._committed),
                "seen": self._committed_seen, "bad": self._committed_bad, "lost": self._committed_lost}

    def _restore(self, position: dict) -> tuple[int, int, list[int]]:
        epoch, step = int(position.get("epoch", 0)), int(position.get("step_in_epoch", 0))
        if "worker_batches" not in position:
            if step:
                log.warning("data: the checkpoint's position %s is not a WebDataset position; starting epoch %d "
                            "from its beginning", position, epoch)
            return epoch, 0, [0] * self.workers
        batch = position.get("batch_size")
        if batch is None and step and position.get("samples"):  # positions before "batch_size" was recorded
            batch = int(position["samples"]) // step
        if batch is not None and int(batch) != self.batch_size:
            raise DataError(f"data: the checkpoint's data position was made with train.batch_size={batch}, this run "
                            f"has train.batch_size={self.batch_size}; resuming needs the same batch size (set "
                            f"train.batch_size={batch}, or start a new output.dir)")
        recorded = {k: position.get(k) for k in ("workers", "steps_per_epoch", "sampling")}
        current = {"workers": self.workers, "steps_per_epoch": self.steps_per_epoch, "sampling": self.sampling}
        if recorded != current:
            names = {"workers": "reader workers (data.num_workers, capped by shards per rank)",
                     "steps_per_epoch": "data.steps_per_epoch (set, or from the shards and the global batch)",
                     "sampling": "data.sampling"}
            diff = "; ".join(f"{names[k]}: {recorded[k]} then, {current[k]} now" for k in recorded
                             if recorded[k] != current[k])
            raise DataError(f"data: the checkpoint's data position does not fit this run ({diff}); resuming needs the "
                            f"same data.num_workers, shards, data.steps_per_epoch and data.sampling (restore them, or "
                            f"start a new output.dir)")
        if position.get("seed", self.seed) != self.seed:
            log.warning("data: train.seed changed since the checkpoint; keeping its data order (seed %s)",
                        position["seed"])
            self.seed = self.reader.seed = int(position["seed"])
        self._committed = Counter(position.get("skipped", {}))
        self.skipped = Counter(self._committed)
        self._committed_seen = self.seen = int(position.get("seen", 0))
        self._committed_bad = self.bad = int(position.get("bad", 0))
        self._committed_lost = self.lost = int(position.get("lost", 0))
        return epoch, step, [int(k) for k in position["worker_batches"]]

    def _records(self, epoch: int, done: list[int]):
        stream = _Stream(self.reader, epoch, list(done))
        if not self.use_loader:
            return iter(stream)
        # fork (as torchrun-launched ranks do by default): workers need no CUDA, and start in milliseconds
        context = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        return iter(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.workers, prefetch_factor=2,
                                                multiprocessing_context=context))

    def batches(self, position: dict):
        epoch, step, done = self._restore(position or {})
        records = self._records(epoch, done)
        waiting: dict[int, deque] = {w: deque() for w in range(self.workers)}
        while True:
            plan = self.plan(epoch)
            if [plan.order[:step].count(w) for w in range(self.workers)] != done:
                raise DataError(f"data: the checkpoint's data position (batches per reader worker {done}) does not "
                                f"match step {step} of epoch {epoch} of this run's plan: were the shards in data.path "
                                f"changed? Restore them, or start a new output.dir")
            for t in range(step, self.steps_per_epoch):
                want = plan.order[t]
                while not waiting[want]:  # batches arrive in worker order; take them in the plan's order
                    meta_record = next(records)
                    if "_fatal" in meta_record:
                        raise DataError(meta_record["_fatal"])
                    meta = meta_record.pop("_meta")
                    self._account(meta)
                    if "image" in meta_record:
                        waiting[meta["worker"]].append((meta_record, meta))
                batch, meta = waiting[want].popleft()
                if meta["epoch"] != epoch:
                    raise RuntimeError(f"data: reader worker {want} delivered epoch {meta['epoch']} in epoch {epoch}")
                self._commit(meta)
                done[want] += 1
                last = t + 1 == self.steps_per_epoch
                if last:
                    self._check_ceiling(epoch, epoch_end=True)
                yield batch, (self._position(epoch + 1, 0, [0] * self.workers) if last
                              else self._position(epoch, t + 1, done))
            epoch, step, done = epoch + 1, 0, [0] * self.workers
