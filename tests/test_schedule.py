import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dopsd.schedule import euler_step, few_step_sigmas, x0_from_velocity


def test_recipe_four_step_schedule():
    assert few_step_sigmas(4, 3.0) == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 9])
@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_sigmas_equal_diffusers_scheduler(steps, shift):
    # ZImagePipeline passes linspace(1, 1/N, N) to FlowMatchEulerDiscreteScheduler, which shifts it.
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)
    sched.set_timesteps(sigmas=torch.linspace(1.0, 1 / steps, steps).tolist())
    assert torch.allclose(torch.tensor(few_step_sigmas(steps, shift), dtype=torch.float32), sched.sigmas,
                          atol=1e-6)


def test_dynamic_shift_matches_scheduler(backend):
    import math

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=True)
    mu = 0.9
    sched.set_timesteps(sigmas=torch.linspace(1.0, 0.25, 4).tolist(), mu=mu)
    assert torch.allclose(torch.tensor(few_step_sigmas(4, math.exp(mu)), dtype=torch.float32), sched.sigmas,
                          atol=1e-6)


def test_backend_schedule_is_the_models(backend):
    shape = backend.latent_shape(1, 32, 32)
    sched = FlowMatchEulerDiscreteScheduler.from_config(backend.scheduler_config)
    sched.set_timesteps(sigmas=torch.linspace(1.0, 0.25, 4).tolist())
    assert torch.allclose(torch.tensor(backend.sigmas(4, shape), dtype=torch.float32), sched.sigmas, atol=1e-6)


def test_euler_step_matches_scheduler_step():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(sigmas=torch.linspace(1.0, 0.25, 4).tolist())
    x, v = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    sigmas = sched.sigmas.tolist()
    ref = sched.step(v, sched.timesteps[0], x, return_dict=False)[0]
    assert torch.allclose(euler_step(x, v, sigmas[0], sigmas[1]), ref, atol=1e-6)
    # x0 = x - sigma v and the noise = x + (1 - sigma) v reconstruct x_sigma = (1 - s) x0 + s n
    s = 0.75
    x0, n = x0_from_velocity(x, v, s), x + (1 - s) * v
    assert torch.allclose((1 - s) * x0 + s * n, x, atol=1e-6)
