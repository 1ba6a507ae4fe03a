"""The WebDataset reader (dopsd/data/wds_source.py) on shards written by `make-shards` and by plain `tar`:
2 ranks x 2 workers coverage, cached == live features, encoders never loaded on cached shards, bad input,
the bad-fraction ceiling, and mid-epoch resume through the Trainer."""
from __future__ import annotations

import io
import itertools
import json
import os
import random
import socket
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from dopsd.data.shard_format import (PAPER_BUCKETS, apply_placeholder, assign_bucket, default_buckets,
                                     pack_features, read_features_header)
from dopsd.data.shards import make_shards
from dopsd.data.wds_source import DataError, WebDatasetSource, apportion, round_robin

wds = pytest.importorskip("webdataset")


def _write_folder(root: Path, count: int, wide_every: int = 0, seed: int = 0) -> Path:
    """`count` small images + .txt captions (2 variants); with wide_every=k, images i % k >= k/2 are 2:1 wide."""
    from dopsd.data.synthetic import draw_concept

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        img = draw_concept(rng, 32)[0]
        if wide_every and i % wide_every >= wide_every // 2:
            img = img.resize((64, 32))
        img.save(root / f"{i:03d}.png")
        (root / f"{i:03d}.txt").write_text(f"a photo of [V] ball number {i}\na [V] ball, picture {i}\n")
    return root


def _config(model_dir: Path, data_path: str, out_dir: Path, *overrides: str):
    from dopsd.config import from_dict

    data = {
        "model": {"path": str(model_dir), "teacher_min_pixels": 1024, "teacher_max_pixels": 4096},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "rollout_steps": 2, "ema_decay": 0.9},
        "data": {"type": "webdataset", "path": data_path, "resolution": [32, 32]},
        "output": {"dir": str(out_dir), "progress_bar": False, "tensorboard": False},
    }
    return from_dict(data, list(overrides))


@pytest.fixture(scope="module")
def cached_shards(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """8 samples (2 shards of 4) with student + teacher features of the tiny model; (shard dir, image dir)."""
    root = tmp_path_factory.mktemp("cached")
    images = _write_folder(root / "images", 8, wide_every=4)
    cfg = _config(tiny_model_dir, str(root / "shards"), root / "unused")
    summary = make_shards(str(images), str(root / "shards"), samples_per_shard=4, features="all", cfg=cfg,
                          progress=False)
    assert summary["shards"] == 2 and summary["samples"] == 8 and summary["skipped"] == {}
    return root / "shards", images


def _run(cfg, record_keys: list | None = None):
    from dopsd.trainer import Trainer

    trainer = Trainer(cfg)
    if record_keys is not None:
        step = trainer.train_step

        def recording(batch):
            record_keys.append(list(batch["key"]))
            return step(batch)

        trainer.train_step = recording
    return trainer, trainer.fit()


# ---------------------------------------------------------------------------------------------------
# Pieces

def test_buckets_and_budgets():
    assert default_buckets([1024, 1024]) == PAPER_BUCKETS
    tiny = default_buckets([32, 32])
    assert [32, 32] in tiny and all(h % 16 == 0 and w % 16 == 0 for h, w in tiny) and len(tiny) == len(
        {tuple(b) for b in tiny})
    assert assign_bucket(64, 32, tiny) == (16, 32) and assign_bucket(30, 31, tiny) == (32, 32)
    assert assign_bucket(1920, 1080, PAPER_BUCKETS) == (720, 1280)
    assert apportion(8, [8, 8]) == [4, 4] and apportion(7, [3, 1, 0]) == [5, 2, 0] and sum(apportion(5, [0, 0])) == 5
    assert round_robin([2, 1, 2]) == [0, 1, 2, 0, 2]


def _rank_main(rank: int, world: int, port: int, cfg_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    from dopsd.config import load_config

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        source = WebDatasetSource(load_config(cfg_path), rank, world)
        batches = source.batches({})
        epochs = []
        for _ in range(2):
            steps = []
            for _ in range(source.steps_per_epoch):
                batch, position = next(batches)
                assert len({tuple(s) for s in (img.shape for img in batch["image"])}) == 1
                steps.append({"keys": [f"{Path(s).name}/{k}" for s, k in zip(batch["shard"], batch["key"])],
                              "shape": list(batch["image"].shape), "position": position})
            epochs.append(steps)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"epochs": epochs, "steps": source.steps_per_epoch,
                                                                  "workers": source.workers}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_ranks_two_workers_every_sample_once_per_epoch(tmp_path):
    images = _write_folder(tmp_path / "images", 32, wide_every=4)  # every shard: 2 square + 2 wide images
    make_shards(str(images), str(tmp_path / "shards"), samples_per_shard=4, progress=False)
    cfg = {"model": {"path": str(tmp_path / "no-model")},
           "train": {"batch_size": 2},
           "data": {"type": "webdataset", "path": str(tmp_path / "shards/shard-{000000..000007}.tar"),
                    "resolution": [32, 32], "num_workers": 2, "shuffle_buffer": 8}}
    import yaml

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_main, args=(2, port, str(tmp_path / "cfg.yaml"), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    everything = sorted(f"shard-{s:06d}.tar/{s * 4 + i:08d}_{s * 4 + i:03d}" for s in range(8) for i in range(4))
    assert ranks[0]["steps"] == ranks[1]["steps"] == 8  # 32 samples / (2 ranks x batch 2)
    assert ranks[0]["workers"] == ranks[1]["workers"] == 2
    orders = []
    for epoch in range(2):
        steps = [len(r["epochs"][epoch]) for r in ranks]
        assert steps == [8, 8]
        seen = [k for r in ranks for step in r["epochs"][epoch] for k in step["keys"]]
        assert sorted(seen) == everything, "every sample exactly once per epoch"
        shapes = {tuple(step["shape"][-2:]) for r in ranks for step in r["epochs"][epoch]}
        assert shapes == {(32, 32), (16, 32)}  # two buckets, never mixed within a batch (checked per batch)
        orders.append([k for step in ranks[0]["epochs"][epoch] for k in step["keys"]])
        last = ranks[0]["epochs"][epoch][-1]["position"]
        assert last["epoch"] == epoch + 1 and last["step_in_epoch"] == 0
    assert orders[0] != orders[1], "shards and samples are reshuffled every epoch"
    mid = ranks[1]["epochs"][0][2]["position"]
    assert mid["step_in_epoch"] == 3 and mid["samples"] == 6 and sum(mid["worker_batches"]) == 3


def test_cached_features_equal_live_encoders(cached_shards, tiny_model_dir, tmp_path):
    from dopsd.models import load_backend

    shards, _ = cached_shards
    cfg = _config(tiny_model_dir, str(shards), tmp_path / "run")
    backend = load_backend(cfg.model)
    n = 0
    for sample in wds.WebDataset(str(shards / "shard-{000000..000001}.tar"), shardshuffle=False):
        header, meta = read_features_header(sample["features.safetensors"])
        assert meta["backend"] == "zimage" and meta["variants"] == "2"
        from safetensors.torch import load

        feats = load(sample["features.safetensors"])
        info = json.loads(sample["json"])
        captions = [apply_placeholder(c, "[V]", "") for c in info["captions"]]
        image = Image.open(io.BytesIO(sample["png"]))
        h, w = info["bucket"]
        from dopsd.data.images import resize_center_crop, to_tensor

        pixels = to_tensor(resize_center_crop(image, h, w))
        for i, prompt in enumerate(captions):
            assert torch.allclose(feats[f"student.{i}"], backend.encode_student([prompt])[0], atol=1e-6)
            live = backend.encode_teacher([prompt], pixels[None])[0]
            assert torch.allclose(feats[f"teacher.{i}"], live, atol=1e-6)
        n += 1
    assert n == 8
    # ... and what the reader hands the trainer equals the live encoders on the batch it hands over
    source = WebDatasetSource(cfg)
    batch, _ = next(source.batches({}))
    live_s = backend.encode_student(batch["prompt"])
    live_t = backend.encode_teacher(batch["prompt"], batch["image"])
    for cached, live in zip(batch["student_context"] + batch["teacher_context"], live_s + live_t):
        assert cached.shape == live.shape and torch.allclose(cached, live, atol=1e-5)


def test_fully_cached_run_never_loads_the_encoders(cached_shards, tiny_model_dir, tmp_path, monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("an encoder was loaded although every sample has cached features")

    monkeypatch.setattr(transformers.Qwen3Model, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.Qwen3VLForConditionalGeneration, "from_pretrained", refuse)
    cfg = _config(tiny_model_dir, str(cached_shards[0]), tmp_path / "run", "data.num_workers=2")
    trainer, summary = _run(cfg)
    assert summary["steps"] == 3 and summary["data_skipped"] == {}
    assert trainer.backend.loaded_encoders() == []  # neither the text encoder nor Qwen3-VL
    assert (tmp_path / "run/exports/final/pytorch_lora_weights.safetensors").is_file()


def test_plain_tar_shards_train(tiny_model_dir, tmp_path):
    src = tmp_path / "files"
    src.mkdir()
    rng = random.Random(3)
    from dopsd.data.synthetic import draw_concept

    for i in range(4):
        draw_concept(rng, 32)[0].save(src / f"sample{i}.jpg", quality=90)
        (src / f"sample{i}.txt").write_text(f"a photo of [V] ball {i}\n")
    subprocess.run(["tar", "cf", str(tmp_path / "plain.tar"), "-C", str(src), "."], check=True)
    keys = []
    cfg = _config(tiny_model_dir, str(tmp_path / "plain.tar"), tmp_path / "run", "train.objective=sft")
    _, summary = _run(cfg, keys)
    assert summary["steps"] == 3 and summary["data_skipped"] == {}
    assert {k for step in keys[:2] for k in step} == {f"./sample{i}" for i in range(4)}  # one epoch = 2 steps


# ---------------------------------------------------------------------------------------------------
# Bad input

def _bad_shards(cached: Path, root: Path) -> str:
    """A '::' list: a shard of 4 bad samples, a truncated tar, a missing one, a good shard and another read
    through a `pipe:` URL. (Read unshuffled, so every bad one is met once before the first batch.)"""
    root.mkdir(parents=True, exist_ok=True)
    good = [s for s in wds.WebDataset(str(cached / "shard-000000.tar"), shardshuffle=False)]
    bad = []
    corrupt = dict(good[0], png=b"\x89PNG\r\n\x1a\n not an image")
    no_caption = {k: v for k, v in good[1].items() if k not in ("txt", "json")}
    wrong_shape = dict(good[2])
    _, meta = read_features_header(good[2]["features.safetensors"])
    wrong_shape["features.safetensors"] = pack_features([torch.zeros(3, 7), torch.zeros(3, 7)], None,
                                                        {k: v for k, v in meta.items() if k != "format"})
    wrong_fp = dict(good[3])
    wrong_fp["features.safetensors"] = pack_features([torch.zeros(3, 32), torch.zeros(3, 32)], None,
                                                     {**{k: v for k, v in meta.items() if k != "format"},
                                                      "fingerprint": "0" * 32})
    for i, s in enumerate((corrupt, no_caption, wrong_shape, wrong_fp)):
        bad.append({k: v for k, v in s.items() if not k.startswith("__")} | {"__key__": f"bad{i}"})
    with wds.TarWriter(str(root / "bad.tar")) as w:
        for s in bad:
            w.write(s)
    data = (cached / "shard-000001.tar").read_bytes()
    (root / "truncated.tar").write_bytes(data[:700])  # ends inside the first member
    return "::".join([str(root / "bad.tar"), str(root / "truncated.tar"), str(root / "missing.tar"),
                      str(cached / "shard-000000.tar"), f"pipe:cat {cached / 'shard-000001.tar'}"])


EXPECTED_BAD = {"bad_image": 1, "missing_caption": 1, "bad_features": 1, "feature_fingerprint": 1,
                "truncated_shard": 1, "unreadable_shard": 1}


def test_every_bad_input_kind_is_skipped_counted_and_logged(cached_shards, tiny_model_dir, tmp_path):
    path = _bad_shards(cached_shards[0], tmp_path / "bad")
    cfg = _config(tiny_model_dir, path, tmp_path / "run", "data.max_bad_fraction=0.8", "data.shuffle=false")
    _, summary = _run(cfg)
    assert summary["steps"] == 3
    assert summary["data_skipped"] == EXPECTED_BAD
    log = (tmp_path / "run/train.log").read_text()
    for fragment in ("bad.tar key bad0 (bad_image)", "bad.tar key bad1 (missing_caption)",
                     "bad.tar key bad2 (bad_features)", "bad.tar key bad3 (feature_fingerprint)",
                     "truncated.tar key - (truncated_shard)", "missing.tar key - (unreadable_shard)"):
        assert fragment in log, fragment
    records = [json.loads(line) for line in open(tmp_path / "run/log.jsonl")]
    assert records[-1]["data_skipped"] == EXPECTED_BAD


def test_bad_fraction_ceiling_stops_the_run(cached_shards, tiny_model_dir, tmp_path):
    from dopsd.trainer import Trainer

    path = _bad_shards(cached_shards[0], tmp_path / "bad")
    cfg = _config(tiny_model_dir, path, tmp_path / "run", "data.max_bad_fraction=0.2", "data.shuffle=false")
    with pytest.raises(DataError, match=r"data.max_bad_fraction=0.2"):
        Trainer(cfg).fit()


# ---------------------------------------------------------------------------------------------------
# Resume

def test_resume_mid_epoch_continues_from_the_recorded_position(tiny_model_dir, tmp_path):
    images = _write_folder(tmp_path / "images", 16, wide_every=4)
    make_shards(str(images), str(tmp_path / "shards"), samples_per_shard=4, progress=False)
    common = ("data.num_workers=2", "data.shuffle_buffer=4", "train.objective=sft", "train.mode=full",
              "train.lr=1e-4")
    straight: list = []
    _run(_config(tiny_model_dir, str(tmp_path / "shards"), tmp_path / "a", "train.steps=5", *common), straight)
    first: list = []
    _run(_config(tiny_model_dir, str(tmp_path / "shards"), tmp_path / "b", "train.steps=3", *common), first)
    from dopsd.checkpoint import load_rank_state

    state = json.loads(load_rank_state(tmp_path / "b/checkpoints/step_00000003", 0)[0]["data_position"])
    assert state["epoch"] == 0 and state["step_in_epoch"] == 3 and state["samples"] == 6
    assert state["workers"] == 2 and sum(state["worker_batches"]) == 3
    second: list = []
    _run(_config(tiny_model_dir, str(tmp_path / "shards"), tmp_path / "b", "train.steps=5",
                 "checkpoint.resume=latest", *common), second)
    assert len(straight) == 5 and len(first) == 3 and len(second) == 2
    assert first == straight[:3] and second == straight[3:], "the resumed run continues the same sequence"
    seen = Counter(k for step in straight[:4] for k in step)  # one epoch: 16 samples / batch 2 = 8 steps
    assert max(seen.values()) == 1


@pytest.mark.parametrize("sampling", ["epoch", "resampled"])
def test_source_resumes_exactly_from_any_step(tmp_path, sampling):
    """5 shards on 2 workers (unequal shares, so unequal budgets): from a position recorded at any step, the
    continuation equals the uninterrupted sequence, across the epoch boundary."""
    from dopsd.config import from_dict

    images = _write_folder(tmp_path / "images", 20)
    make_shards(str(images), str(tmp_path / "shards"), samples_per_shard=4, progress=False)
    cfg = from_dict({"model": {"path": str(tmp_path / "no-model")}, "train": {"batch_size": 2},
                     "data": {"type": "webdataset", "path": str(tmp_path / "shards"), "resolution": [32, 32],
                              "num_workers": 2, "shuffle_buffer": 3, "sampling": sampling}})
    source = WebDatasetSource(cfg)
    assert source.steps_per_epoch == 10
    if sampling == "epoch":
        assert sorted(source.plan(0).budgets) == [4, 6]
    stream = source.batches({})
    straight = [next(stream) for _ in range(14)]
    if sampling == "epoch":
        first_epoch = [k for batch, _ in straight[:10] for k in batch["key"]]
        assert len(first_epoch) == len(set(first_epoch)) == 20
    for cut in (3, 9, 10, 12):
        resumed = WebDatasetSource(cfg).batches(straight[cut - 1][1])
        for batch, position in straight[cut:]:
            again, again_position = next(resumed)
            assert again["key"] == batch["key"] and again_position == position


# ---------------------------------------------------------------------------------------------------
# Editing data: reference members

def test_reference_members_round_trip_bucket_and_bad_ones_are_counted(tmp_path):
    """Folder -> make-shards -> reader: the same reference tensors as the folder dataset, batches bucketed by
    reference size, a corrupt or missing reference member skipped and counted; plain tar reads too."""
    from dopsd.config import from_dict
    from dopsd.data.folder import FolderDataset
    from dopsd.data.synthetic import write_edit_folder

    src = write_edit_folder(tmp_path / "in", count=8, size=64, seed=4)
    for i in range(4, 8):  # half the samples get a wider reference: a second reference-size bucket
        Image.open(src / f"{i:03d}.ref0.png").resize((96, 64)).save(src / f"{i:03d}.ref0.png")
    make_shards(str(src), str(tmp_path / "shards"), samples_per_shard=4, progress=False)
    good = list(wds.WebDataset(str(tmp_path / "shards/shard-000000.tar"), shardshuffle=False))
    with wds.TarWriter(str(tmp_path / "shards/shard-000002.tar")) as w:
        base = {k: v for k, v in good[0].items() if not k.startswith("__")}
        w.write(base | {"__key__": "corrupt", "ref0.png": b"\x89PNG\r\n\x1a\n broken"})
        w.write({k: v for k, v in base.items() if k != "ref0.png"} | {"__key__": "gap", "ref1.png": base["ref0.png"]})
    cfg = from_dict({"model": {"path": str(tmp_path / "no-model")}, "train": {"batch_size": 2},
                     "data": {"type": "webdataset", "path": str(tmp_path / "shards"), "resolution": [32, 32],
                              "steps_per_epoch": 4, "shuffle_buffer": 1, "max_bad_fraction": 0.5}})
    source = WebDatasetSource(cfg)
    folder = FolderDataset(src, 32, 32)
    by_name = {it.image.stem: i for i, it in enumerate(folder.items)}
    seen = []
    for batch, _ in itertools.islice(source.batches({}), 4):
        (refs,) = batch["references"]
        assert refs.shape[1:] in ((3, 64, 64), (3, 64, 96)) and refs.shape[0] == 2
        for key, ref, image in zip(batch["key"], refs, batch["image"]):
            expected = folder[by_name[key.split("_", 1)[1]]]
            assert torch.equal(ref, expected["references"][0]) and torch.equal(image, expected["image"])
            seen.append(key)
    assert len(set(seen)) == 8
    assert source.skipped == {"bad_reference": 2}

    plain = tmp_path / "plain.tar"  # KEY.png + KEY.txt + KEY.ref0.png, as `tar` lays them out
    subprocess.run(["tar", "cf", str(plain), "-C", str(src), "."], check=True)
    cfg = from_dict({"model": {"path": "m"}, "train": {"batch_size": 1},
                     "data": {"type": "webdataset", "path": str(plain), "resolution": [32, 32], "shuffle": False}})
    batch, _ = next(WebDatasetSource(cfg).batches({}))
    assert batch["references"][0].shape[0] == 1 and not WebDatasetSource(cfg).skipped
