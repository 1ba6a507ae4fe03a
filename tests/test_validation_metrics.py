"""validation.metrics: few-step quality scored during training (dopsd/validation.py)."""
from __future__ import annotations

import json

import pytest
import torch

from dopsd.config import ConfigError
from dopsd.trainer import Trainer
from dopsd.validation import Samples, base_distance, build_metric, evaluate, parse_metric, sharpness


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g)


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.ones(3, 1, 3, 3) / 9
    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"), k, groups=3)


def _samples(images, base) -> Samples:
    return Samples(images=images, base=base, prompts=["a", "b"], seeds=[0, 1], steps=4, step=0)


def test_sharpness_and_distance_see_blur_and_change():
    base = _images()
    same = _samples(base, base)
    assert sharpness(same)["sharpness_ratio"] == pytest.approx(1.0)
    assert base_distance(same)["base_rmse"] == 0.0
    blurred = _samples(_blur(base), base)
    assert sharpness(blurred)["sharpness_ratio"] < 0.3  # blur removes most of the Laplacian energy
    shifted = _samples((base + 0.1).clamp(0, 1), base)
    assert 0.05 < base_distance(shifted)["base_rmse"] < 0.1


def brightness(samples: Samples) -> dict[str, float]:
    """A user's own metric, given as test_validation_metrics:brightness."""
    return {"brightness": float(samples.images.mean())}


def test_metric_specs_parse_build_and_fail_clearly():
    assert parse_metric("sharpness") == ("sharpness", "")
    assert parse_metric("features=/some/dir") == ("features", "/some/dir")
    for bad in ("sharpnes", "features=", "module:", "a b:c"):
        with pytest.raises(ConfigError, match="validation.metrics"):
            parse_metric(bad)
    metric = build_metric("test_validation_metrics:brightness")
    x = _images()
    assert evaluate({"mine": metric}, _samples(x, x)) == {"val.brightness": pytest.approx(float(x.mean()))}
    with pytest.raises(ConfigError, match="does not import"):
        build_metric("no_such_module_here:metric")
    with pytest.raises(ConfigError, match="not a directory"):
        build_metric("features=/no/such/dir")
    with pytest.raises(ValueError, match="reports sharpness"):  # two metrics may not write the same figure
        evaluate({"sharpness": sharpness, "again": sharpness}, _samples(x, x))


def test_feature_distance_with_a_local_vision_model(tmp_path):
    """`features=DIR`: a real transformers vision model (a tiny random DINOv2, saved and loaded locally)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(tmp_path / "dino")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "dino")
    metric = build_metric(f"features={tmp_path / 'dino'}")
    x = _images()
    assert metric(_samples(x, x))["feature_distance"] == pytest.approx(0.0, abs=1e-5)
    assert metric(_samples(_images(seed=1), x))["feature_distance"] > 1e-3


def test_training_logs_the_metrics_at_the_configured_steps(make_config, tmp_path):
    cfg = make_config("train.steps=4", "validation.metrics=[sharpness,base_distance,test_validation_metrics:brightness]",
                      'validation.metric_prompts=["a photo of a ball","a red cube"]', "validation.metric_seeds=[0,1]",
                      "validation.metric_every=2", "validation.prompts=[]")
    Trainer(cfg).fit()
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    val = [r for r in records if r.get("event") == "validation"]
    assert [r["step"] for r in val] == [0, 2, 4]  # the base, every 2 steps, the end
    assert set(val[0]) == {"event", "step", "val.sharpness", "val.sharpness_ratio", "val.base_rmse", "val.brightness"}
    assert val[0]["val.base_rmse"] == 0.0 and val[0]["val.sharpness_ratio"] == pytest.approx(1.0)
    assert val[-1]["val.base_rmse"] > val[0]["val.base_rmse"]  # tuning moved the samples of the old prompts
    assert (run / "validation.png").stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run / "tensorboard"))
    tb.Reload()
    assert [e.step for e in tb.Scalars("val/base_rmse")] == [0, 2, 4]


def test_metrics_config_errors(make_config):
    with pytest.raises(ConfigError, match="unknown metric"):
        make_config("validation.metrics=[blur]")
    with pytest.raises(ConfigError, match="metric_prompts"):
        make_config("validation.metrics=[sharpness]", "validation.prompts=[]")


def test_world_metric_scores_real_world_samples_well_and_noise_badly():
    """The miniature world's evaluator as a pluggable metric: what the prompt states is scored."""
    from dopsd_world.curved import real_samples
    from dopsd_world.generator import parse_caption

    metric = build_metric("dopsd_world.validation:WorldMetric")
    prompts = ["a red circle", "a small blue square on a white background"]
    real = torch.cat([torch.from_numpy(real_samples(parse_caption(p), 4, seed=5)[0]).permute(0, 3, 1, 2).float() / 255
                      for p in prompts])
    seeds = [0, 1, 2, 3]
    good = metric(Samples(images=real, base=real, prompts=prompts, seeds=seeds, steps=4, step=0))
    noise = metric(Samples(images=torch.rand_like(real), base=real, prompts=prompts, seeds=seeds, steps=4, step=0))
    assert good["world_acc_mean"] >= 0.9 > noise["world_acc_mean"]
    assert good["world_fd"] < noise["world_fd"]
