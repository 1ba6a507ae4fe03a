import json
from collections import Counter

import pytest
import torch
from PIL import Image

from dopsd.data.folder import FolderDataset, collate, resize_center_crop


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
