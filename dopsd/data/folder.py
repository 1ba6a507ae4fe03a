"""Image-folder dataset: `name.png|jpg|jpeg|webp` beside `name.txt` (one prompt variant per line) or
`name.json` (a list of variants, or a mapping such as {"short": ..., "detailed": ...}).

Editing data (FLUX.2-klein): `name.ref0.png`, `name.ref1.png`, ... beside the sample are its reference images
(the inputs the caption, an edit instruction, applies to; the sample's image is the expected result). A file
`X.refN.<ext>` is a reference whenever an image `X.<ext>` exists; see references.py for the preprocessing.
Targets are resized to `data.resolution`; references keep their (preprocessed) sizes, and the sampler draws
every global batch from samples whose references have the same sizes, so that batches stack on every rank.

One variant is drawn per sample per step, as the recipe does with its prompt fields. Bad samples (no
caption, unreadable or corrupt image or reference) are skipped with a warning and counted by kind.

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

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import DataError, DataPathError, worker_message
from .references import folder_layout, load_reference, reference_files, reference_sizes, stack_slots

log = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def resize_center_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """Bicubic resize so the image covers (height, width), then centre-crop (the recipe's bucketing step)."""
    img = img.convert("RGB")
    scale = max(height / img.height, width / img.width)
    new_w, new_h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    img = img.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return img.crop((left, top, left + width, top + height))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


def read_captions(path: Path) -> list[str]:
    """Caption variants from a .txt (one per non-empty line) or .json (list or mapping of strings)."""
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        values = list(data.values()) if isinstance(data, dict) else data
        if not isinstance(values, list):
            raise ValueError("caption JSON must be a list or a mapping of strings")
        variants = [v.strip() for v in values if isinstance(v, str) and v.strip()]
    else:
        variants = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not variants:
        raise ValueError("caption file holds no prompt")
    return variants


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
        samples, refs = folder_layout(sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_EXTS))
        for path in samples:
            self._scan(path, refs.get(path.stem, {}))
        if not samples:
            raise DataError(f"data.path: no usable image+caption pairs in {self.root}: it holds no "
                            f"{'/'.join(e[1:] for e in IMAGE_EXTS)} image (put NAME.png beside NAME.txt or NAME.json)")
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
        caption = next((c for c in (path.with_suffix(".txt"), path.with_suffix(".json")) if c.exists()), None)
        if caption is None:
            self._skip("missing_caption", path, "no .txt or .json caption beside it")
            return
        try:
            captions = read_captions(caption)
        except (ValueError, UnicodeDecodeError, json.JSONDecodeError) as e:
            self._skip("bad_caption", caption, str(e))
            return
        try:  # decode fully now: a truncated file passes a header check and fails mid-run otherwise
            with Image.open(path) as img:
                img.load()
        except Exception as e:  # PIL raises many types for bad bytes
            self._skip("bad_image", path, f"{type(e).__name__}: {e}")
            return
        try:
            references = tuple(reference_files(ref_files))
            sizes = reference_sizes([load_reference(r) for r in references])
        except Exception as e:  # PIL raises many types for bad bytes; the pipeline's checks raise ValueError
            self._skip("bad_reference", path, f"{type(e).__name__}: {e}")
            return
        self.items.append(Item(path, captions, references, sizes))

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


def collate(samples: list[dict]) -> dict:
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "prompt": [s["prompt"] for s in samples],
        "key": [s["key"] for s in samples],
    }
    if any(s.get("references") for s in samples):  # one (B, 3, H_i, W_i) tensor per reference slot
        batch["references"] = stack_slots([s.get("references", []) for s in samples])
    return batch


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
