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

Resume. The position (epoch, seed, steps and samples consumed by this rank, batches taken from each worker,
bad-sample counters) is stored in every checkpoint. A resume replays each worker's stream up to the batches it
had delivered (images are decoded to make the same decisions, but not resized, features not loaded), so the
run continues with exactly the batches the uninterrupted run would have had: nothing repeated, nothing skipped.

Bad input never stops a run: an unreadable or missing shard, a truncated tar, an undecodable image, a sample
without caption, a missing, undecodable or refused reference image, features of the wrong shape or fingerprint
are skipped with a warning naming shard and key,
counted by kind in `skipped`. When more than `data.max_bad_fraction` of what a rank read was bad (checked once
it has read 1 / max_bad_fraction samples, and at every epoch end), the run stops with a message saying why.
"""
from __future__ import annotations

import io
import itertools
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
from .folder import collate, resize_center_crop, to_tensor
from .references import load_reference, member_slot, ordered, reference_sizes
from .sampler import sample_seed
from .shard_io import count_samples, expand_shard_urls, first_line, read_index, split_shards, tar_samples
from .shard_format import (CACHEABLE_BACKENDS, FEATURES_EXT, IMAGE_EXTS, apply_placeholder, assign_bucket,
                           check_features, encoder_fingerprint, feature_dims, load_features, read_features_header,
                           resolve_buckets, sample_captions)

log = logging.getLogger(__name__)

FLUSH_EVENTS = 64  # a worker reports bad samples without waiting for a batch once this many are pending


class DataError(RuntimeError):
    """The data are too bad to train on (data.max_bad_fraction exceeded, or nothing readable)."""


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
        that a pass never mixes with the next. DataError when a whole pass yields nothing."""
        flagged: set[tuple[str, int]] = set()

        def handler(exn: Exception) -> bool:
            url = state.get("url", "?")
            if isinstance(exn, (tarfile.TarError, EOFError)):
                kind = "truncated_shard"
            elif isinstance(exn, OSError):
                kind = "unreadable_shard"
            else:
                kind = "bad_sample"
            if kind == "bad_sample" or (url, state["read"]) not in flagged:  # one report per shard visit
                flagged.add((url, state["read"]))
                events.append((kind, url, "-", f"{type(exn).__name__}: {first_line(exn)}"))
            return True

        def source(urls: list[str]):
            for url in urls:
                state["url"] = url
                yield {"url": url}

        def counted(stream):
            for sample in stream:
                state["read"] += 1
                yield sample

        pool = self.all_urls if self.sampling == "resampled" else shards
        draws = random.Random(sample_seed(self.seed, epoch, self.rank, worker, 0x5E))
        for n in itertools.count():
            urls = [draws.choice(pool) for _ in pool] if self.sampling == "resampled" else list(pool)
            samples = counted(tar_samples(source(urls), handler))
            if self.shuffle and self.shuffle_buffer > 1:
                rng = random.Random(sample_seed(self.seed, epoch, self.rank, worker, n, 0xB0F))
                samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
            before = state["read"]
            for sample in samples:
                state["raw"] += 1
                yield sample
            if state["read"] == before:
                raise DataError(f"rank {self.rank} reader {worker}: none of its shards yields a sample "
                                f"({', '.join(pool[:3])}{', ...' if len(pool) > 3 else ''})")

    # --- per sample checks (cheap enough to replay on resume) -------------------------------------
    def _inspect(self, raw: dict, epoch: int, events: list) -> _Item | None:
        key, url = str(raw.get("__key__", "?")), str(raw.get("__url__", "?"))

        def skip(kind: str, why: str) -> None:
            events.append((kind, url, key, why))

        ext = next((e for e in IMAGE_EXTS if raw.get(e) is not None), None)
        if ext is None:
            return skip("missing_image", f"no {'/'.join(IMAGE_EXTS)} member")
        try:
            captions = sample_captions(raw)
        except (ValueError, UnicodeDecodeError) as e:
            return skip("bad_caption", f"{type(e).__name__}: {e}")
        if not captions:
            return skip("missing_caption", "no caption (json captions/caption or txt)")
        try:  # decoded in full: a truncated file passes a header check and fails later otherwise
            image = Image.open(io.BytesIO(raw[ext]))
            image.load()
        except Exception as e:  # PIL raises many types for bad bytes
            return skip("bad_image", f"{type(e).__name__}: {e}")
        try:
            slots = {member_slot(k): v for k, v in raw.items() if isinstance(k, str) and member_slot(k) is not None}
            references = tuple(load_reference(data) for data in ordered(slots))
        except Exception as e:  # PIL raises many types for bad bytes; the pipeline's checks raise ValueError
            return skip("bad_reference", f"{type(e).__name__}: {e}")
        bucket = assign_bucket(image.width, image.height, self.buckets)
        rng = random.Random(sample_seed(self.seed, epoch, zlib.crc32(f"{Path(url).name}/{key}".encode())))
        variant = rng.randrange(len(captions))
        item = _Item(key, url, image, bucket, apply_placeholder(captions[variant], self.placeholder,
                                                                self.replacement), variant, references=references)
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
        batch = collate([{"image": to_tensor(resize_center_crop(it.image, height, width)), "prompt": it.prompt,
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
        state = {"raw": 0, "read": 0}  # samples inspected / read from the tar stream (ahead by the buffer)
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
                    raise DataError(f"rank {self.rank} reader {worker}: {bad_run} bad samples in a row and no usable "
                                    f"one; last: {events[-1] if events else '?'}")
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
        for epoch in itertools.count(self.epoch):
            skip = self.done[worker] if epoch == self.epoch else 0
            yield from self.reader.worker_records(epoch, worker, self.reader.plan(epoch), skip)


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
        self.urls = expand_shard_urls(d.path)
        counts = broadcast_object(self._counts(d) if rank == 0 else None)
        self.counts: dict[str, int] | None = counts
        known = counts is not None
        self.num_samples = sum(counts.values()) if known else d.steps_per_epoch * self.batch_size * world_size
        self.steps_per_epoch = d.steps_per_epoch or -(-self.num_samples // (self.batch_size * world_size))
        if self.steps_per_epoch <= 0:
            raise DataError(f"data.path: the shards in {d.path!r} hold no samples")
        self.sampling = d.sampling
        if d.sampling == "epoch":
            mine = len(range(rank, len(self.urls), world_size))
            if mine == 0:
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
        fingerprint = broadcast_object(encoder_fingerprint(cfg.model, d) if use_features and rank == 0 else None)
        self.reader = Reader(
            rank=rank, batch_size=self.batch_size, seed=self.seed, buckets=resolve_buckets(d), sampling=d.sampling,
            shuffle=d.shuffle, shuffle_buffer=d.shuffle_buffer, placeholder=d.placeholder,
            replacement=d.placeholder_replacement, all_urls=self.urls, world=world_size, workers=self.workers,
            steps_per_epoch=self.steps_per_epoch, counts=counts, use_features=use_features,
            fingerprint=fingerprint or "", feature_dim=feature_dims(cfg.model) if use_features else None,
            max_student_tokens=cfg.model.max_text_tokens, max_teacher_tokens=cfg.model.teacher_max_tokens,
            expected_samples=sum(counts.values()) if known else 0)
        self.global_offsets = [rank * self.batch_size + j for j in range(self.batch_size)]
        self.skipped: Counter[str] = Counter()  # everything this rank has seen so far, by kind
        self._committed: Counter[str] = Counter()  # ... in the batches it has consumed (stored in positions)
        self.seen = self.bad = 0
        self._committed_seen = self._committed_bad = 0
        self._pending: dict[tuple[int, int, int], list] = {}
        if rank == 0:
            log.info("data: %d shards, %s samples, %d steps per epoch x %d ranks x batch %d, %d reader workers "
                     "per rank, %s sampling, buckets %s%s", len(self.urls), self.num_samples if known else "?",
                     self.steps_per_epoch, world_size, self.batch_size, self.workers, d.sampling,
                     self.reader.buckets, ", cached features used when present" if use_features else "")

    def _counts(self, d) -> dict[str, int] | None:
        indexes = {u: read_index(u) for u in self.urls}
        if all(ix is not None and isinstance(ix.get("samples"), int) for ix in indexes.values()):
            return {u: ix["samples"] for u, ix in indexes.items()}
        if d.steps_per_epoch:
            return None
        missing = [u for u, ix in indexes.items() if ix is None]
        log.warning("data: %d of %d shards have no index (NAME.tar.json from dopsd make-shards); counting their "
                    "samples by reading them once (set data.steps_per_epoch to skip this)", len(missing), len(self.urls))
        counted = count_samples(missing)
        return {u: (ix["samples"] if ix is not None and isinstance(ix.get("samples"), int) else counted[u])
                for u, ix in indexes.items()}

    def plan(self, epoch: int) -> EpochPlan:
        return self.reader.plan(epoch)

    # --- accounting ------------------------------------------------------------------------------
    def _account(self, meta: dict) -> None:
        key = (meta["epoch"], meta["worker"], meta["batch"])
        slot = self._pending.setdefault(key, [Counter(), 0])
        for kind, shard, sample_key, why in meta["events"]:
            log.warning("data: skipping %s key %s (%s): %s", shard, sample_key, kind, why)
            self.skipped[kind] += 1
            slot[0][kind] += 1
        bad = len(meta["events"])
        shard_events = sum(1 for e in meta["events"] if e[2] == "-")
        self.bad += bad
        self.seen += meta["seen"] + shard_events
        slot[1] += meta["seen"] + shard_events
        self._check_ceiling()

    def _commit(self, meta: dict) -> None:
        counts, seen = self._pending.pop((meta["epoch"], meta["worker"], meta["batch"]), [Counter(), 0])
        self._committed.update(counts)
        self._committed_bad += sum(counts.values())
        self._committed_seen += seen

    def _check_ceiling(self, epoch_end: bool = False) -> None:
        f = self.max_bad_fraction
        if self.bad == 0 or f >= 1.0:
            return
        if not (epoch_end or f == 0 or self.seen >= 1.0 / f):
            return
        if self.bad > f * max(self.seen, 1):
            hint = ""
            if self.skipped.get("feature_fingerprint", 0) * 2 >= self.bad:  # mostly features of another model
                hint = (" Cached features were made for another model or setting: re-run dopsd make-shards with "
                        "this config, or set data.cached_features=false to encode live.")
            raise DataError(f"data: {self.bad} of {self.seen} samples read on rank {self.rank} were bad "
                            f"({self.bad / max(self.seen, 1):.1%} > data.max_bad_fraction={f}): "
                            f"{dict(self.skipped)}. The warnings above name each shard and key.{hint}")

    # --- batches ---------------------------------------------------------------------------------
    def _position(self, epoch: int, step: int, done: list[int]) -> dict:
        return {"epoch": epoch, "step_in_epoch": step, "seed": self.seed, "samples": step * self.batch_size,
                "steps_per_epoch": self.steps_per_epoch, "workers": self.workers, "worker_batches": list(done),
                "sampling": self.sampling, "skipped": dict(self._committed), "seen": self._committed_seen,
                "bad": self._committed_bad}

    def _restore(self, position: dict) -> tuple[int, int, list[int]]:
        epoch, step = int(position.get("epoch", 0)), int(position.get("step_in_epoch", 0))
        if "worker_batches" not in position:
            if step:
                log.warning("data: the checkpoint's position %s is not a WebDataset position; starting epoch %d "
                            "from its beginning", position, epoch)
            return epoch, 0, [0] * self.workers
        recorded = {k: position.get(k) for k in ("workers", "steps_per_epoch", "sampling")}
        current = {"workers": self.workers, "steps_per_epoch": self.steps_per_epoch, "sampling": self.sampling}
        if recorded != current:
            raise ValueError(f"data: the checkpoint's data position was made with {recorded}, this run has {current}; "
                             f"resuming mid-epoch needs the same data.num_workers, shards and data.steps_per_epoch")
        if position.get("seed", self.seed) != self.seed:
            log.warning("data: train.seed changed since the checkpoint; keeping its data order (seed %s)",
                        position["seed"])
            self.seed = self.reader.seed = int(position["seed"])
        self._committed = Counter(position.get("skipped", {}))
        self.skipped = Counter(self._committed)
        self._committed_seen = self.seen = int(position.get("seen", 0))
        self._committed_bad = self.bad = int(position.get("bad", 0))
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
                raise ValueError(f"data: checkpoint position {done} does not match step {step} of epoch {epoch}")
            for t in range(step, self.steps_per_epoch):
                want = plan.order[t]
                while not waiting[want]:  # batches arrive in worker order; take them in the plan's order
                    meta_record = next(records)
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
                    self._check_ceiling(epoch_end=True)
                yield batch, (self._position(epoch + 1, 0, [0] * self.workers) if last
                              else self._position(epoch, t + 1, done))
            epoch, step, done = epoch + 1, 0, [0] * self.workers
