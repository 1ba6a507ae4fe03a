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
PHASES = ("data", "encode", "rollout", "teacher", "student", "forward", "backward", "optimizer")  # forward: fused pass


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

    def __init__(self, run_dir: Path, tensorboard: bool = True, resumed_at: int | None = None):
        """`resumed_at`: the step a resumed run continues from. The records of later steps that a crashed or
        stopped run logged after that checkpoint are dropped (the resumed run logs those steps again), in
        log.jsonl and in TensorBoard (purge_step), so that plots never count a step twice."""
        self.path = run_dir / "log.jsonl"
        self.dropped = 0
        if resumed_at is not None and self.path.is_file():
            self.dropped = _drop_records_after(self.path, resumed_at)
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                     purge_step=None if resumed_at is None else resumed_at + 1)

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


def _drop_records_after(path: Path, step: int) -> int:
    """Rewrite a JSONL log without the step records past `step` (events are kept); atomic. Returns how many
    were dropped. A torn last line (the process died while writing it) is dropped too."""
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
    return dropped
