"""Captions for your own images (issue 21, item 3) and JSONL manifests: a default caption or trigger-word
template per dataset, the documented precedence (manifest field, NAME.txt, NAME.json, data.caption), and caption
dropout at the asked rate, drawn per (seed, epoch, sample) whatever the rank layout."""
from __future__ import annotations

import json
from collections import Counter

import pytest
from PIL import Image

from dopsd.config import ConfigError, from_dict
from dopsd.data import DataError, build_data
from dopsd.data.folder import FolderDataset


def _img(path, size=(40, 40), colour=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _cfg(path, batch: int = 2, **data):
    return from_dict({"model": {"path": "no-model"}, "train": {"batch_size": batch, "seed": 11},
                      "data": {"path": str(path), "resolution": [32, 32], **data}})


def _prompts(ds: FolderDataset, epochs: int = 1) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for e in range(epochs):
        for i in range(len(ds)):
            s = ds[(e, i)]
            out.setdefault(s["key"], set()).add(s["prompt"])
    return out


def test_default_caption_makes_caption_files_optional_and_files_take_precedence(tmp_path):
    _img(tmp_path / "bare.png")  # no caption: the default
    _img(tmp_path / "txt.png")
    (tmp_path / "txt.txt").write_text("from the txt\n")
    (tmp_path / "txt.json").write_text(json.dumps(["from the json"]))  # .txt wins over .json
    _img(tmp_path / "js.png")
    (tmp_path / "js.json").write_text(json.dumps({"short": "from the json"}))
    plain = FolderDataset(tmp_path, 32, 32)
    assert plain.skipped == {"missing_caption": 1}  # without a default the bare image is skipped
    ds = FolderDataset(tmp_path, 32, 32, caption="a photo of [V] dog", placeholder_replacement="sks")
    assert ds.num_skipped == 0
    assert _prompts(ds, 3) == {"bare": {"a photo of sks dog"}, "txt": {"from the txt"}, "js": {"from the json"}}


def test_template_wraps_every_variant_and_needs_a_caption(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("on a beach\nin the snow\n")
    _img(tmp_path / "bare.png")
    ds = FolderDataset(tmp_path, 32, 32, caption="photo of [V] dog, {caption}")
    assert ds.skipped == {"missing_caption": 1}
    assert _prompts(ds, 30) == {"a": {"photo of [V] dog, on a beach", "photo of [V] dog, in the snow"}}


def test_a_broken_caption_file_is_not_replaced_by_the_default(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "a.json").write_text("{not json")
    _img(tmp_path / "b.png")
    ds = FolderDataset(tmp_path, 32, 32, caption="default")
    assert ds.skipped == {"bad_caption": 1} and [it.image.stem for it in ds.items] == ["b"]


def test_manifest_field_then_files_then_default_and_bad_lines_counted(tmp_path):
    for name in ("field", "txt", "json", "bare"):
        _img(tmp_path / "imgs" / f"{name}.png")
    (tmp_path / "imgs" / "field.txt").write_text("the txt loses\n")
    (tmp_path / "imgs" / "txt.txt").write_text("from the txt\n")
    (tmp_path / "imgs" / "json.json").write_text(json.dumps(["from the json"]))
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    lines = [json.dumps({"image": "imgs/field.png", "caption": "from the field"}),
             json.dumps({"image": "imgs/txt.png"}), json.dumps({"image": "imgs/json.png"}),
             json.dumps({"image": "imgs/bare.png", "captions": []}),  # an empty list: no caption of its own
             "{not json", json.dumps(["a", "list"]), json.dumps({"caption": "no image"}),
             json.dumps({"image": "imgs/gone.png", "caption": "x"}), json.dumps({"image": "imgs/broken.png"}), ""]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    source = build_data(_cfg(tmp_path / "m.jsonl", batch=1, type="manifest", caption="the default"))
    ds = source.dataset
    assert _prompts(ds) == {"field": {"from the field"}, "txt": {"from the txt"}, "json": {"from the json"},
                            "bare": {"the default"}}
    assert ds.skipped == {"bad_record": 2, "missing_image": 2, "bad_image": 1}
    described = source.describe()
    assert described["samples"] == 4 and described["skipped"] == dict(ds.skipped)
    assert sorted(f["kind"] for f in described["bad_files"]) == ["bad_image", "bad_record", "bad_record",
                                                                 "missing_image", "missing_image"]
    assert any(f["path"].endswith("m.jsonl:5") for f in described["bad_files"])  # the line of the bad record
    with pytest.raises(FileNotFoundError, match="data.path"):
        build_data(_cfg(tmp_path / "nope.jsonl", type="manifest"))


def _caption_folder(root, n: int):
    for i in range(n):
        _img(root / f"{i:02d}.png", colour=(i, 2 * i, 3 * i))
        (root / f"{i:02d}.txt").write_text(f"caption {i}\n")
    return root


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5, 1.0])
def test_caption_dropout_rate_is_what_was_asked_and_seeded(tmp_path, rate):
    folder = _caption_folder(tmp_path / "imgs", 20)
    ds = FolderDataset(folder, 32, 32, seed=3, caption_dropout=rate)
    draws = [ds[(e, i)]["prompt"] for e in range(60) for i in range(20)]  # 1200 draws
    dropped = sum(p == "" for p in draws) / len(draws)
    assert abs(dropped - rate) < 0.05  # 4 binomial standard deviations at p = 0.5
    again = FolderDataset(folder, 32, 32, seed=3, caption_dropout=rate)
    assert draws[:100] == [again[(e, i)]["prompt"] for e in range(5) for i in range(20)]
    if 0 < rate < 1:  # dropped per (epoch, sample): not the same samples every epoch
        assert len({tuple(p == "" for p in draws[e * 20:(e + 1) * 20]) for e in range(60)}) > 10
        assert all(p in ("", f"caption {int(ds[(0, i)]['key'])}") for i, p in enumerate(draws[:20]))


def test_caption_dropout_is_the_same_on_any_rank_layout(tmp_path):
    folder = _caption_folder(tmp_path / "imgs", 6)
    one = build_data(_cfg(folder, batch=2, caption_dropout=0.5)).batches({})
    ranks = [build_data(_cfg(folder, batch=1, caption_dropout=0.5), r, 2).batches({}) for r in range(2)]
    prompts = Counter()
    for _ in range(12):  # 4 epochs
        batch, _ = next(one)
        assert batch["prompt"] == [p for r in ranks for p in next(r)[0]["prompt"]]
        prompts.update(batch["prompt"])
    assert prompts[""] and len(prompts) > 1


def test_caption_keys_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="data.caption_dropout: must be in"):
        _cfg(tmp_path, caption_dropout=1.5)
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].caption_dropout"):
        _cfg(tmp_path, datasets=[{"path": str(tmp_path), "caption_dropout": -0.1}])


def test_shards_drop_captions_when_encoding_live_and_refuse_cached_features(tmp_path):
    from dopsd.data.shards import make_shards

    folder = _caption_folder(tmp_path / "imgs", 8)
    make_shards(str(folder), str(tmp_path / "shards"), samples_per_shard=4, progress=False)
    shards = {"type": "webdataset", "path": str(tmp_path / "shards"), "shuffle_buffer": 4, "caption_dropout": 0.5}
    with pytest.raises(DataError, match="data.caption_dropout: .*cached_features=false"):
        build_data(_cfg(**shards))  # zimage caches features: the empty caption's are not in the shards
    source = build_data(_cfg(**shards, cached_features=False))
    batches = source.batches({})
    prompts = [p for _ in range(40) for p in next(batches)[0]["prompt"]]  # 10 epochs of 8 samples
    assert 0.3 < prompts.count("") / len(prompts) < 0.7
    assert set(prompts) - {""} == {f"caption {i}" for i in range(8)}


def test_the_empty_caption_is_encoded_by_the_model(backend):
    """What a dropped caption becomes: the model's own encoding of "" (no special case in the trainer)."""
    (features,) = backend.encode_student([""])
    assert features.ndim == 2 and features.shape[0] >= 1 and bool(features.isfinite().all())


def test_unreadable_or_empty_manifest_is_a_data_error(tmp_path):
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="data.path: cannot read the manifest"):
        build_data(_cfg(tmp_path / "bin.jsonl", type="manifest"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="holds no line"):
        build_data(_cfg(tmp_path / "empty.jsonl", type="manifest"))
