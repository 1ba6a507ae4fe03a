"""Image folders (`data.type: folder`) and JSONL manifests (`data.type: manifest`) as a data source.

Folder: `name.png|jpg|jpeg|webp` beside `name.txt` (one prompt variant per line) or `name.json` (a list of
variants, or a mapping such as {"short": ..., "detailed": ...}).
Manifest: `data.path` is a `.jsonl` file, one JSON object per line, paths relative to the manifest:
  {"image": "imgs/dog1.jpg", "caption": "a photo of [V] dog"}   or   {"image": ..., "captions": [...] | {...}}
(also read: "path"/"file_name"/"file" for the image, "text"/"prompt" for the caption, "references": [paths]).
A line that is not a JSON object ("bad_record") or names no existing image ("missing_image") is skipped and
counted like a bad folder sample.

Captions, in this order of precedence (the first that a sample has is used):
  1. the manifest line's caption field (manifests only);
  2. `NAME.txt` beside the image;  3. `NAME.json` beside the image;
  4. `data.caption`, the dataset's default caption ("a photo of [V] dog"): with it, caption files are optional.
A `data.caption` holding "{caption}" is a template instead ("photo of [V] dog, {caption}"): every caption variant
found by 1-3 is put into it, and a sample without one is skipped (missing_caption). A caption file that exists
but is broken is always "bad_caption", never replaced by the default. The placeholder rule (data.placeholder ->
data.placeholder_replacement) applies after all this. `data.caption_dropout` p: each sample's caption is replaced
by the empty caption "" (what the model encodes as no caption) with probability p, drawn per (train.seed, epoch,
sample index), so every rank layout and a resume drop the same samples.

Sizes. Without aspect buckets (`data.aspect_buckets: false` and `data.buckets` empty, the default) every image is
resized and cropped to `data.resolution`. With them, each image goes to the bucket of nearest aspect ratio,
the same assignment and bucket list as the shard reader (shard_format.assign_bucket over resolve_buckets:
data.buckets, or the paper's list scaled to data.resolution). `data.crop`: center, or random (the offset of the
crop after the resize drawn per (train.seed, epoch, sample index): the same on every rank and after a resume).
The sampler draws every global batch from one bucket (sampler.py `groups`), so all ranks hold the same shapes
at every step.

Editing data (FLUX.2-klein): `name.ref0.png`, `name.ref1.png`, ... beside the sample are its reference images
(the inputs the caption, an edit instruction, applies to; the sample's image is the expected result). A file
`X.refN.<ext>` is a reference whenever an image `X.<ext>` exists; see references.py for the preprocessing.
References keep their (preprocessed) sizes; they are part of the bucket key, so batches stack on every rank.

One variant is drawn per sample per step, as the recipe does with its prompt fields. Bad samples (no
caption, unreadable or corrupt image or reference; samples.py judges) are skipped with a warning and counted by kind.

Bad data and data.max_bad_fraction (as for shards, see wds_source.py). The folder is scanned in full when the
source is built (every image and reference decoded), so the ceiling is checked there, once, on every file: more
than max_bad_fraction of the folder's samples bad raises DataError before any model is loaded. Like the shard
reader's running check, it applies once there are 1 / max_bad_fraction samples (100 at the default 0.01; always
when it is 0): in a smaller folder a fraction says little (2 bad of 5), and the bad files are only skipped. A folder
with no image, or whose every image is bad, is always a DataError. A file that goes bad after the scan is replaced
by the next sample of its bucket and counted, but does not stop the run (the scan judged the data).
Positions record the global batch (train.batch_size x ranks): a resume with another one is a DataError.
"""
from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from .errors import DataError, DataPathError, worker_message
from .images import is_image_file, resize_crop, to_tensor
from .references import folder_layout, load_reference, reference_files, reference_sizes
from .samples import (BadSample, caption_dropped, check_sample, collate, crop_rng, description, first_captions,
                      folder_captions, manifest_captions, manifest_image, manifest_object, manifest_references,
                      with_default)
from .shard_format import assign_bucket, resolve_buckets

log = logging.getLogger(__name__)


@dataclass
class Item:
    image: Path
    captions: list[str]
    references: tuple[Path, ...] = ()
    ref_sizes: tuple[tuple[int, int], ...] = ()  # (h, w) of each prepared reference: part of the sample's bucket
    size: tuple[int, int] = (0, 0)  # (h, w) the image is resized and cropped to


# A sample as listed: image path, its captions (raise BadSample), its reference sources (raise ValueError).
Entry = tuple[Path, Callable[[], list[str]], Callable[[], list]]


class FolderDataset(torch.utils.data.Dataset):
    """An image folder, or a JSONL manifest with `manifest=True` (`root` is then the .jsonl file)."""

    def __init__(self, root: str | Path, height: int, width: int, placeholder: str = "[V]",
                 placeholder_replacement: str = "", seed: int = 0, max_bad_fraction: float = 1.0, *,
                 caption: str = "", caption_dropout: float = 0.0, buckets: list[list[int]] | None = None,
                 crop: str = "center", manifest: bool = False):
        self.root = Path(root)
        if manifest and not self.root.is_file():
            what = "does not exist" if not self.root.exists() else "is not a file"
            raise DataPathError(f"data.path: {self.root} {what} (data.type=manifest needs a .jsonl file, one "
                                f'{{"image": path, "caption": ...}} per line)')
        if not manifest and not self.root.is_dir():
            what = "does not exist" if not self.root.exists() else "is not a directory"
            raise DataPathError(f"data.path: {self.root} {what} (data.type=folder needs a folder of images with "
                                f"captions; for .tar shards set data.type=webdataset, for a .jsonl manifest "
                                f"data.type=manifest)")
        self.height, self.width = height, width
        self.placeholder, self.replacement = placeholder, placeholder_replacement
        self.seed, self.caption, self.caption_dropout = seed, caption, caption_dropout
        self.bucket_list = [list(b) for b in buckets] if buckets else None
        self.crop = crop
        self.skipped: Counter[str] = Counter()
        self.bad_files: list[dict] = []  # {"path", "kind", "why"} of every sample skipped by this process
        self.items: list[Item] = []
        entries = self._manifest_entries() if manifest else self._folder_entries()
        for entry in entries:
            self._scan(*entry)
        total = len(self.items) + self.num_skipped  # every listed sample (or manifest line) is one or the other
        what, noun = ("line", "lines") if manifest else ("png/jpg/jpeg/webp image", "images")
        if not total:
            hint = "" if manifest else " (put NAME.png beside NAME.txt or NAME.json, or set data.caption)"
            raise DataError(f"data.path: no usable image+caption pairs in {self.root}: it holds no {what}{hint}")
        if not self.items:
            raise DataError(f"data.path: no usable image+caption pairs in {self.root}: all {total} {noun} are "
                            f"bad ({self._kinds()}); the warnings above name each file")
        self._check_ceiling(total, max_bad_fraction)
        self.buckets: dict[tuple, list[int]] = {}  # item indices by bucket (see _bucket)
        self._place: list[int] = []  # each item's place in its bucket
        for i, item in enumerate(self.items):
            members = self.buckets.setdefault(self._bucket(item), [])
            self._place.append(len(members))
            members.append(i)

    # --- listing and scanning --------------------------------------------------------------------
    def _folder_entries(self) -> list[Entry]:
        samples, refs = folder_layout(sorted(p for p in self.root.iterdir() if is_image_file(p)))
        return [(path, partial(folder_captions, path), partial(reference_files, refs.get(path.stem, {})))
                for path in samples]

    def _manifest_entries(self) -> list[Entry]:
        entries = []
        base = self.root.parent
        try:
            text = self.root.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"data.path: cannot read the manifest {self.root} ({type(e).__name__}: {e}); it must "
                            f"be a UTF-8 text file of JSON lines") from None
        lines = [line for line in text.splitlines() if line.strip()]
        for number, line in enumerate(lines, 1):
            try:
                obj = manifest_object(line, number)
                image = manifest_image(obj, number, base)
                if not image.is_file():
                    raise BadSample("missing_image", f"line {number}: {image} does not exist")
                refs = manifest_references(obj, number, base)
            except BadSample as e:
                self._skip(e.kind, f"{self.root}:{number}", str(e))
                continue
            captions = partial(first_captions, partial(manifest_captions, obj, number), partial(folder_captions, image))
            entries.append((image, captions, partial(list, refs)))
        return entries

    def _scan(self, path: Path, captions: Callable[[], list[str]], refs: Callable[[], list]) -> None:
        try:  # decoded in full now: a truncated file passes a header check and fails mid-run otherwise
            sample = check_sample(path, with_default(captions, self.caption), refs)
        except BadSample as e:
            self._skip(e.kind, path, str(e))
            return
        size = (self.height, self.width)
        if self.bucket_list:
            size = assign_bucket(sample.image.width, sample.image.height, self.bucket_list)
        self.items.append(Item(path, sample.captions, sample.reference_sources, reference_sizes(sample.references),
                               size))

    def _bucket(self, item: Item) -> tuple:
        """What must agree within a batch: the references' sizes, and the target's with aspect buckets."""
        return (item.size, *item.ref_sizes) if self.bucket_list else item.ref_sizes

    def _kinds(self) -> str:
        return ", ".join(f"{n} {kind}" for kind, n in sorted(self.skipped.items()))

    def _check_ceiling(self, total: int, f: float) -> None:
        bad = self.num_skipped
        if f >= 1.0 or not bad or (f > 0 and total < 1.0 / f):
            return
        if bad > f * total:
            raise DataError(f"data: {bad} of the {total} samples in {self.root} are bad ({bad / total:.1%} > "
                            f"data.max_bad_fraction={f}: {self._kinds()}); the warnings above name each file. Fix or "
                            f"remove them, or raise data.max_bad_fraction")

    def _skip(self, kind: str, path: Path | str, why: str) -> None:
        self.skipped[kind] += 1
        self.bad_files.append({"path": str(path), "kind": kind, "why": why})
        log.warning("skipping %s (%s): %s", path, kind, why)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def bucket_histogram(self) -> dict[str, int]:
        return dict(Counter(f"{it.size[0]}x{it.size[1]}" for it in self.items))

    def __len__(self) -> int:
        return len(self.items)

    # --- samples ---------------------------------------------------------------------------------
    def _prompt(self, item: Item, epoch: int, index: int) -> str:
        if caption_dropped(self.caption_dropout, self.seed, epoch, index):
            return ""  # the empty caption, as the model encodes "no caption"
        rng = random.Random(hash((self.seed, epoch, index)) & 0xFFFFFFFF)
        prompt = rng.choice(item.captions)
        if self.replacement:
            prompt = prompt.replace(self.placeholder, self.replacement)
        return prompt

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """`key` is an index or (epoch, index): the epoch picks the prompt variant, the caption dropout and the
        random crop, so they are the same in any worker process and after a resume."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        crop = crop_rng(self.crop, self.seed, epoch, index)
        # A file that went bad after the scan is counted and replaced by the next item of the same bucket, so
        # that batches keep their size and shapes and every rank keeps issuing the same model calls.
        bucket = self.buckets[self._bucket(self.items[index])]
        start = self._place[index]
        for offset in range(len(bucket)):
            item = self.items[bucket[(start + offset) % len(bucket)]]
            try:
                with Image.open(item.image) as img:
                    pixels = to_tensor(resize_crop(img, *item.size, crop))
            except Exception as e:  # PIL raises many types for bad bytes
                self._skip("bad_image", item.image, f"{type(e).__name__}: {e}")
                continue
            try:
                refs = [load_reference(r) for r in item.references]
                if reference_sizes(refs) != item.ref_sizes:
                    raise ValueError(f"reference sizes changed since the scan: {reference_sizes(refs)}")
            except Exception as e:  # PIL raises many types for bad bytes; the pipeline's checks raise ValueError
                self._skip("bad_reference", item.image, f"{type(e).__name__}: {e}")
                continue
            sample = {"image": pixels, "prompt": self._prompt(item, epoch, index), "key": item.image.stem}
            if refs:
                sample["references"] = [to_tensor(r) for r in refs]
            return sample
        which = "of one bucket " if len(bucket) < len(self.items) else ""
        raise DataError(f"data.path: every sample {which}in {self.root} has become unreadable since the scan "
                        f"({len(bucket)} samples, e.g. {item.image.name}); the warnings above name each file")


class FolderSource:
    """A folder or manifest dataset behind the data-source surface (see dopsd/data/__init__.py), sampled with
    the rank-independent global-batch sampler."""

    def __init__(self, cfg, rank: int = 0, world_size: int = 1):
        from .sampler import GlobalBatchSampler

        d = cfg.data
        height, width = d.resolution
        self.dataset = FolderDataset(d.path, height, width, d.placeholder, d.placeholder_replacement,
                                     seed=cfg.train.seed, max_bad_fraction=d.max_bad_fraction, caption=d.caption,
                                     caption_dropout=d.caption_dropout, crop=d.crop, manifest=d.type == "manifest",
                                     buckets=resolve_buckets(d) if d.aspect_buckets or d.buckets else None)
        self.type = d.type
        self.batch_size, self.world = cfg.train.batch_size, world_size
        bucket_ids = {key: i for i, key in enumerate(self.dataset.buckets)}
        self.sampler = GlobalBatchSampler(len(self.dataset), cfg.train.batch_size, rank, world_size,
                                          seed=cfg.train.seed, shuffle=d.shuffle,
                                          groups=[bucket_ids[self.dataset._bucket(it)] for it in self.dataset.items])
        self.num_workers = d.num_workers
        self.num_samples = len(self.dataset)
        self.global_offsets = self.sampler.global_offsets()

    @property
    def skipped(self) -> Counter:
        return self.dataset.skipped

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def dataset_entry(self) -> dict:
        """This dataset's part of `describe()` (dopsd/data/__init__.py)."""
        ds = self.dataset
        return {"path": str(ds.root), "type": self.type, "samples": len(ds), "skipped": dict(ds.skipped),
                "bad_files": list(ds.bad_files), "buckets": ds.bucket_histogram(),
                "steps_per_epoch": self.steps_per_epoch}

    def describe(self) -> dict:
        return description([self.dataset_entry()], self.steps_per_epoch)

    def batches(self, position: dict):
        from .sampler import Position

        self.check_position(position)
        start = Position(position.get("epoch", 0), position.get("step_in_epoch", 0))
        positions = self.sampler.iterate(start)
        keys = ([(pos.epoch, i) for i in indices] for pos, indices in self.sampler.iterate(start))
        if self.num_workers:  # workers keep the order; counts of files that go bad mid-run stay in them
            loaded = iter(torch.utils.data.DataLoader(self.dataset, batch_sampler=keys, num_workers=self.num_workers,
                                                      collate_fn=collate))
        else:
            loaded = (collate([self.dataset[k] for k in batch_keys]) for batch_keys in keys)
        for pos, _ in positions:
            try:
                batch = next(loaded)
            except DataError as e:  # from a worker: torch wraps its traceback into the message
                raise DataError(worker_message(e)) from None
            nxt = pos.step_in_epoch + 1
            done = nxt >= self.sampler.steps_per_epoch
            yield batch, {"epoch": pos.epoch + done, "step_in_epoch": 0 if done else nxt,
                          "batch_size": self.batch_size, "world_size": self.world}

    def check_position(self, position: dict) -> None:
        check_global_batch(position, self.batch_size, self.world)


def check_global_batch(position: dict, batch_size: int, world: int) -> None:
    """DataError when a checkpoint's position was made with another global batch (its steps name other
    samples). Positions without these fields (older checkpoints) are taken as they are."""
    recorded = (position.get("batch_size", batch_size), position.get("world_size", world))
    if recorded != (batch_size, world):
        raise DataError(f"data: the checkpoint's data position was made with train.batch_size={recorded[0]} x "
                        f"{recorded[1]} ranks, this run has train.batch_size={batch_size} x {world} "
                        f"ranks; resuming needs the same (set train.batch_size={recorded[0]} and relaunch with "
                        f"{recorded[1]} ranks, or start a new output.dir)")
