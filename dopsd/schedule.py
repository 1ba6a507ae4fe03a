"""Flow-matching sigma schedules and the Euler step (convention: x_s = (1 - s) x0 + s * noise, v = noise - x0)."""
from __future__ import annotations

import torch

# Which roll-out schedule a backend's `sigmas(..., schedule=)` returns (config: `train.schedule`).
# "recipe": the authors' training schedules (their released scripts); "pipeline": the inference pipeline's.
SCHEDULES = ("recipe", "pipeline")

# The authors' hard-coded Z-Image-Turbo training schedules, K -> K + 1 sigmas (their released script,
# github.com/vvvvvjdy/D-OPSD). The 8-step list is close to a shift-6 warp, not the pipeline's shift 3
# ([1, .9545, .9, ...]). For other K there is no authors' list; the zimage backend falls back to the pipeline's schedule (shift 3 on Z-Image-Turbo).
# The released script builds these as bf16 timesteps (t = 1 - sigma: 0.1 becomes 0.10009765625); dopsd keeps
# them exact (float64 here, float32 in the model call) and does not replicate that rounding.
ZIMAGE_RECIPE_SIGMAS = {
    4: (1.0, 0.9, 0.75, 0.5, 0.0),
    8: (1.0, 0.9769, 0.9478, 0.9099, 0.8586, 0.7853, 0.6719, 0.4732, 0.0),
}


def check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")


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
