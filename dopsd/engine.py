"""Engines own the optimizer, backward, the step, and their part of a checkpoint.

`TorchEngine` (one process, plain PyTorch) lives here; `DeepSpeedEngine` (ZeRO-2/3) in engine_deepspeed.py
implements the same surface:
  model           what to call for forwards (the DeepSpeed engine wraps the module: its forward keeps ZeRO's
                  gradient-accumulation bookkeeping right when backward runs several times per step)
  module          the bare nn.Module (adapters, config, state dict)
  zero_grad() / backward(loss) / step() -> (grad_norm, applied)
  save(dir) / load(dir)
  gathered(params)  context in which sharded parameters are whole (for export)
  local(param)      the tensor this rank owns of a parameter (EMA updates act on it)
  wrap_frozen(m)    a frozen module placed like the model (the full fine-tune teacher)
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn


class TorchEngine:
    """Single-process PyTorch: AdamW, global-norm clipping, non-finite steps skipped (never applied)."""

    zero_stage = 0

    def __init__(self, module: nn.Module, lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, grad_clip: float):
        self.module = self.model = module
        self.named_params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if not self.named_params:
            raise ValueError("no trainable parameters")
        self.params = list(self.named_params.values())
        self.grad_clip = grad_clip
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> tuple[float, bool]:
        """Clip and step. Returns (grad norm before clipping, whether the step was applied)."""
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        if not math.isfinite(norm):
            self.zero_grad()
            return norm, False
        self.optimizer.step()
        return norm, True

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # --- checkpoint ---
    def save(self, checkpoint: Path) -> None:
        from safetensors.torch import save_file

        directory = checkpoint / "engine"
        directory.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().contiguous() for n, p in self.named_params.items()},
                  directory / "trainable.safetensors")
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")

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

    # --- placement ---
    def gathered(self, params):
        return nullcontext()

    @staticmethod
    def local(param: torch.Tensor) -> torch.Tensor:
        return param.data

    def wrap_frozen(self, module: nn.Module) -> nn.Module:
        return module


def build_engine(cfg, module: nn.Module):
    t = cfg.train
    if cfg.engine.type == "deepspeed":
        from .engine_deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(module, cfg)
    return TorchEngine(module, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay,
                       grad_clip=t.grad_clip)
