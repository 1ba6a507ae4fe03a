"""Backends load a model part on first use: caching features never loads the DiT or the VAE, an offline export
loads the DiT only, and a training run loads what it touches."""
from __future__ import annotations

import pytest
from PIL import Image

import dopsd.models
from dopsd.config import ModelConfig
from dopsd.models import load_backend


@pytest.mark.parametrize("backend_name", ["zimage", "flux2_klein"])
def test_a_fresh_backend_has_loaded_nothing(backend_name, tiny_model_dir, tmp_path):
    path = tiny_model_dir
    if backend_name == "flux2_klein":
        path = tmp_path / "klein"
        dopsd.models.make_tiny_model("flux2_klein", str(path), seed=0)
    be = load_backend(ModelConfig(backend=backend_name, path=str(path)))
    assert be.loaded_parts() == [] and be.loaded_encoders() == []
    shape = be.latent_shape(1, 32, 32)  # from the configs alone
    assert be.loaded_parts() == []
    assert be.vae_scale_factor > 1 and shape[1] == be.transformer.config.in_channels
    assert be.loaded_parts() == ["transformer"]
    be.encode_student(["a photo"])
    assert sorted(be.loaded_parts()) == ["text_encoder", "transformer"] and be.loaded_encoders() == ["text_encoder"]


def test_feature_caching_loads_no_dit(make_config):
    from dopsd.data.shards import FeatureEncoder

    cfg = make_config()
    encoder = FeatureEncoder(cfg, "all", device="cpu")
    encoder(Image.new("RGB", (32, 32), (200, 30, 30)), ["a photo of [V] ball"])
    parts = encoder.backend.loaded_parts()
    assert "text_encoder" in parts and "transformer" not in parts and "vae" not in parts, parts


def test_offline_export_loads_only_the_dit(make_config, tmp_path, monkeypatch):
    from dopsd import checkpoint as ckpt
    from dopsd.export import export_files
    from dopsd.trainer import Trainer

    cfg = make_config("train.steps=1", "validation.prompts=[]", "train.objective=sft")
    Trainer(cfg).fit()
    seen = []

    def recording(*args, **kwargs):
        seen.append(load_backend(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(dopsd.models, "load_backend", recording)
    paths = export_files(ckpt.find_latest(tmp_path / "run/checkpoints"), tmp_path / "out", "both")
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    assert seen and seen[0].loaded_parts() == ["transformer"]
