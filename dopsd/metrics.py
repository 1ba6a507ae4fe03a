"""Step timers and the run log (JSONL + TensorBoard)."""
from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

# The order the trainer reports its per-step time split in.
PHASES = ("data", "encode", "rollout", "teacher", "student", "backward", "optimizer")


class StepTimer:
    """Accumulates wall time per phase within one step. `rollout` is what the objective spent outside the
    model calls it makes (noise, Euler updates, losses)."""

    def __init__(self, sync_cuda: bool = False):
        self.sync = sync_cuda and torch.cuda.is_available()
        self.times: dict[str, float] = defaultdict(float)

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = self._now()
        try:
            yield
        finally:
            self.times[phase] += self._now() - t0

    def reset(self) -> dict[str, float]:
        out = dict(self.times)
        self.times = defaultdict(float)
        return out


class RunLog:
    """One JSON object per line in `log.jsonl`, mirrored to TensorBoard scalars."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = run_dir / "log.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key.replace(".", "/"), value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
