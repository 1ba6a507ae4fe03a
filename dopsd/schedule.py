"""Flow-matching sigma schedules and the Euler step (convention: x_s = (1 - s) x0 + s * noise, v = noise - x0)."""
from __future__ import annotations

import torch


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The time-shift warp s' = shift * s / (1 + (shift - 1) * s).

    It equals diffusers' static `shift` and its exponential dynamic shift with mu = log(shift).
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def few_step_sigmas(num_steps: int, shift: float) -> list[float]:
    """K+1 sigmas for a K-step sampler: shift-warped linspace(1, 1/K, K), then 0.

    Z-Image with shift 3 and K = 4 gives [1, .9, .75, .5, 0], the recipe's training schedule.
    """
    base = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    return shift_sigmas(base, shift).tolist() + [0.0]


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    return x + (sigma_next - sigma) * v


def x0_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
    return x - sigma * v
