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


# ----------------------------------------------------------------------------------------------------------
# train.schedule: "recipe" (the authors' training schedules) vs "pipeline" (the inference pipeline's), each
# compared with its source.

ZIMAGE_AUTHORS_8 = [1.0, 0.9769, 0.9478, 0.9099, 0.8586, 0.7853, 0.6719, 0.4732, 0.0]
# The FLUX.2-klein hub repositories' scheduler/scheduler_config.json (4B and 9B), written out.
KLEIN_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                       max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
                       invert_sigmas=False, shift_terminal=None, use_karras_sigmas=False,
                       use_exponential_sigmas=False, use_beta_sigmas=False, stochastic_sampling=False)


def _zimage_pipeline_sigmas(scheduler_config: dict, latent_shape: tuple[int, ...], steps: int) -> list[float]:
    """Step 5 of `ZImagePipeline.__call__` (diffusers 0.42), with its own helpers."""
    from diffusers.pipelines.z_image.pipeline_z_image import (calculate_shift, get_default_z_image_sigmas,
                                                              retrieve_timesteps)

    sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    image_seq_len = (latent_shape[2] // 2) * (latent_shape[3] // 2)
    mu = calculate_shift(image_seq_len, sched.config.get("base_image_seq_len", 256),
                         sched.config.get("max_image_seq_len", 4096), sched.config.get("base_shift", 0.5),
                         sched.config.get("max_shift", 1.15))
    retrieve_timesteps(sched, steps, "cpu", sigmas=get_default_z_image_sigmas(steps), mu=mu)
    return sched.sigmas.tolist()


def test_zimage_recipe_is_the_authors_lists(backend):
    for shape in (backend.latent_shape(1, 32, 32), (1, 16, 128, 128)):  # tiny; 1024 px on Z-Image-Turbo
        assert backend.sigmas(4, shape, schedule="recipe") == [1.0, 0.9, 0.75, 0.5, 0.0]
        assert backend.sigmas(8, shape, schedule="recipe") == ZIMAGE_AUTHORS_8
        # no authors' list for other K: the pipeline's schedule
        for steps in (1, 2, 3, 6, 9):
            assert backend.sigmas(steps, shape, schedule="recipe") == backend.sigmas(steps, shape, "pipeline")
    # ... which for K = 8 is not the pipeline's shift-3 schedule
    pipe8 = backend.sigmas(8, backend.latent_shape(1, 32, 32), schedule="pipeline")
    assert pipe8[:3] == pytest.approx([1.0, 0.954545, 0.9], abs=1e-6)


def test_zimage_pipeline_is_zimage_pipelines_scheduler(backend):
    import copy

    assert backend.scheduler_config["shift"] == 3.0 and not backend.scheduler_config["use_dynamic_shifting"]
    dynamic = copy.copy(backend)  # the same code on a config with resolution-dependent shifting
    dynamic.scheduler_config = dict(backend.scheduler_config, use_dynamic_shifting=True)
    for be in (backend, dynamic):
        for shape in (be.latent_shape(1, 32, 32), be.latent_shape(1, 64, 96), (1, 16, 128, 128)):
            for steps in (1, 4, 8, 9):
                ours = be.sigmas(steps, shape)  # the default is the pipeline's schedule
                assert ours == be.sigmas(steps, shape, schedule="pipeline")
                assert len(ours) == steps + 1 and ours[-1] == 0.0
                assert torch.allclose(torch.tensor(ours, dtype=torch.float32),
                                      torch.tensor(_zimage_pipeline_sigmas(be.scheduler_config, shape, steps)),
                                      atol=1e-6)
    assert backend.sigmas(4, (1, 16, 128, 128)) == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    from dopsd.config import ModelConfig
    from dopsd.models import load_backend, make_tiny_model

    out = tmp_path_factory.mktemp("models") / "tiny-klein"
    make_tiny_model("flux2_klein", str(out), seed=0)
    return out, load_backend(ModelConfig(backend="flux2_klein", path=str(out)), device="cpu")


def _klein_source_sigmas(sched, schedule: str, tokens: int, steps: int) -> list[float]:
    import numpy as np
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

    mu = compute_empirical_mu(image_seq_len=tokens, num_steps=steps)
    if schedule == "recipe":  # the authors' script
        sched.set_timesteps(steps, mu=mu)
    else:  # step 6 of Flux2KleinPipeline.__call__ (diffusers 0.42)
        retrieve_timesteps(sched, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return sched.sigmas.tolist()


@pytest.mark.parametrize("schedule", ["recipe", "pipeline"])
def test_klein_schedules_reproduce_their_sources(klein, schedule):
    import copy

    klein_dir, be = klein
    real = copy.copy(be)
    real.scheduler_config = dict(KLEIN_SCHEDULER)
    for b, make in ((be, lambda: FlowMatchEulerDiscreteScheduler.from_pretrained(klein_dir, subfolder="scheduler")),
                    (real, lambda: FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER))):
        # latent token grids of 1024x1024, 512x512, 1344x768 and 1536x1536 px on the real klein (/16), and 32 px
        for h, w in ((64, 64), (32, 32), (84, 48), (96, 96), (2, 2)):
            for steps in (4, 8):
                ours = b.sigmas(steps, (1, 128, h, w), schedule=schedule)
                assert ours == _klein_source_sigmas(make(), schedule, h * w, steps)
                assert len(ours) == steps + 1 and ours[-1] == 0.0
                assert all(a > c for a, c in zip(ours, ours[1:]))
        expected = {"recipe": [1.0, 0.952, 0.832, 0.0098, 0.0], "pipeline": [1.0, 0.967, 0.908, 0.767, 0.0]}
        assert b.sigmas(4, (1, 128, 64, 64), schedule=schedule) == pytest.approx(expected[schedule], abs=5e-4)
    # the default (sampling) is the pipeline's
    assert be.sigmas(4, (1, 128, 64, 64)) == be.sigmas(4, (1, 128, 64, 64), schedule="pipeline")


def test_unknown_schedule_is_refused(backend, klein):
    for be in (backend, klein[1]):
        with pytest.raises(ValueError, match="not one of"):
            be.sigmas(4, (1, 16, 64, 64), schedule="authors")


def test_train_schedule_config():
    from pathlib import Path

    from dopsd.config import ConfigError, from_dict, load_config

    minimal = {"model": {"path": "m"}, "data": {"path": "d"}}
    assert from_dict(minimal).train.schedule == "recipe"
    assert from_dict(minimal, ["train.schedule=pipeline"]).train.schedule == "pipeline"
    with pytest.raises(ConfigError, match="train.schedule"):
        from_dict(minimal, ["train.schedule=bf16"])
    configs = Path(__file__).resolve().parents[1] / "configs"
    for name in ("zimage_turbo_lora", "zimage_turbo_sft_lora", "flux2_klein_4b_lora", "flux2_klein_9b_lora"):
        assert load_config(configs / f"{name}.yaml").train.schedule == "recipe"
