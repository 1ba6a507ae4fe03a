import json
from collections import Counter

import pytest
import torch
from PIL import Image

from dopsd.data.folder import FolderDataset
from dopsd.data.images import resize_center_crop
from dopsd.data.samples import collate


def test_resize_center_crop_covers_and_crops():
    img = Image.new("RGB", (100, 50), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 25, 50))  # a blue band on the left that the centre crop removes
    out = resize_center_crop(img, 32, 32)
    assert out.size == (32, 32)
    assert out.getpixel((0, 16))[0] > 200 and out.getpixel((31, 16))[0] > 200


def test_variants_from_txt_and_json_with_placeholder(tmp_path):
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("one [V]\n\ntwo [V]\n")
    Image.new("RGB", (40, 40)).save(tmp_path / "b.jpg")
    (tmp_path / "b.json").write_text(json.dumps({"short": "short [V]", "detailed": "a detailed [V]", "n": 3}))
    ds = FolderDataset(tmp_path, 32, 32, placeholder="[V]", placeholder_replacement="sks")
    assert len(ds) == 2 and ds.num_skipped == 0
    seen = Counter()
    for epoch in range(40):
        seen.update(ds[(epoch, i)]["prompt"] for i in range(2))
    assert ds[(3, 0)]["prompt"] == ds[(3, 0)]["prompt"]  # the choice is a function of (epoch, index)
    assert set(seen) == {"one sks", "two sks", "short sks", "a detailed sks"}  # every variant gets drawn
    batch = collate([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_bad_samples_counted_by_kind(tmp_path):
    Image.new("RGB", (40, 40)).save(tmp_path / "ok.png")
    (tmp_path / "ok.txt").write_text("fine\n")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "broken.txt").write_text("x\n")
    Image.new("RGB", (40, 40)).save(tmp_path / "lonely.png")
    Image.new("RGB", (40, 40)).save(tmp_path / "empty.png")
    (tmp_path / "empty.txt").write_text("\n \n")
    ok = Image.new("RGB", (40, 40))
    ok.save(tmp_path / "trunc.png")
    data = (tmp_path / "trunc.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "trunc.txt").write_text("y\n")
    ds = FolderDataset(tmp_path, 32, 32)
    assert len(ds) == 1
    assert ds.skipped == {"bad_image": 2, "missing_caption": 1, "bad_caption": 1}


def test_image_that_goes_bad_mid_run_is_replaced_and_counted(tmp_path):
    for name in ("a", "b"):
        Image.new("RGB", (40, 40)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"{name}\n")
    ds = FolderDataset(tmp_path, 32, 32)
    (tmp_path / "a.png").write_bytes(b"gone")
    sample = ds[0]
    assert sample["key"] == "b" and ds.skipped == {"bad_image": 1}


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no usable image"):
        FolderDataset(tmp_path, 32, 32)
    with pytest.raises(FileNotFoundError, match="data.path"):
        FolderDataset(tmp_path / "nope", 32, 32)


# ---------------------------------------------------------------------------------------------------------
# Editing data: NAME.refN.png beside the sample

def _edit_sample(root, name: str, ref_sizes: list[tuple[int, int]], caption: str = "edit it\n") -> None:
    Image.new("RGB", (40, 40), (10, 20, 30)).save(root / f"{name}.png")
    (root / f"{name}.txt").write_text(caption)
    for i, (w, h) in enumerate(ref_sizes):
        Image.new("RGB", (w, h), (i * 40, 100, 200)).save(root / f"{name}.ref{i}.png")


def test_references_are_read_preprocessed_and_bad_ones_counted(tmp_path):
    _edit_sample(tmp_path, "a", [(64, 64)])
    _edit_sample(tmp_path, "b", [(80, 64), (64, 64)])  # two references: a bucket of its own
    _edit_sample(tmp_path, "c", [(70, 75)])  # centre-cropped to 64 x 64: a's bucket
    _edit_sample(tmp_path, "d", [(64, 64)])
    (tmp_path / "d.ref0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    _edit_sample(tmp_path, "e", [(64, 64), (64, 64)])
    (tmp_path / "e.ref0.png").unlink()  # e.ref1 without e.ref0: a gap
    _edit_sample(tmp_path, "f", [(48, 64)])  # under 64 px: the pipeline refuses it
    Image.new("RGB", (64, 64)).save(tmp_path / "lonely.ref0.png")  # no lonely.png: a sample, without caption
    ds = FolderDataset(tmp_path, 32, 32)
    assert [it.image.stem for it in ds.items] == ["a", "b", "c"]
    assert ds.skipped == {"bad_reference": 3, "missing_caption": 1}
    assert ds.buckets == {((64, 64),): [0, 2], ((64, 80), (64, 64)): [1]}  # (h, w) of each reference
    b = ds[1]
    assert [r.shape for r in b["references"]] == [(3, 64, 80), (3, 64, 64)]
    assert b["references"][1][:, 0, 0].tolist() == pytest.approx([40 / 255, 100 / 255, 200 / 255])
    batch = collate([ds[0], ds[2]])
    assert len(batch["references"]) == 1 and batch["references"][0].shape == (2, 3, 64, 64)
    assert "references" not in collate([{"image": torch.zeros(3, 2, 2), "prompt": "p", "key": "k"}])
    with pytest.raises(ValueError, match="mixes"):
        collate([ds[0], ds[1]])


def test_reference_that_goes_bad_mid_run_is_replaced_within_its_bucket(tmp_path):
    for name in ("a", "c"):
        _edit_sample(tmp_path, name, [(64, 64)])
    _edit_sample(tmp_path, "b", [(64, 80)])
    ds = FolderDataset(tmp_path, 32, 32)
    (tmp_path / "a.ref0.png").write_bytes(b"gone")
    sample = ds[0]
    assert sample["key"] == "c" and sample["references"][0].shape == (3, 64, 64)  # not b: other sizes
    assert ds.skipped == {"bad_reference": 1}


def test_grouped_sampler_keeps_global_batches_in_one_bucket():
    from dopsd.data.sampler import GlobalBatchSampler, Position

    groups = [0, 1, 0, 0, 1, 2, 0]
    world = 2
    samplers = [GlobalBatchSampler(7, 1, rank, world, seed=3, groups=groups) for rank in range(world)]
    assert samplers[0].steps_per_epoch == 2 + 1 + 1  # ceil(4/2) + ceil(2/2) + ceil(1/2)
    for epoch in range(3):
        seen = set()
        for step in range(samplers[0].steps_per_epoch):
            picks = [i for s in samplers for i in s.batch(epoch, step)]
            assert len({groups[i] for i in picks}) == 1, "every rank holds the same bucket at every step"
            seen.update(picks)
        assert seen == set(range(7))  # every sample, every epoch
    assert samplers[0]._order(0) != samplers[0]._order(1)  # shuffled per epoch
    assert next(samplers[1].iterate(Position(1, 2))) == (Position(1, 2), samplers[1].batch(1, 2))  # no replay
    # one group (text-to-image data) is the plain sampler, unchanged
    plain, single = GlobalBatchSampler(7, 2, seed=3), GlobalBatchSampler(7, 2, seed=3, groups=[5] * 7)
    assert [plain.batch(1, s) for s in range(4)] == [single.batch(1, s) for s in range(4)]


def test_folder_source_batches_stack_references(tmp_path):
    from dopsd.config import from_dict
    from dopsd.data.folder import FolderSource

    for i in range(3):
        _edit_sample(tmp_path, f"s{i}", [(64, 64)])
    for i in range(2):
        _edit_sample(tmp_path, f"w{i}", [(96, 64)])
    cfg = from_dict({"model": {"path": "m"}, "data": {"path": str(tmp_path), "resolution": [32, 32]},
                     "train": {"batch_size": 2}})
    source = FolderSource(cfg)
    batches = source.batches({})
    for _ in range(2 * source.sampler.steps_per_epoch):
        batch, _ = next(batches)
        (refs,) = batch["references"]
        assert refs.shape[0] == 2 and refs.shape[1:] in ((3, 64, 64), (3, 64, 96))
        assert {k[0] for k in batch["key"]} in ({"s"}, {"w"})
