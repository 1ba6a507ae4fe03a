"""The optimizer and its learning-rate schedule, built the same way by both engines.

`train.lr_schedule` (constant | cosine | linear) with `train.warmup_steps` of linear warmup from 0 is diffusers'
`get_scheduler` over `train.steps` optimizer steps (constant = its "constant_with_warmup"), so the learning rate at
every step equals what a diffusers training script computes. As there, the scheduler advances once per optimizer
step (after `grad_accum` micro-batches), also when a non-finite step is skipped: the rate is a function of the step
number. Its state is part of each engine's checkpoint, so a resume continues the schedule where it stopped.
"""
from __future__ import annotations

import torch

_DIFFUSERS_NAMES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


def build_optimizer(params: list[torch.nn.Parameter], t) -> torch.optim.AdamW:
    """AdamW with `train.lr / betas / eps / weight_decay`."""
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, t) -> torch.optim.lr_scheduler.LambdaLR:
    from diffusers.optimization import get_scheduler

    return get_scheduler(_DIFFUSERS_NAMES[t.lr_schedule], optimizer, num_warmup_steps=t.warmup_steps,
                         num_training_steps=t.steps)
