"""ZeRO-3 parameter all-gathers per phase of a D-OPSD training step: teacher forward, student forward (or
their fused forward), backward, optimizer.

    python benchmarks/zero_gathers.py [--size tiny|mid] [--mode lora|full] [--steps 3] [--ranks 2]
        [--resolution 32] [--prefetch-bucket N] [--mixed-precision no|bf16] [--dual-forward fused|separate]
        [--out FILE.json]

A real `deepspeed --num_accelerators N` launch (CPU/gloo, or GPU/nccl when there is one) of the trainer, with
this file as the worker script. In each rank, torch.distributed's all-gathers are wrapped before DeepSpeed
is imported (deepspeed.comm keeps references to them) and the trainer's phase timer is wrapped, so every
gathered element is attributed to the phase that gathered it. ZeRO-3's parameter coordinator is watched too:
how many elements it gathered for the module being entered (demand) or ahead of it along its recorded trace
(prefetch), how many it dropped unused when it discarded its in-flight gathers (trace invalidated, or a new
forward began), and how often it invalidated its trace.

`--prefetch-bucket N` forces zero_optimization.stage3_prefetch_bucket_size to N in the engine config the
trainer builds (the measurement of the behaviour before engine_deepspeed.py set it to 0 for the separate
D-OPSD LoRA path: `--prefetch-bucket 50000000`, the value in configs/deepspeed/zero3.json).

Units: elements (the all-gather's output, i.e. what lands on one rank), and "models" = elements / the number
of parameters one forward uses (the frozen base plus one LoRA adapter; the whole DiT in full fine-tuning).
Prints a table and writes --out (JSON) when given; tests/test_zero_gathers.py runs it and asserts on it.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also when a test imports this file by path
from _payload import nbytes  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZES = {"tiny": {}, "mid": {"dit_dim": 768, "dit_layers": 8}}  # as benchmarks/bench_zero.py
PHASES = ("teacher", "student", "forward", "backward", "optimizer")  # "forward": the fused pass of both roles
WORKER_FLAG = "--worker"

# --- counters (worker side) ------------------------------------------------------------------------------
TOTAL = defaultdict(int)  # counter name -> running total on this rank
INVALIDATED: list[str] = []  # why the coordinator dropped its trace (the first few times), as module names
NAMES: dict[int, str] = {}  # id(module) -> qualified name, once the trainer has built the model


def _numel(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, (list, tuple)):
        return sum(_numel(v) for v in x)
    return 0


def _wrap_gathers() -> None:
    """Count every all-gather's output (elements and bytes landing on this rank)."""
    for name in ("all_gather_into_tensor", "_all_gather_base", "all_gather"):
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def counted(*args, _fn=fn, **kwargs):
            out = args[0] if args else next(iter(kwargs.values()), None)
            TOTAL["gather_calls"] += 1
            TOTAL["gathered"] += _numel(out)
            TOTAL["gathered_bytes"] += nbytes(out)
            return _fn(*args, **kwargs)

        setattr(dist, name, counted)


def _watch_coordinator() -> None:
    """Demand vs prefetch gathers, gathers dropped unused, and trace invalidations of ZeRO-3's coordinator."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as PPC

    cls = "_PartitionedParameterCoordinator"
    fetch_impl = PPC._fetch_sub_module_impl
    gather = getattr(PPC, f"{cls}__all_gather_params")
    invalidate = PPC._invalidate_trace
    clean = PPC._clean_inflight_param_registry

    def _fetch_sub_module_impl(self, submodule, forward, is_leaf):
        from deepspeed.runtime.zero.partitioned_param_coordinator import iter_params

        self._bench_demand = {id(p) for p in iter_params(submodule, recurse=is_leaf)}
        try:
            return fetch_impl(self, submodule, forward, is_leaf)
        finally:
            self._bench_demand = set()

    def _all_gather_params(self, params, forward):
        demand = getattr(self, "_bench_demand", set())
        for p in params:
            if p.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                TOTAL["demand" if id(p) in demand else "prefetch"] += p.ds_numel
        return gather(self, params, forward)

    def _invalidate_trace(self):
        TOTAL["invalidations"] += 1
        if len(INVALIDATED) < 8:  # called from trace_prologue(sub_module): which module broke the trace
            caller = sys._getframe(1).f_locals
            order, step = getattr(self, f"{cls}__submodule_order"), getattr(self, f"{cls}__step_id")
            got = caller.get("sub_module")
            expected = order[step] if step < len(order) else None
            INVALIDATED.append(f"trace step {step}: expected {NAMES.get(id(expected), expected and type(expected).__name__)}"
                               f", got {NAMES.get(id(got), got and type(got).__name__)}")
        return invalidate(self)

    def _clean_inflight_param_registry(self):
        registry = getattr(self, f"{cls}__inflight_param_registry")
        TOTAL["dropped_unused"] += sum(p.ds_numel for p in registry)
        return clean(self)

    PPC._fetch_sub_module_impl = _fetch_sub_module_impl
    setattr(PPC, f"{cls}__all_gather_params", _all_gather_params)
    PPC._invalidate_trace = _invalidate_trace
    PPC._clean_inflight_param_registry = _clean_inflight_param_registry


class PhaseCounter:
    """Stands in for the trainer's StepTimer: times as before, and records the counters' change over each
    model-call phase (teacher / student / backward / optimizer) of the current step."""

    def __init__(self, timer):
        self.timer = timer
        self.events: list[dict] = []

    @contextmanager
    def __call__(self, phase: str):
        before = dict(TOTAL)
        with self.timer(phase):
            yield
        if phase in PHASES:
            self.events.append({"phase": phase, **{k: v - before.get(k, 0) for k, v in TOTAL.items()}})

    def reset(self):
        return self.timer.reset()


def worker(argv: list[str]) -> None:
    _wrap_gathers()  # before deepspeed is imported
    _watch_coordinator()
    out = argv[argv.index("--out") + 1]
    prefetch = argv[argv.index("--prefetch-bucket") + 1] if "--prefetch-bucket" in argv else None
    import dopsd.engine_deepspeed as eds
    from dopsd.config import load_config
    from dopsd.trainer import Trainer

    if prefetch is not None:
        build = eds.build_ds_config

        def build_ds_config(cfg, *args, **kwargs):
            ds = build(cfg, *args, **kwargs)
            ds["zero_optimization"]["stage3_prefetch_bucket_size"] = int(prefetch)
            return ds

        eds.build_ds_config = build_ds_config
    trainer = Trainer(load_config(argv[argv.index("--config") + 1]))
    NAMES.update({id(m): n or "<root>" for n, m in trainer.module.named_modules()})
    counter = PhaseCounter(trainer.timer)
    trainer.timer = counter
    trainer.step_context.timer = counter  # the objective's phases go through the StepContext's timer
    steps: list[dict] = []
    original = trainer.train_step

    def train_step(batch):
        counter.events = []
        before = dict(TOTAL)
        record = original(batch)
        steps.append({"events": counter.events, "step": {k: v - before.get(k, 0) for k, v in TOTAL.items()}})
        return record

    trainer.train_step = train_step
    trainer.fit()
    module = trainer.module
    total = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    teacher_adapter = sum(getattr(p, "ds_numel", p.numel()) for n, p in module.named_parameters()
                          if ".teacher." in n)
    rank = int(os.environ.get("RANK", 0))
    zero = trainer.engine.ds_config.get("zero_optimization", {})
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "params_total": total, "forward_params": total - teacher_adapter,
                   "prefetch_bucket": zero.get("stage3_prefetch_bucket_size"), "invalidated": INVALIDATED,
                   "steps": steps}, f)


# --- launcher side ---------------------------------------------------------------------------------------
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(per_rank: list[dict], skip_first: bool = True) -> dict:
    """Per phase: elements gathered per call of that phase (mean over ranks and steady steps), in elements
    and in models; per step: the totals."""
    fwd = per_rank[0]["forward_params"]
    rows: dict[str, dict] = {}
    steps = [s for r in per_rank for s in (r["steps"][1:] if skip_first and len(r["steps"]) > 1 else r["steps"])]
    keys = ("gathered", "gathered_bytes", "gather_calls", "demand", "prefetch", "dropped_unused", "invalidations")
    for phase in PHASES:
        events = [e for s in steps for e in s["events"] if e["phase"] == phase]
        if not events:
            continue
        mean = {k: sum(e.get(k, 0) for e in events) / len(events) for k in keys}
        rows[phase] = {**mean, "calls_per_step": len(events) / len(steps), "models": mean["gathered"] / fwd}
    step = {k: sum(s["step"].get(k, 0) for s in steps) / len(steps) for k in keys}
    step["models"] = step["gathered"] / fwd
    return {"params_total": per_rank[0]["params_total"], "forward_params": fwd,
            "prefetch_bucket": per_rank[0]["prefetch_bucket"], "invalidated": per_rank[0]["invalidated"],
            "phases": rows, "step": step,
            "steady_steps": len(steps) // len(per_rank)}


def run(model_dir: Path, data_dir: Path, work: Path, *, mode: str = "lora", steps: int = 3, ranks: int = 2,
        resolution: int = 32, rollout_steps: int = 4, lora_rank: int = 16, prefetch_bucket: int | None = None,
        mixed_precision: str = "no", stage_json: str = "zero3.json", timeout: int = 900,
        dual_forward: str = "fused") -> dict:
    """One launch; returns the summary (plus the raw per-rank records under "ranks")."""
    tag = f"{model_dir.name}-{mode}-{dual_forward}-r{ranks}-pf{prefetch_bucket}-{mixed_precision}-{time.time_ns()}"
    out_dir = work / tag
    cfg = {
        "model": {"path": str(model_dir), "teacher_min_pixels": 1024, "teacher_max_pixels": 4096},
        "lora": {"rank": lora_rank, "alpha": lora_rank},
        "train": {"mode": mode, "steps": steps, "batch_size": 1, "lr": 1e-4, "rollout_steps": rollout_steps,
                  "mixed_precision": mixed_precision, "dual_forward": dual_forward},
        "data": {"path": str(data_dir), "resolution": [resolution, resolution]},
        "output": {"dir": str(out_dir), "progress_bar": False, "tensorboard": False},
        "checkpoint": {"every": 0},
        "engine": {"type": "deepspeed", "deepspeed_config": str(REPO / "configs/deepspeed" / stage_json)},
    }
    import yaml

    cfg_path = work / f"{tag}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cuda = torch.cuda.is_available()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    if not cuda:
        env["DS_ACCELERATOR"] = "cpu"
    stats = work / f"{tag}.gathers"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus" if cuda else "--num_accelerators",
           str(ranks), "--master_port", str(_port()), str(Path(__file__).resolve()), WORKER_FLAG,
           "--config", str(cfg_path), "--out", str(stats)]
    if prefetch_bucket is not None:
        cmd += ["--prefetch-bucket", str(prefetch_bucket)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{tag} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    per_rank = [json.loads((work / f"{tag}.gathers.rank{i}.json").read_text()) for i in range(ranks)]
    return {**summarize(per_rank), "mode": mode, "ranks": ranks, "mixed_precision": mixed_precision,
            "dual_forward": dual_forward,
            "ranks_raw": per_rank}


def table(summary: dict) -> str:
    fwd = summary["forward_params"]
    lines = [f"params total {summary['params_total']}, per forward {fwd}, "
             f"stage3_prefetch_bucket_size {summary['prefetch_bucket']}",
             "| phase | calls/step | gathered (models) | demand | prefetch | dropped unused | invalidations | MB | bytes/elem |",
             "|---|---|---|---|---|---|---|---|---|"]
    for phase, r in summary["phases"].items():
        lines.append(f"| {phase} | {r['calls_per_step']:.0f} | {r['models']:.3f} | {r['demand'] / fwd:.3f} | "
                     f"{r['prefetch'] / fwd:.3f} | {r['dropped_unused'] / fwd:.3f} | {r['invalidations']:.2f} | "
                     f"{r['gathered_bytes'] / 2 ** 20:.3g} | {r['gathered_bytes'] / max(r['gathered'], 1):.2g} |")
    s = summary["step"]
    lines.append(f"| **step** | | {s['models']:.3f} | {s['demand'] / fwd:.3f} | {s['prefetch'] / fwd:.3f} | "
                 f"{s['dropped_unused'] / fwd:.3f} | {s['invalidations']:.2f} | {s['gathered_bytes'] / 2 ** 20:.4g} | "
                 f"{s['gathered_bytes'] / max(s['gathered'], 1):.2g} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="tiny", choices=sorted(SIZES))
    ap.add_argument("--mode", default="lora", choices=["lora", "full"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--prefetch-bucket", type=int, default=None)
    ap.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    ap.add_argument("--dual-forward", default="fused", choices=["fused", "separate"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from dopsd.data.synthetic import write_concept_folder
    from dopsd.models.zimage_tiny import make_tiny_zimage

    work = Path(tempfile.mkdtemp(prefix="dopsd-zero-gathers-"))
    data = write_concept_folder(work / "data", count=4, size=args.resolution, seed=0)
    model = make_tiny_zimage(work / f"zimage-{args.size}", seed=0, **SIZES[args.size])
    summary = run(model, data, work, mode=args.mode, steps=args.steps, ranks=args.ranks, resolution=args.resolution,
                  prefetch_bucket=args.prefetch_bucket, mixed_precision=args.mixed_precision,
                  dual_forward=args.dual_forward)
    print(table(summary))
    print("\n".join(["trace invalidations (first ones, rank 0):", *summary["invalidated"]]))
    if args.out:
        summary.pop("ranks_raw")
        Path(args.out).write_text(json.dumps({**summary, "size": args.size}, indent=1))


if __name__ == "__main__":
    if WORKER_FLAG in sys.argv:
        worker(sys.argv[1:])
    else:
        main()
