"""ZeRO-2 vs ZeRO-3 on 1 and 2 ranks: per-rank parameter memory, step time, collective bytes per step.

    python benchmarks/bench_zero.py [--sizes tiny mid] [--modes lora full] [--stages 2 3] [--ranks 1 2]
        [--steps 6] [--out benchmarks/results/zero_cpu.md] [--update] [--note LINE]

Each cell is a real `deepspeed` launch of the trainer (D-OPSD LoRA and full fine-tune, fp32, CPU/gloo or
GPU/nccl, whichever the machine has). "tiny" is the test checkpoint (DiT 0.6M parameters); "mid" widens
the same DiT to dim 768 x 8 layers (~90M). Step time is the mean over steps 2..N (the first pays warm-up).
Collective bytes are counted by wrapping torch.distributed before DeepSpeed loads (see _zero_worker.py).
Figures are written to --out (markdown) and --out with .json; nothing is asserted. With --update, the cells
measured now replace the rows with the same model/mode/zero/ranks in --out's JSON and the other rows are
kept; the replaced figures stay in the JSON (`previous`) and in a comparison table of the markdown.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SIZES = {"tiny": {}, "mid": {"dit_dim": 768, "dit_layers": 8}}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'}, {os.cpu_count()} cores)"


def run_cell(model_dir: Path, data_dir: Path, work: Path, mode: str, stage: int, ranks: int, steps: int) -> dict:
    out_dir = work / f"{model_dir.name}-{mode}-z{stage}-r{ranks}"
    cfg = {
        "model": {"path": str(model_dir), "teacher_min_pixels": 4096, "teacher_max_pixels": 4096},
        "lora": {"rank": 16, "alpha": 16},
        "train": {"mode": mode, "steps": steps, "batch_size": 1, "lr": 1e-4, "rollout_steps": 4},
        "data": {"path": str(data_dir), "resolution": [64, 64]},
        "output": {"dir": str(out_dir), "progress_bar": False, "tensorboard": False},
        "engine": {"type": "deepspeed", "deepspeed_config": str(REPO / f"configs/deepspeed/zero{stage}.json")},
    }
    cfg_path = work / f"{out_dir.name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    if not _has_cuda():
        env["DS_ACCELERATOR"] = "cpu"
    flag = "--num_gpus" if _has_cuda() else "--num_accelerators"
    stats = work / out_dir.name
    cmd = [str(Path(sys.executable).parent / "deepspeed"), flag, str(ranks), "--master_port", str(_port()),
           str(REPO / "benchmarks/_zero_worker.py"), "--config", str(cfg_path), "--bench-out", str(stats)]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{out_dir.name} failed:\n{r.stderr[-3000:]}")
    per_rank = [json.loads(Path(f).read_text()) for f in sorted(glob.glob(f"{stats}.rank*.json"))]
    log = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    times = [x["step_time"] for x in log if "step_time" in x][1:]
    start = next(x for x in log if x.get("event") == "start")
    steady = [s for r_ in per_rank for s in r_["per_step_bytes"][1:]]
    gather = sum(s.get("all_gather_into_tensor", 0) + s.get("_all_gather_base", 0) + s.get("all_gather", 0)
                 for s in steady) / max(len(steady), 1)
    reduce_ = sum(s.get("reduce_scatter_tensor", 0) + s.get("_reduce_scatter_base", 0) + s.get("all_reduce", 0)
                  for s in steady) / max(len(steady), 1)
    return {"model": model_dir.name, "mode": mode, "zero": stage, "ranks": ranks,
            "params_total": start["params_total"], "trainable": start["trainable_params"],
            "param_mb_per_rank": max(r_["param_bytes_local"] for r_ in per_rank) / 2 ** 20,
            "peak_rss_mb_per_rank": max(r_["max_rss_mb"] for r_ in per_rank),
            "step_s": sum(times) / max(len(times), 1),
            "allgather_mb_per_step_per_rank": gather / 2 ** 20,
            "reduce_mb_per_step_per_rank": reduce_ / 2 ** 20, "wall_s": time.time() - t0}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=sorted(SIZES))
    ap.add_argument("--modes", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--stages", nargs="+", type=int, default=[2, 3])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/zero_cpu.md"))
    ap.add_argument("--update", action="store_true",
                    help="merge these cells into --out's JSON instead of replacing the whole table")
    ap.add_argument("--note", action="append", default=[], help="a line of text under the table's title")
    args = ap.parse_args()

    from dopsd.data.synthetic import write_concept_folder
    from dopsd.models.zimage_tiny import make_tiny_zimage

    work = Path(tempfile.mkdtemp(prefix="dopsd-zero-bench-"))
    data = write_concept_folder(work / "data", count=4, size=64, seed=0)
    rows = []
    for size in args.sizes:
        model = make_tiny_zimage(work / f"zimage-{size}", seed=0, **SIZES[size])
        for mode in args.modes:
            for stage in args.stages:
                for ranks in args.ranks:
                    row = run_cell(model, data, work, mode, stage, ranks, args.steps)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    notes, steps = list(args.note), {r["model"]: args.steps for r in rows}
    if args.update and out.with_suffix(".json").exists():
        rows, notes, steps = _merge(json.loads(out.with_suffix(".json").read_text()), rows, args.steps, notes)
    out.with_suffix(".json").write_text(json.dumps({"device": _device(), "notes": notes, "steps": steps,
                                                    "rows": rows}, indent=1))
    write_markdown(out, _device(), notes, steps, rows)
    print(f"wrote {out}")


def write_markdown(out: Path, device: str, notes: list[str], steps: dict, rows: list[dict]) -> None:
    cols = ["model", "mode", "zero", "ranks", "params_total", "trainable", "param_mb_per_rank",
            "peak_rss_mb_per_rank", "step_s", "allgather_mb_per_step_per_rank", "reduce_mb_per_step_per_rank"]
    spans = (f"steps 2..{next(iter(steps.values()))}" if len(set(steps.values())) == 1 else
             ", ".join(f"{m}: steps 2..{n}" for m, n in steps.items()))
    lines = [f"# ZeRO benchmark on {device}", "",
             f"D-OPSD step (K=4 roll-out, batch 1 per rank, 64x64, fp32), mean over {spans}. "
             "MB of collectives are what lands on one rank per training step.", *notes, "",
             "| " + " | ".join(cols) + " | rerun |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r[c]) for c in cols) + (" | yes |" if "previous" in r else " | |"))
    rerun = [r for r in rows if "previous" in r]
    if rerun:
        keys = ["step_s", "allgather_mb_per_step_per_rank", "reduce_mb_per_step_per_rank", "peak_rss_mb_per_rank"]
        lines += ["", "Rerun rows, previous figures -> now:", "",
                  "| model | mode | zero | ranks | " + " | ".join(keys) + " |", "|" + "---|" * (4 + len(keys))]
        for r in rerun:
            lines.append(f"| {r['model']} | {r['mode']} | {r['zero']} | {r['ranks']} | " +
                         " | ".join(f"{_cell(r['previous'][k])} -> {_cell(r[k])}" for k in keys) + " |")
    out.write_text("\n".join(lines) + "\n")


def _cell(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _merge(old: dict, new_rows: list[dict], steps: int, notes: list[str]) -> tuple[list[dict], list[str], dict]:
    """Rows of `old` with the cells measured now put in their place (the replaced figures under `previous`)."""
    key = lambda r: (r["model"], r["mode"], r["zero"], r["ranks"])  # noqa: E731
    fresh = {key(r): r for r in new_rows}
    merged = []
    for r in old["rows"]:
        n = fresh.pop(key(r), None)
        if n is None:
            merged.append(r)
        else:
            merged.append({**n, "previous": {k: v for k, v in r.items() if k != "previous"}})
    span = dict(old.get("steps", {}))
    for r in new_rows:
        span.setdefault(r["model"], steps)
    return merged + list(fresh.values()), list(old.get("notes", [])) + notes, span


if __name__ == "__main__":
    main()
