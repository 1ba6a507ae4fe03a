"""Engines own backward, gradient clipping and the optimizer step. The plain-PyTorch engine lives here;
a DeepSpeed engine implements the same four methods."""
from __future__ import annotations

import math

import torch


class TorchEngine:
    """Single-process PyTorch: AdamW, global-norm clipping, non-finite steps skipped (never applied)."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, grad_clip: float):
        if not params:
            raise ValueError("no trainable parameters")
        self.params = params
        self.grad_clip = grad_clip
        self.optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

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
