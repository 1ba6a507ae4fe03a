"""WebDataset reader throughput and the value of cached encoder features.

    python benchmarks/bench_data.py [--out benchmarks/results/data_cpu.md] [--steps 8]

1. Reader samples/s (tar read + JPEG decode + bucket + resize/crop + batch, i.e. what `WebDatasetSource.batches`
   delivers) for 256x256 and 1024x1024 JPEGs (and 1365x1024 photos, which pay a real resize into the 1152x864
   bucket): one reader worker (in-process, `data.num_workers=0`), and 2 DataLoader workers for comparison.
2. The trainer's consumption rate (samples/s of D-OPSD LoRA steps on the tiny checkpoint, batch 2,
   64x64, cached features), against which the reader rate is compared (how many workers a rank needs).
3. Training step time with cached features vs live encoders: in one trainer, each batch is trained once with its
   cached features and once with live encoders (paired, so machine load affects both alike).

Figures go to --out (markdown) and the same name with .json; nothing is asserted.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _device() -> str:
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def photo_like(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A JPEG (quality 90) with photo-like statistics: smooth low-frequency structure plus grain."""
    from PIL import Image

    small = (rng.random((max(2, height // 64), max(2, width // 64), 3)) * 255).astype(np.uint8)
    img = np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC), dtype=np.float32)
    img += rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_jpeg_shards(out: Path, count: int, width: int, height: int, per_shard: int) -> float:
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    total = 0
    with wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=per_shard, verbose=0) as w:
        for i in range(count):
            data = photo_like(rng, width, height)
            total += len(data)
            w.write({"__key__": f"{i:06d}", "jpg": data, "txt": f"a photo number {i}".encode()})
    return total / count


def reader_rate(shards: Path, count: int, resolution: int, workers: int, batch: int, epochs: int) -> dict:
    from dopsd.config import from_dict
    from dopsd.data.wds_source import WebDatasetSource

    cfg = from_dict({"model": {"path": "unused"}, "train": {"batch_size": batch},
                     "data": {"type": "webdataset", "path": str(shards), "resolution": [resolution, resolution],
                              "num_workers": workers, "shuffle_buffer": 16, "steps_per_epoch": count // batch}})
    source = WebDatasetSource(cfg)
    stream = source.batches({})
    next(stream)  # warm-up: worker start, first shard open
    steps = source.steps_per_epoch * epochs - 1
    t0 = time.perf_counter()
    shapes = set()
    for _ in range(steps):
        images = next(stream)[0]["image"]
        shapes.add(tuple(images.shape[-2:]))
    dt = time.perf_counter() - t0
    del stream
    return {"samples_per_s": steps * batch / dt, "batches": steps, "seconds": dt, "bucket_sizes": sorted(shapes)}


def trainer_pairs(model_dir: Path, shards: Path, out: Path, steps: int) -> dict:
    """One trainer on fully cached shards; every batch is trained twice in a row, once with its cached features
    and once without them (live encoders), so that both see the same machine load: paired step times."""
    from dopsd.config import from_dict
    from dopsd.trainer import Trainer

    cfg = from_dict({
        "model": {"path": str(model_dir), "teacher_min_pixels": 4096, "teacher_max_pixels": 4096},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"steps": 2 * steps, "batch_size": 2, "lr": 1e-4, "rollout_steps": 4},
        "data": {"type": "webdataset", "path": str(shards), "resolution": [64, 64]},
        "output": {"dir": str(out), "progress_bar": False, "tensorboard": False},
    })
    trainer = Trainer(cfg)
    batches = trainer.data.batches({})
    times: dict[str, list[float]] = {"cached": [], "live": []}
    encode: dict[str, list[float]] = {"cached": [], "live": []}
    loaded_after_cached = None
    for i in range(steps + 1):
        batch, _ = next(batches)
        live = {k: v for k, v in batch.items() if not k.endswith("_context")}
        for name, b in (("cached", batch), ("live", live)):
            t0 = time.perf_counter()
            trainer.train_step(b)
            dt = time.perf_counter() - t0
            phases = trainer.timer.reset()
            if i == 0 and name == "cached":
                loaded_after_cached = bool(trainer.backend.loaded_encoders())
            if i > 0:  # the first pair pays warm-up and the live encoders' loading
                times[name].append(dt)
                encode[name].append(phases.get("encode", 0.0))
    ratios = [lv / c for c, lv in zip(times["cached"], times["live"])]
    return {name: {"step_s": statistics.median(times[name]), "encode_s": statistics.median(encode[name]),
                   "samples_per_s": 2 / statistics.median(times[name])} for name in times} | {
        "live_over_cached": statistics.median(ratios), "pairs": len(ratios),
        "encoders_loaded_by_cached_step": loaded_after_cached}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/data_cpu.md"))
    parser.add_argument("--steps", type=int, default=10, help="measured cached/live step pairs (after one warm-up)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)  # 2 threads on a shared 2-core box made step times swing 30x (spin-waits)
    from dopsd.data.shards import make_shards
    from dopsd.data.synthetic import write_concept_folder
    from dopsd.models import make_tiny_model

    results: dict = {"device": _device(), "torch": torch.__version__, "reader": [], "trainer": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, (w, h, count, res) in {"256x256": (256, 256, 256, 256), "1024x1024": (1024, 1024, 48, 1024),
                                         "1365x1024": (1365, 1024, 48, 1024)}.items():
            shards = work / f"jpeg-{name}"
            kb = write_jpeg_shards(shards, count, w, h, per_shard=16) / 1024
            for workers in (0, 2):
                r = reader_rate(shards, count, res, workers, batch=4, epochs=2 if count < 100 else 1)
                r.update(images=name, jpeg_kb=round(kb, 1), workers=max(1, workers), resolution=res,
                         mode="in-process" if workers == 0 else "DataLoader")
                results["reader"].append(r)
                print(f"reader {name} x{max(1, workers)}: {r['samples_per_s']:.1f} samples/s", flush=True)

        model = work / "tiny"
        make_tiny_model("zimage", str(model), seed=0)
        folder = write_concept_folder(work / "concept", count=16, size=64, seed=0)
        from dopsd.config import from_dict

        cfg = from_dict({"model": {"path": str(model), "teacher_min_pixels": 4096, "teacher_max_pixels": 4096},
                         "data": {"type": "webdataset", "path": str(work / "cached"), "resolution": [64, 64]}})
        t0 = time.perf_counter()
        summary = make_shards(str(folder), str(work / "cached"), samples_per_shard=8, features="all", cfg=cfg,
                              progress=False)
        results["make_shards"] = {"samples": summary["samples"], "seconds": time.perf_counter() - t0}
        results["trainer"] = t = trainer_pairs(model, work / "cached", work / "run", args.steps)
        print(f"trainer step: cached {t['cached']['step_s'] * 1000:.0f} ms, live {t['live']['step_s'] * 1000:.0f} ms",
              flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    per_worker = {r["images"]: r["samples_per_s"] for r in results["reader"] if r["mode"] == "in-process"}
    consume = results["trainer"]["cached"]["samples_per_s"]
    lines = [
        "# Data pipeline on CPU", "",
        f"Device: {results['device']}, torch {results['torch']}. Written by `benchmarks/bench_data.py`.", "",
        "## Reader (tar read + JPEG decode + bucket + resize/crop + batch of 4)", "",
        "| images | JPEG KiB | target | workers | samples/s | buckets seen |", "|---|---|---|---|---|---|",
    ]
    for r in results["reader"]:
        lines.append(f"| {r['images']} | {r['jpeg_kb']} | {r['resolution']}² buckets | {r['workers']} "
                     f"({r['mode']}) | {r['samples_per_s']:.1f} | {', '.join(f'{a}x{b}' for a, b in r['bucket_sizes'])} |")
    t = results["trainer"]
    lines += [
        "", "## Trainer (tiny Z-Image, D-OPSD LoRA, K=4, batch 2, 64x64)", "",
        f"Consumption rate with cached features: {consume:.2f} samples/s "
        f"({t['cached']['step_s'] * 1000:.0f} ms/step); one reader worker delivers "
        + ", ".join(f"{n}: {v / consume:.0f}x" for n, v in per_worker.items()) + " that rate.", "",
        "| features | step ms (median) | encode ms (median) |", "|---|---|---|",
    ]
    for name in ("cached", "live"):
        r = t[name]
        lines.append(f"| {name} | {r['step_s'] * 1000:.0f} | {r['encode_s'] * 1000:.1f} |")
    lines += ["", f"Live / cached step time: {t['live_over_cached']:.2f}x (median of {t['pairs']} pairs: each batch "
              f"trained with its cached features, then again without them, in one run; encoders loaded by the "
              f"first cached step: {t['encoders_loaded_by_cached_step']}).",
              f"make-shards with student + teacher features: {results['make_shards']['samples']} samples in "
              f"{results['make_shards']['seconds']:.1f} s (includes loading the model).", ""]
    out.write_text("\n".join(lines))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
