import json
from pathlib import Path

import pytest

from dopsd.config import Config, ConfigError, from_dict, load_config, parse_override

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {"model": {"path": "m"}, "data": {"path": "d"}}


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.model.path and (cfg.data.path or cfg.data.datasets)


def test_overrides_are_typed_and_nested():
    cfg = from_dict(MINIMAL, ["train.lr=3e-4", "data.resolution=[512, 768]", "train.mode=full",
                              "validation.prompts=[a, b]", "train.betas=[0.8,0.99]"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.resolution == [512, 768]
    assert cfg.train.mode == "full" and cfg.validation.prompts == ["a", "b"]
    assert parse_override("output.dir=runs/x") == ("output.dir", "runs/x")


def _error(tmp_path, text: str, overrides=()) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


BASE = "model: {path: m}\ndata: {path: d}\n"


@pytest.mark.parametrize("text, key, fragment", [
    (BASE + "train: {lerning_rate: 1}\n", "train.lerning_rate", "unknown key"),
    (BASE + "trian: {lr: 1}\n", "trian", "unknown key"),
    (BASE + "train: {steps: ten}\n", "train.steps", "expected an integer"),
    (BASE + "train: {steps: 2.5}\n", "train.steps", "expected an integer"),
    (BASE + "train: {lr: fast}\n", "train.lr", "expected a number"),
    (BASE + "train: {steps: 0}\n", "train.steps", "> 0"),
    (BASE + "train: {lr: -1.0e-4}\n", "train.lr", "> 0"),
    (BASE + "train: {ema_decay: 1.5}\n", "train.ema_decay", "[0, 1]"),
    (BASE + "train: {mode: qlora}\n", "train.mode", "not one of"),
    (BASE + "train: {loss_space: eps}\n", "train.loss_space", "not one of"),
    (BASE + "train: {mixed_precision: true}\n", "train.mixed_precision", "expected a string"),
    (BASE + "data: {path: d, resolution: [100, 64]}\n", "data.resolution", "multiples of 16"),
    (BASE + "train: {rollout_steps: 2, sigmas: [1.0, 0.5]}\n", "train.sigmas", "rollout_steps + 1"),
    (BASE + "train: {rollout_steps: 2, sigmas: [1.0, 0.7, 0.8]}\n", "train.sigmas", "descend"),
    (BASE + "train: {shuffle: yes}\n", "train.shuffle", "unknown key"),
    (BASE + "data: {path: d, shuffle: 3}\n", "data.shuffle", "true/false"),
    (BASE + "train: [1, 2]\n", "train", "mapping"),
    ("data: {path: d}\n", "model.path", "required"),
    (BASE + "model: {path: m, dtype: bfloat16}\ntrain: {mode: full}\n", "model.dtype", "float32"),
])
def test_bad_config_gives_one_clear_error(tmp_path, text, key, fragment):
    message = _error(tmp_path, text)
    assert f"{key}:" in message and fragment in message, message
    assert message.count("\n") == 0


def test_bad_yaml_and_bad_override(tmp_path):
    assert "not valid YAML" in _error(tmp_path, "model: {path: [\n")
    assert "train.lr: expected a number" in _error(tmp_path, BASE, ["train.lr=abc"])
    assert "expected KEY=VALUE" in _error(tmp_path, BASE, ["train.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "configs/deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_every_deepspeed_json_builds(path):
    from dopsd.engine_deepspeed import build_ds_config

    cfg = from_dict(MINIMAL, ["engine.type=deepspeed", f"engine.deepspeed_config={path}", "train.batch_size=3",
                              "train.grad_clip=0.5", "train.mixed_precision=bf16"])
    ds = build_ds_config(cfg)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] and ds["managed_gradient_accumulation"] is False
    assert ds["zero_optimization"]["stage"] in (2, 3)
    assert "auto" not in json.dumps(ds)


def test_deepspeed_json_conflict_is_named(tmp_path):
    from dopsd.engine_deepspeed import build_ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}}))
    cfg = from_dict(MINIMAL, ["engine.type=deepspeed", f"engine.deepspeed_config={path}"])
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=4 conflicts"):
        build_ds_config(cfg)
