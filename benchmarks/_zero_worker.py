"""Per-rank worker for bench_zero.py: counts collective traffic per training step, then trains as usual.

Run by the deepspeed launcher in script mode. torch.distributed's collectives are wrapped BEFORE deepspeed
is imported (deepspeed.comm keeps references to them), so every byte ZeRO moves is seen.
"""
import json
import os
import resource
import sys
from collections import defaultdict

import torch.distributed as dist

from _payload import nbytes  # beside this script (run in script mode)

COUNTS = defaultdict(lambda: [0, 0])  # name -> [calls, bytes]
OUTPUT_ARG = "--bench-out"


def _wrap(name: str, payload_arg: int) -> None:
    fn = getattr(dist, name, None)
    if fn is None:
        return

    def counted(*args, **kwargs):
        payload = args[payload_arg] if len(args) > payload_arg else next(iter(kwargs.values()), None)
        COUNTS[name][0] += 1
        COUNTS[name][1] += nbytes(payload)  # output tensor for gathers: what lands on this rank
        return fn(*args, **kwargs)

    setattr(dist, name, counted)


for _name in ("all_gather_into_tensor", "_all_gather_base", "all_gather", "reduce_scatter_tensor",
              "_reduce_scatter_base", "all_reduce", "broadcast", "reduce"):
    _wrap(_name, 0)


def main() -> None:
    out = sys.argv[sys.argv.index(OUTPUT_ARG) + 1]
    argv = [a for i, a in enumerate(sys.argv[1:]) if a != OUTPUT_ARG and sys.argv[i] != OUTPUT_ARG]
    from dopsd.config import load_config
    from dopsd.trainer import Trainer

    cfg_path = argv[argv.index("--config") + 1]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    trainer = Trainer(load_config(cfg_path, overrides))
    per_step = []
    original = trainer.train_step

    def train_step(batch):
        before = {k: v[1] for k, v in COUNTS.items()}
        record = original(batch)
        per_step.append({k: v[1] - before.get(k, 0) for k, v in COUNTS.items()})
        return record

    trainer.train_step = train_step
    summary = trainer.fit()
    rank = int(os.environ.get("RANK", 0))
    local = sum(trainer.engine.local(p).numel() * p.element_size() for p in trainer.module.parameters())
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "per_step_bytes": per_step, "param_bytes_local": local,
                   "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                   "mean_step_time": summary["mean_step_time"]}, f)


if __name__ == "__main__":
    main()
