"""Step timers and the run log (JSONL + TensorBoard + optional Weights & Biases)."""
from __future__ import annotations

import importlib.util
import json
import secrets
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .config import ConfigError

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


def check_trackers(output) -> None:
    """At start-up, before any weight loads: a tracker that was asked for must be importable."""
    if output.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("output.wandb: Weights & Biases is not installed (pip install wandb), or set "
                          "output.wandb=false; TensorBoard (output.tensorboard) needs nothing more")


class RunLog:
    """One JSON object per line in `log.jsonl`, mirrored to TensorBoard and, when asked (`output.wandb`), to a
    Weights & Biases run; sample grids go to both as images."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, resumed_at: int | None = None, output=None,
                 config: dict | None = None):
        """`resumed_at`: the step a resumed run continues from. The records of later steps that a crashed or
        stopped run logged after that checkpoint are dropped (the resumed run logs those steps again), in
        log.jsonl and in TensorBoard (purge_step), so that plots never count a step twice. `output`: the run's
        OutputConfig (trackers); `config`: the run config, stored with the W&B run."""
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
        self._wandb = _wandb_run(run_dir, output, config, resumed_at) if output is not None and output.wandb else None

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if "step" not in record:
            return
        scalars = {key.replace(".", "/"): value for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def image(self, name: str, path: Path, step: int) -> None:
        """A saved PNG (a sample grid) as an image at `step`."""
        if self._tb is None and self._wandb is None:
            return
        from PIL import Image

        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
        if self._tb is not None:
            self._tb.add_image(name, pixels, step, dataformats="HWC")
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Image(pixels, caption=path.name)}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_run(run_dir: Path, output, config: dict | None, resumed_at: int | None):
    """A W&B run for this run directory. Its id is kept in the directory, so a resumed run (`--resume`, also
    after a preemption) continues the same W&B run, at the trainer's step numbers. Steps that a stopped run
    logged after its last checkpoint stay in W&B as logged (W&B ignores a step below its last one); the resume
    is exact, so the resumed run computes the same values for them."""
    import wandb

    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if resumed_at is not None and id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id)
    return wandb.init(project=output.wandb_project, name=output.wandb_run_name or run_dir.name, id=run_id,
                      resume="allow", dir=str(run_dir), config=config)


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
