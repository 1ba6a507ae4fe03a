"""Engines own the optimizer, backward, the step, and their part of a checkpoint.

`TorchEngine` (plain PyTorch: one process, or data-parallel ranks under torchrun / srun) lives here; `DeepSpeedEngine` (ZeRO-2/3) in engine_deepspeed.py
implements the same surface:
  model           what to call for forwards (the DeepSpeed engine wraps the module: its forward keeps ZeRO's
                  gradient-accumulation bookkeeping right when backward runs several times per step)
  module          the bare nn.Module (adapters, config, state dict)
  zero_grad() / backward(loss) / step() -> (grad_norm, applied); step() and
                  skip_step() (nothing to apply) advance the lr schedule (optim.py)
  save(dir) / load(dir)
  gathered(params)  context in which sharded parameters are whole (for export)
  local(param)      the tensor this rank owns of a parameter (EMA updates act on it)
  wrap_frozen(m)    a frozen module placed like the model (the full fine-tune teacher)
  full_state_dict() whole module weights for an export on rank 0 (None: the module's own state_dict is whole)
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .optim import build_lr_scheduler, build_optimizer


class TorchEngine:
    """Plain PyTorch: AdamW, global-norm clipping, non-finite steps skipped (never applied).

    With several processes it is data-parallel, as DDP is: every rank starts from rank 0's trainable
    weights, and before clipping every gradient is averaged over the ranks (one flat all-reduce per dtype),
    so all ranks apply the same update and stay equal. Why not the DDP wrapper itself: a D-OPSD step runs
    K student forwards, backpropagates each one (or one sum of them, or stops early at a non-finite term),
    and interleaves no-grad teacher forwards through the same module; DDP's reducer expects one synchronised
    backward per forward. Averaging once per step after the last backward computes what DDP would, and the
    step's communication is one all-reduce instead of K (its cost: no overlap of communication with the
    backward). Rank 0 alone writes the (identical) engine state; every rank reads it on resume.
    """

    zero_stage = 0

    def __init__(self, module: nn.Module, train_cfg):
        """`train_cfg`: the run's TrainConfig (optimizer, schedule, clipping)."""
        self.module = self.model = module
        self.named_params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if not self.named_params:
            raise ValueError("no trainable parameters")
        self.params = list(self.named_params.values())
        self.grad_clip = train_cfg.grad_clip
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if self.world_size > 1:
            self._broadcast_from_main(self.params)
        self.optimizer = build_optimizer(self.params, train_cfg)
        self.scheduler = build_lr_scheduler(self.optimizer, train_cfg)

    @staticmethod
    def _comm_device(t: torch.Tensor) -> torch.device:
        return t.device if dist.get_backend() != "gloo" else torch.device("cpu")

    def _broadcast_from_main(self, tensors: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for group in _by_dtype(tensors):
                flat = torch.cat([t.detach().reshape(-1) for t in group])
                device = self._comm_device(flat)
                buf = flat.to(device)
                dist.broadcast(buf, src=0)
                offset = 0
                for t in group:
                    t.copy_(buf[offset:offset + t.numel()].view_as(t).to(t.device))
                    offset += t.numel()

    def _average_gradients(self) -> None:
        """Sum of every rank's gradient / world size, written back into `.grad` (a missing grad counts as 0:
        every rank made the same calls, so they agree on which parameters have one)."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for group in _by_dtype([p.grad for p in self.params]):
            flat = torch.cat([g.reshape(-1) for g in group])
            buf = flat.to(self._comm_device(flat))
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf /= self.world_size
            offset = 0
            for g in group:
                g.copy_(buf[offset:offset + g.numel()].view_as(g).to(g.device))
                offset += g.numel()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> tuple[float, bool]:
        """Average over ranks, clip and step. Returns (grad norm before clipping, whether the step was applied);
        the norm is of the averaged gradient, so every rank takes the same decision."""
        if self.world_size > 1:
            self._average_gradients()
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        applied = math.isfinite(norm)
        if applied:
            self.optimizer.step()
        else:
            self.zero_grad()
        self.scheduler.step()  # a skipped step still counts: the rate is a function of the step number
        return norm, applied

    def skip_step(self) -> None:
        """A step with nothing to apply still advances the schedule."""
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # --- checkpoint ---
    def save(self, checkpoint: Path) -> None:
        from safetensors.torch import save_file

        if self.rank != 0:  # data-parallel ranks hold the same state; one copy is written
            return
        directory = checkpoint / "engine"
        directory.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().contiguous() for n, p in self.named_params.items()},
                  directory / "trainable.safetensors")
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")

    def load(self, checkpoint: Path) -> None:
        from safetensors.torch import load_file

        directory = checkpoint / "engine"
        state = load_file(directory / "trainable.safetensors")
        missing = self.named_params.keys() - state.keys()
        if missing:
            raise ValueError(f"checkpoint {directory} lacks trainable parameters, e.g. {sorted(missing)[:3]}")
        with torch.no_grad():
            for n, p in self.named_params.items():
                p.copy_(state[n])
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        if (directory / "scheduler.pt").is_file():  # checkpoints from before schedules: a constant rate
            self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))

    # --- placement ---
    def gathered(self, params):
        return nullcontext()

    @staticmethod
    def local(param: torch.Tensor) -> torch.Tensor:
        return param.data

    def wrap_frozen(self, module: nn.Module) -> nn.Module:
        return module

    def full_state_dict(self) -> None:
        return None  # every rank holds the whole module


def _by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return list(groups.values())


def build_engine(cfg, module: nn.Module, ds_config: dict | None = None):
    """`ds_config`: the DeepSpeed JSON already built from the run config (engine.type deepspeed)."""
    if cfg.engine.type == "deepspeed":
        from .engine_deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(module, cfg, ds_config)
    return TorchEngine(module, cfg.train)
