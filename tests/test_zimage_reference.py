"""`model.teacher_context: reference`: the Z-Image teacher sees the target as a clean image in the DiT's omni
sequence (diffusers' Z-Image-Omni/Edit path) instead of through the Qwen3-VL front-end."""
import pytest
import torch

from dopsd.config import ConfigError, ModelConfig, from_dict
from dopsd.data.shard_format import encoder_fingerprint
from dopsd.models import load_backend
from dopsd.models.zimage import ReferenceContext


@pytest.fixture(scope="module")
def ref_backend(tiny_model_dir):
    torch.manual_seed(0)
    cfg = ModelConfig(path=str(tiny_model_dir), teacher_context="reference")
    backend = load_backend(cfg, device="cpu")
    backend.transformer.eval()
    return backend


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_reference_context_is_text_features_and_clean_latents(ref_backend):
    prompts = ["a photo of a ball", "a red square on the left"]
    images = _images(2, 0)
    ctx = ref_backend.encode_teacher(prompts, images)
    assert isinstance(ctx, ReferenceContext)
    for a, b in zip(ctx.text, ref_backend.encode_student(prompts)):
        assert torch.equal(a, b)
    # the posterior mean: deterministic, unlike the training targets' posterior samples
    again = ref_backend.encode_teacher(prompts, images)
    assert torch.equal(ctx.latents, again.latents)
    assert ctx.latents.shape == ref_backend.latent_shape(2, 32, 32)


def test_reference_velocity_reads_the_reference_per_sample(ref_backend):
    prompts = ["a photo of a ball", "a red square on the left, longer prompt"]
    images = _images(2, 1)
    x = torch.randn(ref_backend.latent_shape(2, 32, 32), generator=torch.Generator().manual_seed(2))
    sig = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        ctx = ref_backend.encode_teacher(prompts, images)
        v = ref_backend.velocity(ref_backend.transformer, x, sig, ctx)
        assert v.shape == x.shape and torch.isfinite(v).all()
        # batched = one by one (padding of the unequal prompts does not leak between samples)
        for i in range(2):
            one = ReferenceContext([ctx.text[i]], ctx.latents[i:i + 1])
            vi = ref_backend.velocity(ref_backend.transformer, x[i:i + 1], sig[i:i + 1], one)
            assert torch.allclose(v[i], vi[0], atol=1e-5)
        # another reference image changes the prediction; the text-only (student) call differs too
        other = ReferenceContext(ctx.text, ref_backend.encode_teacher(prompts, _images(2, 3)).latents)
        assert not torch.allclose(v, ref_backend.velocity(ref_backend.transformer, x, sig, other), atol=1e-4)
        student = ref_backend.velocity(ref_backend.transformer, x, sig, ref_backend.encode_student(prompts))
        assert not torch.allclose(v, student, atol=1e-4)


def test_reference_teacher_trains_dopsd(make_config, tmp_path):
    import json

    from dopsd.trainer import Trainer

    losses = {}
    for route in ("vlm", "reference"):
        cfg = make_config(f"model.teacher_context={route}", out_dir=tmp_path / route)
        assert Trainer(cfg).fit()["steps"] == 3
        records = [json.loads(line) for line in open(tmp_path / route / "log.jsonl")]
        losses[route] = [r["loss"] for r in records if "loss" in r]
    # same seeds and student roll-outs: only the teacher's view of the target differs
    assert all(a > 0 for a in losses["reference"]) and losses["reference"] != losses["vlm"]


def test_teacher_context_config_and_feature_fingerprint(tmp_path):
    def config(*overrides):
        return from_dict({"model": {"path": str(tmp_path)}, "data": {"path": "d"}}, list(overrides))

    assert config("model.teacher_context=reference").model.teacher_context == "reference"
    with pytest.raises(ConfigError, match="model.teacher_context"):
        config("model.teacher_context=pixels")
    with pytest.raises(ConfigError, match="model.teacher_context"):
        config("model.backend=flux2_klein", "model.teacher_context=vlm")
    # cached teacher features made through the VLM must not feed a reference-teacher run; the fingerprints
    # of shards made before the option existed stay valid
    vlm, ref, default = config("model.teacher_context=vlm"), config("model.teacher_context=reference"), config()
    assert encoder_fingerprint(vlm.model, vlm.data) != encoder_fingerprint(ref.model, ref.data)
    assert encoder_fingerprint(vlm.model, vlm.data) == encoder_fingerprint(default.model, default.data)
