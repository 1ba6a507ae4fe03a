"""Unusable data raise one exception type, `DataError` (a ValueError), with a one-line message naming the key, when
the source is built (no model needed) or while reading; lost shards count the samples lost in them
(issue 17, items 6 and 9)."""
from __future__ import annotations

import logging
import random
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from dopsd.data import DataError, DataPathError, build_data
from dopsd.data.shards import make_shards

wds = pytest.importorskip("webdataset")

SHARDS, PER_SHARD = 10, 4


def _config(data: dict, **train):
    from dopsd.config import from_dict

    return from_dict({"model": {"path": "no-model-needed"}, "train": {"batch_size": 2, **train},
                      "data": {"resolution": [32, 32], **data}})


def _shard_config(path, **data):
    return _config({"type": "webdataset", "path": str(path), "shuffle_buffer": 4, **data})


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    """10 shards of 4 samples written by make-shards, each beside its index (NAME.tar.json)."""
    from dopsd.data.synthetic import draw_concept

    root = tmp_path_factory.mktemp("shard_set")
    rng = random.Random(0)
    (root / "images").mkdir()
    for i in range(SHARDS * PER_SHARD):
        draw_concept(rng, 32)[0].save(root / "images" / f"{i:03d}.png")
        (root / "images" / f"{i:03d}.txt").write_text(f"a photo of [V] ball {i}\n")
    summary = make_shards(str(root / "images"), str(root / "shards"), samples_per_shard=PER_SHARD, progress=False)
    assert summary["shards"] == SHARDS and summary["samples"] == SHARDS * PER_SHARD
    return root / "shards"


@pytest.fixture
def shards(shard_set, tmp_path) -> Path:
    return Path(shutil.copytree(shard_set, tmp_path / "shards"))


def _one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in message and "Traceback" not in message, message
    return message


# ---------------------------------------------------------------------------------------------------
# Lost shards count their samples (item 9)

def _pattern(shards: Path) -> str:
    return str(shards / f"shard-{{000000..{SHARDS - 1:06d}}}.tar")


@pytest.mark.parametrize("layout", ["pattern", "directory", "directory_without_indexes"])
@pytest.mark.parametrize("deleted", [1, 2])
def test_missing_shards_stop_the_run_when_the_source_is_built(shards, deleted, layout):
    """10% (20%) of the shards deleted: that is 10% (20%) of the samples, > 5%, known from the indexes left behind
    (or from make-shards' dataset.json when the indexes went too). Before, each counted as one bad sample per visit
    (1 of ~40) and the ceiling never tripped; a directory simply lost them without a word."""
    for i in range(deleted):
        (shards / f"shard-{3 + i:06d}.tar").unlink()
        if layout == "directory_without_indexes":
            (shards / f"shard-{3 + i:06d}.tar.json").unlink()
    with pytest.raises(DataError) as e:
        build_data(_shard_config(_pattern(shards) if layout == "pattern" else shards, max_bad_fraction=0.05))
    message = _one_line(e)
    assert f"{deleted} of the {SHARDS} shards of data.path are missing" in message
    assert f"{deleted * PER_SHARD} of 40 samples lost" in message and "data.max_bad_fraction=0.05" in message
    if layout == "directory_without_indexes":
        assert f"dataset.json (it lists 10 shards, {deleted} of them gone with their indexes)" in message
    else:
        assert "shard-000003.tar (the file does not exist" in message


def test_shard_lost_while_reading_stops_the_run_at_its_visit(shards):
    """A shard that disappears after the source was built (mid-run): its 4 samples count as bad at once, judged
    against the epoch's 40, so the first batches already stop (before: 1 bad sample of 37, never)."""
    from dopsd.data.wds_source import WebDatasetSource

    source = WebDatasetSource(_shard_config(shards, max_bad_fraction=0.05))
    first = source.plan(0).shards[0][0]  # the first shard the (only) reader visits
    Path(first).unlink()
    batches = source.batches({})
    with pytest.raises(DataError) as e:
        for _ in range(3):
            next(batches)
    message = _one_line(e)
    assert "4 samples are lost in missing or truncated shards, of the 40 rank 0 reads" in message
    assert "data.max_bad_fraction=0.05" in message and "unreadable_shard" in message


def test_lost_shards_within_the_ceiling_are_counted_by_their_samples_and_resume_exactly(shards, caplog):
    from dopsd.data.wds_source import WebDatasetSource

    (shards / "shard-000007.tar").unlink()
    cfg = _shard_config(_pattern(shards), max_bad_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="dopsd.data.wds_source"):
        source = WebDatasetSource(cfg)
    assert "1 of the 10 shards of data.path are missing or truncated: 4 of 40 samples lost" in caplog.text
    stream = source.batches({})
    steps = [next(stream) for _ in range(source.steps_per_epoch)]  # one epoch: 20 steps
    last = steps[-1][1]
    assert last["epoch"] == 1 and last["lost"] == 4 * last["skipped"]["unreadable_shard"] >= 4
    assert last["bad"] == last["lost"]  # nothing else was bad
    assert last["seen"] >= 40  # 36 read (and repeats to fill the budget) + 4 lost
    # a directory holds the shards that are there: the lost one is reported when built, then not read
    in_dir = WebDatasetSource(_shard_config(shards, max_bad_fraction=0.2))
    assert in_dir.num_samples == 36 and in_dir.steps_per_epoch == 18
    # a resume from any position continues the same batches and counters
    resumed = WebDatasetSource(cfg).batches(steps[5][1])
    for batch, position in steps[6:]:
        again, again_position = next(resumed)
        assert again["key"] == batch["key"] and again_position == position


def _cut(tar: Path, keep_samples: int, mid_member: bool) -> None:
    """Truncate a make-shards tar after `keep_samples` samples (3 members each): at a member boundary (a clean
    end, no tar error) or inside the next member's data."""
    with tarfile.open(tar) as tf:
        members = tf.getmembers()
    start = members[3 * keep_samples]
    data = tar.read_bytes()
    tar.write_bytes(data[:start.offset_data + 10] if mid_member else data[:start.offset])


@pytest.mark.parametrize("mid_member", [False, True], ids=["at_member_boundary", "inside_a_member"])
def test_truncated_shard_counts_the_samples_it_lost(shards, mid_member, caplog):
    from dopsd.data.wds_source import WebDatasetSource

    _cut(shards / "shard-000004.tar", 1, mid_member)  # 1 of its 4 samples left: 3 lost
    with caplog.at_level(logging.WARNING, logger="dopsd.data.wds_source"):
        source = WebDatasetSource(_shard_config(shards, max_bad_fraction=0.5))
    assert "3 of 40 samples lost" in caplog.text and "1 of its 4 samples readable" in caplog.text
    stream = source.batches({})
    for _ in range(source.steps_per_epoch):
        _, position = next(stream)
    visits = source.skipped["truncated_shard"]
    assert visits >= 1 and set(source.skipped) == {"truncated_shard"}
    assert source.lost == 3 * visits and source.bad == source.lost, (source.lost, source.bad, visits)
    assert position["lost"] == source.lost and position["bad"] == source.bad
    if not mid_member:  # a clean end of the tar: only the index tells that samples are missing
        assert "ended after 1 of the 4 samples its index lists (3 samples lost)" in caplog.text
    with pytest.raises(DataError, match=r"data.max_bad_fraction=0.05"):  # 3 of 40 is 7.5%
        WebDatasetSource(_shard_config(shards, max_bad_fraction=0.05))


# ---------------------------------------------------------------------------------------------------
# Errors when the source is built (item 6): no model, one type, the key named

def _image(path: Path, caption: str | None = "a photo\n") -> None:
    Image.new("RGB", (40, 40), (90, 20, 30)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def test_folder_errors_when_built(tmp_path):
    with pytest.raises(DataPathError, match="data.path: .* does not exist") as e:
        build_data(_config({"path": str(tmp_path / "nope")}))
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, DataError)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="data.path: .* is not a directory"):
        build_data(_config({"path": str(tmp_path / "file.txt")}))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as e:
        build_data(_config({"path": str(empty)}))
    assert "data.path: no usable image+caption pairs" in _one_line(e) and "holds no png/jpg/jpeg/webp" in str(e.value)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (bad / "a.txt").write_text("x\n")
    _image(bad / "b.png", caption=None)
    with pytest.raises(DataError) as e:
        build_data(_config({"path": str(bad)}))
    assert "all 2 images are bad (1 bad_image, 1 missing_caption)" in _one_line(e)


def test_folder_honours_max_bad_fraction(tmp_path):
    for i in range(3):
        _image(tmp_path / f"ok{i}.png")
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "x.txt").write_text("x\n")
    _image(tmp_path / "y.png", caption=None)
    with pytest.raises(DataError) as e:  # 2 of 5 bad, 40% > 20% (5 files >= 1 / 0.2)
        build_data(_config({"path": str(tmp_path), "max_bad_fraction": 0.2}))
    assert "2 of the 5 samples" in _one_line(e) and "data.max_bad_fraction=0.2" in str(e.value)
    assert build_data(_config({"path": str(tmp_path), "max_bad_fraction": 0.5})).num_samples == 3
    # the default 0.01 needs 100 files to judge a fraction: 2 bad of 5 are skipped (as the shard reader's check)
    assert build_data(_config({"path": str(tmp_path)})).skipped == {"bad_image": 1, "missing_caption": 1}


def test_shard_paths_that_name_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataPathError, match="data.path: no .tar shards in the directory"):
        build_data(_shard_config(tmp_path / "empty"))
    for path, fragment in ((tmp_path / "empty/shard-{000000..000003}.tar", "any of the 4 shard files"),
                           (tmp_path / "empty/*.tar", "glob patterns are not expanded"),
                           (f"{tmp_path}/a.tar::{tmp_path}/b.tar", "any of the 2 shard files")):
        with pytest.raises(DataPathError) as e:
            build_data(_shard_config(path))
        assert _one_line(e).startswith("data.path: ") and fragment in str(e.value)
        assert isinstance(e.value, FileNotFoundError)


@pytest.mark.parametrize("workers", [0, 2])
def test_shards_that_yield_nothing(tmp_path, workers):
    for name in ("a.tar", "b.tar"):
        (tmp_path / name).write_bytes(b"this is not a tar file" * 40)
    path = f"{tmp_path}/a.tar::{tmp_path}/b.tar"
    with pytest.raises(DataError) as e:  # counted when built: nothing readable
        build_data(_shard_config(path, num_workers=workers))
    assert "hold no readable sample" in _one_line(e)
    source = build_data(_shard_config(path, num_workers=workers, steps_per_epoch=2))  # not counted: found reading
    with pytest.raises(DataError) as e:
        next(source.batches({}))
    assert "data.path: none of the" in _one_line(e) and "yields a sample" in str(e.value)  # one line, from workers too


# ---------------------------------------------------------------------------------------------------
# A checkpoint's data position made with another batch size

def test_webdataset_position_from_another_batch_size(shards):
    source = build_data(_shard_config(shards, steps_per_epoch=8))
    stream = source.batches({})
    for _ in range(3):
        _, position = next(stream)
    smaller = build_data(_config({"type": "webdataset", "path": str(shards), "shuffle_buffer": 4,
                                  "steps_per_epoch": 8}, batch_size=1))
    with pytest.raises(DataError) as e:
        next(smaller.batches(position))
    message = _one_line(e)
    assert "train.batch_size=2" in message and "train.batch_size=1" in message
    old = {k: v for k, v in position.items() if k != "batch_size"}  # older positions: from "samples"
    with pytest.raises(DataError, match="train.batch_size=2, this run has train.batch_size=1"):
        next(smaller.batches(old))
    # without a fixed data.steps_per_epoch the epoch length changes too: named as such
    derived = build_data(_config({"type": "webdataset", "path": str(shards), "shuffle_buffer": 4}, batch_size=1))
    stream = build_data(_shard_config(shards)).batches({})
    _, position = next(stream)
    with pytest.raises(DataError, match="train.batch_size=2"):
        next(derived.batches(position))
    for key in ("batch_size", "samples"):  # a position that cannot tell its batch size
        position.pop(key)
    with pytest.raises(DataError, match=r"data.steps_per_epoch \(set, or from the shards and the global batch\): 20 "
                                        r"then, 40 now"):
        next(derived.batches(position))


def test_folder_position_from_another_batch_size(tmp_path):
    for i in range(6):
        _image(tmp_path / f"{i}.png")
    stream = build_data(_config({"path": str(tmp_path)})).batches({})
    _, position = next(stream)
    assert position == {"epoch": 0, "step_in_epoch": 1, "batch_size": 2, "world_size": 1}
    with pytest.raises(DataError) as e:
        next(build_data(_config({"path": str(tmp_path)}, batch_size=3)).batches(position))
    message = _one_line(e)
    assert "train.batch_size=2 x 1 ranks" in message and "train.batch_size=3 x 1 ranks" in message
    assert next(build_data(_config({"path": str(tmp_path)})).batches(position))[1]["step_in_epoch"] == 2
