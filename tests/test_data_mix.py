"""Datasets as a list (issue 21, item 1): folders, manifests and shards mixed, repeats and weights, what an epoch
holds (counted), and exact resume in the middle of a mixed epoch on 1 and 2 ranks."""
from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from dopsd.config import ConfigError, from_dict
from dopsd.data import DataError, DataPathError, build_data


def _folder(root, prefix: str, n: int, size=(40, 40)):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (i * 9 % 256, 50, len(prefix) * 30)).save(root / f"{prefix}{i:02d}.png")
        (root / f"{prefix}{i:02d}.txt").write_text(f"{prefix} {i}\n")
    return root


def _manifest(root, prefix: str, n: int):
    _folder(root / "imgs", prefix, n, size=(80, 40))  # wide: another bucket with aspect_buckets
    lines = [json.dumps({"image": f"imgs/{prefix}{i:02d}.png", "caption": f"{prefix} line {i}"}) for i in range(n)]
    (root / "m.jsonl").write_text("\n".join(lines) + "\n")
    return root / "m.jsonl"


def _cfg(datasets, batch: int = 2, **data):
    return from_dict({"model": {"path": "no-model"}, "train": {"batch_size": batch, "seed": 7},
                      "data": {"resolution": [32, 32], "datasets": datasets, **data}})


@pytest.fixture
def two(tmp_path):
    return _folder(tmp_path / "a", "a", 4), _folder(tmp_path / "b", "b", 6)


def _epoch(source, stream=None):
    stream = stream or source.batches({})
    keys = Counter()
    served = Counter()
    for _ in range(source.steps_per_epoch):
        batch, _ = next(stream)
        keys.update(batch["key"])
        served[batch["dataset"]] += 1
    return keys, served


def test_repeats_make_a_dataset_appear_n_times_per_epoch(two):
    a, b = two
    plain = build_data(_cfg([{"path": str(a)}, {"path": str(b)}]))
    keys, served = _epoch(plain)
    assert plain.steps_per_epoch == 2 + 3 and served == {0: 2, 1: 3}
    assert set(keys.values()) == {1} and len(keys) == 10  # everything once
    repeated = build_data(_cfg([{"path": str(a), "repeats": 3}, {"path": str(b)}]))
    stream = repeated.batches({})
    for _ in range(2):  # every epoch, not only the first
        keys, served = _epoch(repeated, stream)
        assert repeated.steps_per_epoch == 3 * 2 + 3 and served == {0: 6, 1: 3}
        assert {k: n for k, n in keys.items() if k.startswith("a")} == {f"a{i:02d}": 3 for i in range(4)}
        assert {k: n for k, n in keys.items() if k.startswith("b")} == {f"b{i:02d}": 1 for i in range(6)}
    assert repeated.num_samples == 3 * 4 + 6
    described = repeated.describe()
    assert [d["samples"] for d in described["datasets"]] == [4, 6] and described["samples"] == 10
    assert [d["steps_in_epoch"] for d in described["datasets"]] == [6, 3]


def test_repeated_visits_draw_new_captions_crops_and_dropout(two):
    """Repeat r of dataset i in epoch e is its own epoch e * repeats + r: not three copies of one draw."""
    a, _ = two
    (a / "a00.txt").write_text("one\ntwo\nthree\nfour\n")
    source = build_data(_cfg([{"path": str(a), "repeats": 8}], batch=1))
    stream = source.batches({})
    prompts = Counter()
    for _ in range(source.steps_per_epoch):
        batch, _ = next(stream)
        if batch["key"] == ["a00"]:
            prompts[batch["prompt"][0]] += 1
    assert sum(prompts.values()) == 8 and len(prompts) > 1


def test_weights_are_shares_of_every_epoch(two):
    a, b = two
    source = build_data(_cfg([{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}]))
    assert source.steps_per_epoch == 2 + 3  # as many steps as one pass over both
    stream = source.batches({})
    total = Counter()
    for _ in range(4):
        keys, served = _epoch(source, stream)
        assert served == {0: 4, 1: 1}  # 5 x 3/4 = 3.75 -> 4 (largest remainder), 1.25 -> 1
        total.update(keys)
    assert sum(n for k, n in total.items() if k.startswith("a")) == 4 * 4 * 2
    assert set(n for k, n in total.items() if k.startswith("a")) == {8}  # a's own epochs go round evenly
    assert sum(n for k, n in total.items() if k.startswith("b")) == 4 * 1 * 2
    flipped = build_data(_cfg([{"path": str(a), "weight": 1}, {"path": str(b), "weight": 3}]))
    assert _epoch(flipped)[1] == {0: 1, 1: 4}
    # a's own epochs straddle the mixture's: a resume there is still exact
    straight = list(itertools.islice(source.batches({}), 13))
    resumed = source.batches(straight[6][1])
    assert [b["key"] for b, _ in straight[7:]] == [next(resumed)[0]["key"] for _ in straight[7:]]


def test_one_element_list_is_the_data_path_shorthand(two):
    a, _ = two
    alone = build_data(from_dict({"model": {"path": "m"}, "train": {"batch_size": 2, "seed": 7},
                                  "data": {"path": str(a), "resolution": [32, 32]}}))
    listed = build_data(_cfg([{"path": str(a)}]))
    s1, s2 = alone.batches({}), listed.batches({})
    for _ in range(6):
        (b1, _), (b2, _) = next(s1), next(s2)
        assert b1["key"] == b2["key"] and b1["prompt"] == b2["prompt"] and torch.equal(b1["image"], b2["image"])


def _mixed(tmp_path, batch: int, rank: int = 0, world: int = 1, shards: bool = False):
    a, b = _folder(tmp_path / "a", "a", 5), _manifest(tmp_path / "m", "m", 7)
    datasets = [{"path": str(a), "repeats": 2, "caption_dropout": 0.3, "crop": "random"},
                {"path": str(b), "type": "manifest", "aspect_buckets": True}]
    if shards:
        from dopsd.data.shards import make_shards

        if not (tmp_path / "shards").exists():
            make_shards(str(_folder(tmp_path / "s", "s", 12)), str(tmp_path / "shards"), samples_per_shard=4,
                        progress=False)
        datasets.append({"path": str(tmp_path / "shards"), "type": "webdataset", "cached_features": False})
    return build_data(_cfg(datasets, batch=batch, shuffle_buffer=3, num_workers=0), rank, world)


def _record(batch) -> tuple:
    return batch["dataset"], tuple(batch["key"]), tuple(batch["prompt"]), float(batch["image"].sum())


@pytest.mark.parametrize("shards", [False, True])
def test_resume_mid_mixed_epoch_is_exact(tmp_path, shards):
    source = _mixed(tmp_path, batch=2, shards=shards)
    steps = source.steps_per_epoch
    assert steps == 2 * 3 + 4 + (6 if shards else 0)  # a: 2 x ceil(5/2); m: 7 wide in one bucket; s: 12 / 2
    stream = source.batches({})
    straight = [next(stream) for _ in range(steps + 4)]
    assert {b["dataset"] for b, _ in straight[:steps]} == ({0, 1, 2} if shards else {0, 1})
    json.dumps(straight[3][1])  # positions are JSON-able (checkpoints)
    for cut in (1, steps // 2, steps - 1, steps, steps + 2):
        resumed = _mixed(tmp_path, batch=2, shards=shards).batches(json.loads(json.dumps(straight[cut - 1][1])))
        for batch, position in straight[cut:]:
            again, again_position = next(resumed)
            assert _record(again) == _record(batch) and again_position == position


def test_two_ranks_agree_on_the_dataset_and_bucket_and_resume_exactly(tmp_path):
    """2 ranks x batch 1 (one process: folder and manifest sources need no process group) hold one dataset and one
    shape at every step, together the global batch of 1 rank x batch 2, and resume exactly mid-epoch."""
    single = _mixed(tmp_path, batch=2)
    ranks = [_mixed(tmp_path, batch=1, rank=r, world=2) for r in range(2)]
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == single.steps_per_epoch
    alone, pair = single.batches({}), [r.batches({}) for r in ranks]
    history = []
    for _ in range(single.steps_per_epoch + 3):
        both, _ = next(alone)
        parts = [next(p) for p in pair]
        assert parts[0][0]["dataset"] == parts[1][0]["dataset"] == both["dataset"]
        assert parts[0][0]["image"].shape == parts[1][0]["image"].shape
        assert [k for (b, _) in parts for k in b["key"]] == both["key"]
        assert [p for (b, _) in parts for p in b["prompt"]] == both["prompt"]  # dropout: rank-layout independent
        assert torch.equal(torch.cat([b["image"] for b, _ in parts]), both["image"])  # and random crops
        history.append(parts)
    cut = single.steps_per_epoch // 2
    for r in range(2):
        resumed = _mixed(tmp_path, batch=1, rank=r, world=2).batches(history[cut - 1][r][1])
        for parts in history[cut:]:
            again, position = next(resumed)
            assert _record(again) == _record(parts[r][0]) and position == parts[r][1]


def test_dataset_keys_and_errors_name_the_entry(two, tmp_path):
    a, b = two
    with pytest.raises(ConfigError, match=r"data.datasets\[1\].repeats: must be > 0"):
        _cfg([{"path": str(a)}, {"path": str(b), "repeats": 0}])
    with pytest.raises(ConfigError, match=r"data.datasets\[1\].weight: must be > 0"):
        _cfg([{"path": str(a), "weight": 2}, {"path": str(b)}])
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].path: required"):
        _cfg([{"type": "folder"}])
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].type: 'tar'"):
        _cfg([{"path": str(a), "type": "tar"}])
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].colour: unknown key"):
        _cfg([{"path": str(a), "colour": 1}])
    with pytest.raises(DataPathError, match=r"data.datasets\[1\] \(.*nope\): data.path: .* does not exist"):
        build_data(_cfg([{"path": str(a)}, {"path": str(tmp_path / "nope")}]))
    source = build_data(_cfg([{"path": str(a)}, {"path": str(b)}]))
    _, position = next(source.batches({}))
    with pytest.raises(DataError, match="data.datasets: .*made with the datasets"):
        next(build_data(_cfg([{"path": str(a)}, {"path": str(b), "repeats": 2}])).batches(position))
    with pytest.raises(DataError, match="made with one dataset"):
        next(source.batches({"epoch": 0, "step_in_epoch": 1}))


def _mixed_rank(rank: int, world: int, address: str, config: dict, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world)
    try:
        cfg = from_dict(config)
        source = build_data(cfg, rank, world)
        stream = source.batches({})
        steps = [next(stream) for _ in range(source.steps_per_epoch + 5)]
        cut = source.steps_per_epoch // 2 + 1  # mid-epoch, both datasets under way
        resumed = build_data(cfg, rank, world).batches(json.loads(json.dumps(steps[cut - 1][1])))
        again = [next(resumed) for _ in steps[cut:]]
        out = {"steps": source.steps_per_epoch, "cut": cut,
               "straight": [[b["dataset"], b["key"], list(b["image"].shape), b["prompt"]] for b, _ in steps],
               "resumed": [[b["dataset"], b["key"], list(b["image"].shape), b["prompt"]] for b, _ in again],
               "positions_equal": [p == q for (_, p), (_, q) in zip(steps[cut:], again)]}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_process_ranks_mix_folders_and_shards_exactly_once_and_resume(tmp_path):
    """Real 2 ranks (gloo) x 2 shard reader workers: a folder with repeats 2 and shards, mixed. Per epoch every
    folder sample twice and every shard sample once across the ranks, one dataset per step on both, and a resume
    from the middle of the epoch continues with exactly the batches of the uninterrupted run."""
    import socket

    from dopsd.data.shards import make_shards

    folder = _folder(tmp_path / "a", "a", 4)
    make_shards(str(_folder(tmp_path / "s", "s", 32)), str(tmp_path / "shards"), samples_per_shard=4,
                progress=False)
    cfg = {"model": {"path": "no-model"}, "train": {"batch_size": 2, "seed": 3},
           "data": {"resolution": [32, 32], "num_workers": 2, "shuffle_buffer": 4, "caption_dropout": 0.25,
                    "cached_features": False,
                    "datasets": [{"path": str(folder), "repeats": 2},
                                 {"path": str(tmp_path / "shards"), "type": "webdataset"}]}}
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    torch.multiprocessing.spawn(_mixed_rank, args=(2, address, cfg, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    steps = ranks[0]["steps"]
    assert steps == ranks[1]["steps"] == 2 * 1 + 8  # a: 2 x ceil(4 / 4); shards: 32 / 4
    for a, b in zip(ranks[0]["straight"], ranks[1]["straight"]):
        assert a[0] == b[0] and a[2] == b[2]  # the same dataset and shape on both ranks at every step
    epoch = Counter(k for r in ranks for d, keys, _, _ in r["straight"][:steps] for k in keys)
    assert {k: n for k, n in epoch.items() if k.startswith("a")} == {f"a{i:02d}": 2 for i in range(4)}
    from_shards = {k: n for k, n in epoch.items() if not k.startswith("a")}
    assert len(from_shards) == 32 and set(from_shards.values()) == {1}  # each of the 32 exactly once
    prompts = [p for r in ranks for *_, ps in r["straight"] for p in ps]
    assert "" in prompts and len(set(prompts)) > 10
    for r in ranks:
        assert r["resumed"] == r["straight"][r["cut"]:] and all(r["positions_equal"])


def test_trainer_trains_on_a_bucketed_mix_with_dropped_captions(make_config, concept_dir, tmp_path):
    """The trainer as it is takes the mixed source: batches of two sizes (square folder, wide manifest in its
    bucket), empty captions encoded by the model, finite losses; the position it keeps is the mixture's."""
    from dopsd.trainer import Trainer

    manifest = _manifest(tmp_path / "wide", "w", 4)
    datasets = json.dumps([{"path": str(concept_dir), "caption_dropout": 1.0},  # every caption dropped
                           {"path": str(manifest), "type": "manifest", "aspect_buckets": True, "crop": "random"}])
    cfg = make_config(f"data.datasets={datasets}", "data.path=", "train.steps=4", "validation.prompts=[]",
                      "output.tensorboard=false")
    trainer = Trainer(cfg)
    seen = []
    step = trainer.train_step

    def recording(batch):
        seen.append((batch["dataset"], tuple(batch["image"].shape[-2:]), tuple(batch["prompt"])))
        return step(batch)

    trainer.train_step = recording
    summary = trainer.fit()
    assert summary["steps"] == 4
    assert {s[1] for s in seen} == {(32, 32), (16, 32)}  # 80 x 40 images in the 2:1 bucket, not squashed
    assert all(p == ("", "") for d, _, p in seen if d == 0) and any(d == 0 for d, _, _ in seen)
    records = [json.loads(line) for line in open(f"{cfg.output.dir}/log.jsonl")]
    assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in records if "loss" in r)
    assert trainer.position["datasets"] and trainer.position["layout"][1][0] == str(manifest)


def test_describe_lists_counts_bad_files_and_buckets_per_dataset(tmp_path):
    from dopsd.data.shards import make_shards

    folder = _folder(tmp_path / "a", "a", 4)
    (folder / "a01.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.new("RGB", (40, 40)).save(folder / "lonely.png")
    manifest = _manifest(tmp_path / "m", "m", 3)
    make_shards(str(_folder(tmp_path / "s", "s", 8)), str(tmp_path / "shards"), samples_per_shard=4, progress=False)
    (tmp_path / "shards" / "shard-000001.tar").unlink()
    source = build_data(_cfg([{"path": str(folder), "repeats": 2},
                              {"path": str(manifest), "type": "manifest", "aspect_buckets": True},
                              {"path": str(tmp_path / "shards"), "type": "webdataset", "cached_features": False}],
                             max_bad_fraction=1.0))
    d = source.describe()
    json.dumps(d)
    assert [e["type"] for e in d["datasets"]] == ["folder", "manifest", "webdataset"]
    assert [e["samples"] for e in d["datasets"]] == [3, 3, 4] and d["samples"] == 10
    assert d["datasets"][0]["skipped"] == {"bad_image": 1, "missing_caption": 1}
    assert sorted((Path(f["path"]).name, f["kind"]) for f in d["bad_files"]) == [
        ("a01.png", "bad_image"), ("lonely.png", "missing_caption"), ("shard-000001.tar", "unreadable_shard")]
    assert d["datasets"][0]["buckets"] == {"32x32": 3} and d["datasets"][1]["buckets"] == {"16x32": 3}
    assert d["buckets"] == {"32x32": 3, "16x32": 3} and d["datasets"][2]["buckets"] == {}
    assert d["steps_per_epoch"] == source.steps_per_epoch == sum(e["steps_in_epoch"] for e in d["datasets"])
    assert [e["repeats"] for e in d["datasets"]] == [2, 1, 1]
