"""`dopsd make-shards`: inputs (folder, JSONL manifest, img2dataset-style shards), bad inputs, resumability, CLI."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from dopsd.data.shards import make_shards

wds = pytest.importorskip("webdataset")


def _images(root: Path, count: int) -> Path:
    from dopsd.data.synthetic import draw_concept

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(count):
        draw_concept(rng, 32)[0].save(root / f"img.{i:02d}.png")  # a dot in the stem: keys must not keep it
        (root / f"img.{i:02d}.txt").write_text(f"first caption {i}\nsecond caption {i}\n")
    return root


def _read(out: Path) -> list[dict]:
    return list(wds.WebDataset(sorted(str(p) for p in out.glob("shard-*.tar")), shardshuffle=False))


def test_folder_to_shards_with_bad_inputs_and_indexes(tmp_path):
    src = _images(tmp_path / "in", 7)
    (src / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (src / "corrupt.txt").write_text("x\n")
    Image.new("RGB", (8, 8)).save(src / "lonely.png")
    summary = make_shards(str(src), str(tmp_path / "out"), samples_per_shard=3, progress=False)
    assert summary["samples"] == 7 and summary["shards"] == 3 and summary["input_kind"] == "folder"
    assert summary["skipped"] == {"bad_image": 1, "missing_caption": 1}
    samples = _read(tmp_path / "out")
    assert len(samples) == 7 and all("." not in s["__key__"] for s in samples)
    first = samples[0]
    assert json.loads(first["json"])["captions"] == ["first caption 0", "second caption 0"]
    assert first["txt"].decode() == "first caption 0\nsecond caption 0"
    assert Image.open(io.BytesIO(first["png"])).size == (32, 32)
    index = json.loads((tmp_path / "out/shard-000000.tar.json").read_text())
    assert index["samples"] == 3 and index["complete"] and index["first_input"] == 0
    assert sum(json.loads(p.read_text())["samples"] for p in (tmp_path / "out").glob("shard-*.tar.json")) == 7


def test_default_caption_of_the_config_shards_a_folder_without_caption_files(tmp_path):
    """make-shards applies data.caption as training does: the default for images without a caption file, and
    a {caption} template around those with one."""
    from dopsd.config import from_dict

    src = _images(tmp_path / "in", 3)
    (src / "img.01.txt").unlink()
    (src / "img.02.txt").unlink()
    cfg = from_dict({"model": {"path": "m"}, "data": {"path": str(src), "caption": "a photo of [V] dog"}})
    summary = make_shards(str(src), str(tmp_path / "out"), cfg=cfg, progress=False)
    assert summary["samples"] == 3 and not summary["skipped"]
    captions = {s["__key__"].split("_", 1)[1]: json.loads(s["json"])["captions"] for s in _read(tmp_path / "out")}
    assert captions == {"img_00": ["first caption 0", "second caption 0"], "img_01": ["a photo of [V] dog"],
                        "img_02": ["a photo of [V] dog"]}, captions
    template = from_dict({"model": {"path": "m"}, "data": {"path": str(src), "caption": "[V], {caption}"}})
    summary = make_shards(str(src), str(tmp_path / "out2"), cfg=template, progress=False)
    assert summary["samples"] == 1 and summary["skipped"] == {"missing_caption": 2}
    assert json.loads(_read(tmp_path / "out2")[0]["json"])["captions"][0] == "[V], first caption 0"


def test_interrupted_run_resumes_and_skips_finished_shards(tmp_path, monkeypatch):
    src = _images(tmp_path / "in", 10)
    out = tmp_path / "out"
    import dopsd.data.shards as shards_mod

    real = shards_mod.folder_records

    def interrupted(root, *args):
        total, records = real(root, *args)

        def gen():
            for r in records:
                if r.index == 7:
                    raise KeyboardInterrupt
                yield r
        return total, gen()

    monkeypatch.setattr(shards_mod, "folder_records", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_shards(str(src), str(out), samples_per_shard=3, progress=False)
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert (out / "shard-000002.tar.partial").exists()  # the unfinished shard never has its final name
    monkeypatch.setattr(shards_mod, "folder_records", real)
    summary = make_shards(str(src), str(out), samples_per_shard=3, progress=False)
    assert summary["shards_skipped"] == 2 and summary["samples_in_skipped_shards"] == 6
    assert summary["shards_written"] == 2 and summary["samples_written"] == 4 and summary["samples"] == 10
    assert not list(out.glob("*.partial"))
    keys = [s["__key__"] for s in _read(out)]
    assert len(keys) == len(set(keys)) == 10
    # a finished set is a no-op; other settings are refused unless --overwrite
    again = make_shards(str(src), str(out), samples_per_shard=3, progress=False)
    assert again["samples_written"] == 0 and again["samples"] == 10
    with pytest.raises(ValueError, match="other settings"):
        make_shards(str(src), str(out), samples_per_shard=4, progress=False)
    assert make_shards(str(src), str(out), samples_per_shard=4, progress=False, overwrite=True)["shards"] == 3


def test_manifest_and_img2dataset_inputs(tmp_path):
    src = _images(tmp_path / "in", 3)
    lines = [json.dumps({"image": f"in/img.{i:02d}.png", "captions": {"short": f"s{i}", "long": f"l{i}"}})
             for i in range(3)]
    lines.insert(1, "{not json")
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    summary = make_shards(str(tmp_path / "data.jsonl"), str(tmp_path / "m"), progress=False)
    assert summary["samples"] == 3 and summary["skipped"] == {"bad_record": 1}
    assert [json.loads(s["json"])["captions"] for s in _read(tmp_path / "m")][0] == ["s0", "l0"]

    # img2dataset layout: KEY.jpg + KEY.txt + KEY.json({"caption", "url", ...}) per key
    with wds.TarWriter(str(tmp_path / "i2d-00000.tar")) as w:
        for i in range(3):
            buf = io.BytesIO()
            Image.open(src / f"img.{i:02d}.png").convert("RGB").save(buf, format="JPEG")
            w.write({"__key__": f"{i:09d}", "jpg": buf.getvalue(), "txt": f"caption {i}".encode(),
                     "json": json.dumps({"caption": f"caption {i}", "url": f"http://x/{i}", "status": "success"}
                                        ).encode()})
    summary = make_shards(str(tmp_path / "i2d-{00000..00001}.tar"), str(tmp_path / "s"), progress=False)
    assert summary["samples"] == 3 and summary["input_kind"] == "shards"
    assert summary["skipped"] == {"unreadable_shard": 1}  # i2d-00001.tar does not exist
    samples = _read(tmp_path / "s")
    assert [s["txt"].decode() for s in samples] == ["caption 0", "caption 1", "caption 2"]
    assert json.loads(samples[0]["json"])["meta"]["url"] == "http://x/0" and "jpg" in samples[0]


def test_cli_make_shards(tmp_path, capsys):
    from dopsd.cli import main

    src = _images(tmp_path / "in", 4)
    assert main(["make-shards", str(src), str(tmp_path / "out"), "--samples-per-shard", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "2 shards, 4 samples" in out and "bad inputs skipped: none" in out
    assert main(["make-shards", str(src), str(tmp_path / "out2"), "--features", "all", "--no-progress"]) == 2
    assert "--features needs --config" in capsys.readouterr().err


def test_editing_samples_carry_their_references(tmp_path):
    from dopsd.data.synthetic import write_edit_folder

    src = write_edit_folder(tmp_path / "in", count=3, size=64, references=2)
    Image.new("RGB", (64, 64)).save(src / "bad.png")
    (src / "bad.txt").write_text("edit\n")
    (src / "bad.ref0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.new("RGB", (64, 64)).save(src / "tiny.png")
    (src / "tiny.txt").write_text("edit\n")
    Image.new("RGB", (32, 64)).save(src / "tiny.ref0.png")  # the pipeline refuses a 32 px side
    summary = make_shards(str(src), str(tmp_path / "out"), samples_per_shard=2, progress=False)
    assert summary["samples"] == 3 and summary["skipped"] == {"bad_reference": 2}
    samples = _read(tmp_path / "out")
    for s, name in zip(samples, ("000", "001", "002")):
        assert s["ref0.png"] == (src / f"{name}.ref0.png").read_bytes()
        assert s["ref1.png"] == (src / f"{name}.ref1.png").read_bytes()
        assert s["png"] == (src / f"{name}.png").read_bytes()
        assert json.loads(s["json"])["references"] == [{"width": 64, "height": 64}] * 2

    # a manifest names references by path; shards in, shards out keeps them
    lines = [json.dumps({"image": "in/000.png", "caption": "c0", "references": ["in/000.ref0.png"]}),
             json.dumps({"image": "in/001.png", "caption": "c1", "references": ["in/nope.png"]})]
    (tmp_path / "edit.jsonl").write_text("\n".join(lines) + "\n")
    summary = make_shards(str(tmp_path / "edit.jsonl"), str(tmp_path / "m"), progress=False)
    assert summary["samples"] == 1 and summary["skipped"] == {"bad_reference": 1}
    (only,) = _read(tmp_path / "m")
    assert only["ref0.png"] == (src / "000.ref0.png").read_bytes() and "ref1.png" not in only
    summary = make_shards(str(tmp_path / "out"), str(tmp_path / "again"), progress=False)
    assert summary["samples"] == 3
    assert [s["ref1.png"] for s in _read(tmp_path / "again")] == [s["ref1.png"] for s in samples]
    assert "references" not in json.loads(_read(tmp_path / "again")[0]["json"])["meta"]


def test_cached_features_with_references_are_refused(tiny_model_dir, tmp_path):
    from dopsd.config import from_dict
    from dopsd.data.synthetic import write_edit_folder

    src = write_edit_folder(tmp_path / "in", count=1, size=64)
    cfg = from_dict({"model": {"path": str(tiny_model_dir)}, "data": {"path": "x", "resolution": [32, 32]}})
    with pytest.raises(ValueError, match="cached features are for text-to-image data"):
        make_shards(str(src), str(tmp_path / "out"), features="student", cfg=cfg, progress=False)


def test_teacher_features_of_the_reference_route_are_refused(tiny_model_dir, concept_dir, tmp_path):
    """`teacher_context: reference` puts the image into the DiT: nothing to cache for the teacher, say so."""
    from dopsd.config import from_dict

    cfg = from_dict({"model": {"path": str(tiny_model_dir), "teacher_context": "reference"},
                     "data": {"path": "x", "resolution": [32, 32]}})
    with pytest.raises(ValueError, match="--features student"):
        make_shards(str(concept_dir), str(tmp_path / "out"), features="all", cfg=cfg, progress=False)
    summary = make_shards(str(concept_dir), str(tmp_path / "ok"), features="student", cfg=cfg, progress=False)
    assert summary["samples"] > 0
