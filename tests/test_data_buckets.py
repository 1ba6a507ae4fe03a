"""Aspect-ratio buckets and random crops for image folders and manifests (issue 21, item 2): the shard reader's
bucket assignment, every global batch from one bucket on every rank, crops seeded per (seed, epoch, sample)."""
from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from PIL import Image

from dopsd.config import ConfigError, from_dict
from dopsd.data import build_data
from dopsd.data.folder import FolderDataset, FolderSource
from dopsd.data.images import to_tensor
from dopsd.data.shard_format import assign_bucket, default_buckets

# (width, height) -> the bucket (h, w) of nearest aspect ratio in default_buckets([64, 64])
SIZES = {(64, 64): (64, 64), (80, 60): (48, 64), (60, 100): (80, 48), (160, 64): (32, 80)}


def _noise(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def _folder(root, per_size: int = 3):
    root.mkdir(parents=True, exist_ok=True)
    n = 0
    for (w, h) in SIZES:
        for _ in range(per_size):
            _noise(w, h, n).save(root / f"{w}x{h}_{n:02d}.png")
            (root / f"{w}x{h}_{n:02d}.txt").write_text(f"picture {n}\n")
            n += 1
    return root


def _cfg(path, batch: int = 2, **data):
    return from_dict({"model": {"path": "no-model"}, "train": {"batch_size": batch, "seed": 5},
                      "data": {"path": str(path), "resolution": [64, 64], **data}})


def _image_size(key: str) -> tuple[int, int]:
    w, h = key.split("_")[0].split("x")
    return int(w), int(h)


def test_buckets_keep_aspect_ratios_as_the_shard_reader_assigns_them(tmp_path):
    folder = _folder(tmp_path / "imgs")
    ds = FolderDataset(folder, 64, 64, buckets=default_buckets([64, 64]))
    assert ds.bucket_histogram() == {f"{h}x{w}": 3 for h, w in SIZES.values()}
    source = FolderSource(_cfg(folder, aspect_buckets=True))
    batches = source.batches({})
    shapes = Counter()
    for _ in range(source.steps_per_epoch):
        batch, _ = next(batches)
        h, w = batch["image"].shape[-2:]
        shapes[(h, w)] += 1
        for key in batch["key"]:
            iw, ih = _image_size(key)
            assert (h, w) == assign_bucket(iw, ih, default_buckets([64, 64])) == SIZES[(iw, ih)]
            bucket_err = abs(math.log(w / h) - math.log(iw / ih))
            square_err = abs(math.log(iw / ih))
            assert bucket_err <= square_err  # never a worse aspect than today's square crop
    assert set(shapes) == set(SIZES.values())  # every bucket trained, none squashed to 64 x 64
    assert source.describe()["buckets"] == {f"{h}x{w}": 3 for h, w in SIZES.values()}


def test_without_buckets_every_image_goes_to_data_resolution(tmp_path):
    source = FolderSource(_cfg(_folder(tmp_path / "imgs")))
    batch, _ = next(source.batches({}))
    assert batch["image"].shape == (2, 3, 64, 64)
    assert source.describe()["buckets"] == {"64x64": 12}


def test_explicit_bucket_list_is_used(tmp_path):
    source = FolderSource(_cfg(_folder(tmp_path / "imgs"), buckets=[[64, 64], [32, 96]]))
    assert source.describe()["buckets"] == {"64x64": 9, "32x96": 3}  # 80x60, 60x100 go square; 160x64 wide


def test_two_ranks_hold_the_same_bucket_at_every_step_and_see_every_sample(tmp_path):
    """2 ranks x batch 1 in one process (the sampler is a pure function of rank): same shapes at every step, and
    together exactly the global batches of 1 rank x batch 2."""
    folder = _folder(tmp_path / "imgs")
    ranks = [build_data(_cfg(folder, batch=1, aspect_buckets=True), r, 2) for r in range(2)]
    single = build_data(_cfg(folder, batch=2, aspect_buckets=True))
    streams = [s.batches({}) for s in ranks]
    alone = single.batches({})
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == single.steps_per_epoch
    for epoch in range(2):
        seen = Counter()
        for _ in range(single.steps_per_epoch):
            pair = [next(s)[0] for s in streams]
            both, _ = next(alone)
            assert pair[0]["image"].shape == pair[1]["image"].shape, "ranks disagree on the bucket"
            assert [k for b in pair for k in b["key"]] == both["key"]
            assert torch.equal(torch.cat([b["image"] for b in pair]), both["image"])
            seen.update(both["key"])
        assert set(seen) == {p.stem for p in folder.glob("*.png")}  # every sample each epoch (3 per bucket:
        assert sum(seen.values()) == 2 * single.steps_per_epoch  # padded by cycling to whole global batches)


def test_random_crop_is_seeded_per_epoch_and_sample(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        _noise(128, 64, i).save(folder / f"{i}.png")  # resized to 64 x 128: 64 px of room for the crop
        (folder / f"{i}.txt").write_text("x\n")
    centre = FolderDataset(folder, 64, 64)
    rand = FolderDataset(folder, 64, 64, seed=5, crop="random")
    again = FolderDataset(folder, 64, 64, seed=5, crop="random")
    other_seed = FolderDataset(folder, 64, 64, seed=6, crop="random")
    crops = [rand[(e, i)]["image"] for e in range(6) for i in range(4)]
    assert all(torch.equal(a, again[(e, i)]["image"]) for a, (e, i) in
               zip(crops, [(e, i) for e in range(6) for i in range(4)]))  # a function of (seed, epoch, index)
    assert len({c.sum().item() for c in crops}) > 12  # offsets vary across epochs and samples
    assert not torch.equal(rand[(0, 1)]["image"], centre[(0, 1)]["image"])
    assert any(not torch.equal(rand[(e, 0)]["image"], other_seed[(e, 0)]["image"]) for e in range(4))
    # each crop is a 64-px window of the (unscaled, 64 x 128) image, not a squashed resize
    full = to_tensor(Image.open(folder / "0.png"))
    lefts = {next(x for x in range(65) if torch.equal(full[:, :, x:x + 64], rand[(e, 0)]["image"]))
             for e in range(6)}
    assert len(lefts) > 1
    # ranks and resumes agree: a source's batches from a position equal the straight run's
    cfg = _cfg(folder, crop="random")
    straight = FolderSource(cfg).batches({})
    run = [next(straight) for _ in range(5)]
    resumed = FolderSource(cfg).batches(run[2][1])
    for batch, _ in run[3:]:
        assert torch.equal(next(resumed)[0]["image"], batch["image"])


def test_bad_crop_and_bucket_keys_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="data.crop"):
        _cfg(tmp_path, crop="left")
    with pytest.raises(ConfigError, match=r"data.buckets\[0\]"):
        _cfg(tmp_path, buckets=[[60, 64]])


def test_manifest_images_are_bucketed_too(tmp_path):
    folder = _folder(tmp_path / "imgs", per_size=1)
    rng = random.Random(0)
    lines = [f'{{"image": "imgs/{p.name}", "caption": "c{rng.random()}"}}' for p in sorted(folder.glob("*.png"))]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    source = build_data(_cfg(tmp_path / "m.jsonl", batch=1, type="manifest", aspect_buckets=True))
    assert source.describe()["buckets"] == {f"{h}x{w}": 1 for h, w in SIZES.values()}


def test_shards_crop_randomly_when_encoding_live_and_refuse_it_with_cached_features(tmp_path):
    from dopsd.data import DataError
    from dopsd.data.shards import make_shards

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        _noise(128, 64, i).save(folder / f"{i}.png")  # 2:1 -> the 48 x 80 bucket: resized to 48 x 96, 16 px of room
        (folder / f"{i}.txt").write_text("x\n")
    make_shards(str(folder), str(tmp_path / "shards"), samples_per_shard=2, progress=False)
    shards = {"type": "webdataset", "shuffle_buffer": 1, "shuffle": False}
    with pytest.raises(DataError, match="data.crop: 'random' .*cached_features=false"):
        build_data(_cfg(tmp_path / "shards", crop="random", **shards))

    def images(**data):
        stream = build_data(_cfg(tmp_path / "shards", cached_features=False, **shards, **data)).batches({})
        return [next(stream)[0]["image"] for _ in range(6)]  # 3 epochs

    rand, centre = images(crop="random"), images()
    assert all(torch.equal(a, b) for a, b in zip(rand, images(crop="random")))  # seeded
    assert any(not torch.equal(a, b) for a, b in zip(rand, centre))
    assert all(torch.equal(a, b) for a, b in zip(centre, images()))
