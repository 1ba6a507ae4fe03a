"""Image-folder dataset: `name.png|jpg|jpeg|webp` beside `name.txt` (one prompt variant per line) or
`name.json` (a list of variants, or a mapping such as {"short": ..., "detailed": ...}).

Editing data (FLUX.2-klein): `name.ref0.png`, `name.ref1.png`, ... beside the sample are its reference images
(the inputs the caption, an edit instruction, applies to; the sample's image is the expected result). A file
`X.refN.<ext>` is a reference whenever an image `X.<ext>` exists; see references.py for the preprocessing.
Targets are resized to `data.resolution`; references keep their (preprocessed) sizes, and the sampler draws
every global batch from samples whose references have the same sizes, so that batches stack on every rank.

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
from pathlib import Path

import torch
from PIL import Image

from .errors import DataError, DataPathError, worker_message
from .images import is_image_file, resize_center_crop, to_tensor
from .references import folder_layout, load_reference, reference_files, reference_sizes
from .samples import BadSample, check_sample, collate, folder_captions

log = logging.getLogger(__name__)


@dataclass
class Item:
    image: Path
    captions: list[str]
    references: tuple[Path, ...] = ()
    ref_sizes: tuple[tuple[int, int], ...] = ()  # (h, w) of each prepared reference: the sample's bucket


class FolderDataset(torch.utils.data.Dataset):
    def __init__(self, root: str | Path, height: int, width: int, placeholder: str = "[V]",
                 placeholder_replacement: str = "", seed: int = 0, max_bad_fraction: float = 1.0):
        self.root = Path(root)
        if not self.root.is_dir():
            what = "does not exist" if not self.root.exists() else "is not a directory"
            raise DataPathError(f"data.path: {self.root} {what} (data.type=folder needs a folder of images with "
                                f"captions; for .tar shards set data.type=webdataset)")
        self.height, self.width = height, width
        self.placeholder, self.replacement = placeholder, placeholder_replacement
        self.seed = seed
        self.skipped: Counter[str] = Counter()
        self.items: list[Item] = []
        samples, refs = folder_layout(sorted(p for p in self.root.iterdir() if is_image_file(p)))
        for path in samples:
            self._scan(path, refs.get(path.stem, {}))
        if not samples:
            raise DataError(f"data.path: no usable image+caption pairs in {self.root}: it holds no "
                            "png/jpg/jpeg/webp image (put NAME.png beside NAME.txt or NAME.json)")
        if not self.items:
            raise DataError(f"data.path: no usable image+caption pairs in {self.root}: all {len(samples)} images are "
                            f"bad ({self._kinds()}); the warnings above name each file")
        self._check_ceiling(len(samples), max_bad_fraction)
        self.buckets: dict[tuple, list[int]] = {}  # item indices by reference sizes
        self._place: list[int] = []  # each item's place in its bucket
        for i, item in enumerate(self.items):
            members = self.buckets.setdefault(item.ref_sizes, [])
            self._place.append(len(members))
            members.append(i)

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

    def _skip(self, kind: str, path: Path, why: str) -> None:
        self.skipped[kind] += 1
        log.warning("skipping %s (%s): %s", path, kind, why)

    def _scan(self, path: Path, ref_files: dict[int, list[Path]]) -> None:
        try:  # decoded in full now: a truncated file passes a header check and fails mid-run otherwise
            sample = check_sample(path, lambda: folder_captions(path), lambda: reference_files(ref_files))
        except BadSample as e:
            self._skip(e.kind, path, str(e))
            return
        self.items.append(Item(path, sample.captions, sample.reference_sources, reference_sizes(sample.references)))

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def __len__(self) -> int:
        return len(self.items)

    def _prompt(self, item: Item, epoch: int, index: int) -> str:
        rng = random.Random(hash((self.seed, epoch, index)) & 0xFFFFFFFF)
        prompt = rng.choice(item.captions)
        if self.replacement:
            prompt = prompt.replace(self.placeholder, self.replacement)
        return prompt

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """`key` is an index or (epoch, index): the epoch picks the prompt variant, so the choice is the same
        in any worker process and after a resume."""
        epoch, index = key if isinstance(key, tuple) else (0, key)
        # A file that went bad after the scan is counted and replaced by the next item of the same bucket, so
        # that batches keep their size and shapes and every rank keeps issuing the same model calls.
        bucket = self.buckets[self.items[index].ref_sizes]
        start = self._place[index]
        for offset in range(len(bucket)):
            item = self.items[bucket[(start + offset) % len(bucket)]]
            try:
                with Image.open(item.image) as img:
                    pixels = to_tensor(resize_center_crop(img, self.height, self.width))
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
        which = "of one reference-size bucket " if item.references else ""
        raise DataError(f"data.path: every sample {which}in {self.root} has become unreadable since the scan "
                        f"({len(bucket)} samples, e.g. {item.image.name}); the warnings above name each file")


class FolderSource:
    """A folder dataset behind the data-source surface (see dopsd/data/__init__.py), sampled with the
    rank-independent global-batch sampler."""

    def __init__(self, cfg, rank: int = 0, world_size: int = 1):
        from .sampler import GlobalBatchSampler

        height, width = cfg.data.resolution
        self.dataset = FolderDataset(cfg.data.path, height, width, cfg.data.placeholder,
                                     cfg.data.placeholder_replacement, seed=cfg.train.seed,
                                     max_bad_fraction=cfg.data.max_bad_fraction)
        self.batch_size, self.world = cfg.train.batch_size, world_size
        bucket_ids = {sizes: i for i, sizes in enumerate(self.dataset.buckets)}
        self.sampler = GlobalBatchSampler(len(self.dataset), cfg.train.batch_size, rank, world_size,
                                          seed=cfg.train.seed, shuffle=cfg.data.shuffle,
                                          groups=[bucket_ids[it.ref_sizes] for it in self.dataset.items])
        self.num_workers = cfg.data.num_workers
        self.num_samples = len(self.dataset)
        self.global_offsets = self.sampler.global_offsets()

    @property
    def skipped(self) -> Counter:
        return self.dataset.skipped

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
        """DataError when a checkpoint's position was made with another global batch (its steps name other
        samples). Positions without these fields (older checkpoints) are taken as they are."""
        recorded = (position.get("batch_size", self.batch_size), position.get("world_size", self.world))
        if recorded != (self.batch_size, self.world):
            raise DataError(f"data: the checkpoint's data position was made with train.batch_size={recorded[0]} x "
                            f"{recorded[1]} ranks, this run has train.batch_size={self.batch_size} x {self.world} "
                            f"ranks; resuming needs the same (set train.batch_size={recorded[0]} and relaunch with "
                            f"{recorded[1]} ranks, or start a new output.dir)")
