"""`model.attention` (dopsd/models/attention.py): what `auto` picks on CPU, the one start-up message for a backend
that cannot run, and output parity of the backends on the tiny Z-Image and FLUX.2-klein DiTs, through the model's
own forward and through the fused dual forward (which must dispatch through the same backend)."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_dispatch import attention_backend
from test_flux2_klein import klein_dir  # noqa: F401 (fixture)
from torch.nn.attention import SDPBackend, sdpa_kernel

from dopsd.config import ConfigError, ModelConfig, from_dict
from dopsd.models import load_backend
from dopsd.models.attention import Attention, AttentionUnavailable, apply_to_dit, installed, resolve

PROMPTS = ["a photo of [V] ball", "a [V] ball with red stripes on a green background"]  # unequal lengths: masks


def _inputs(be, size=32):
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, size, size, generator=gen)
    c_s, c_t = be.encode_student(PROMPTS), be.encode_teacher(PROMPTS, images)
    return torch.randn(be.latent_shape(2, size, size), generator=gen), c_t, c_s


def _velocities(be, x, c_t, c_s):
    """(model forward: teacher, student; fused dual forward: teacher, student) at sigma 0.6."""
    model = be.transformer
    with torch.no_grad():
        return (be.velocity(model, x, 0.6, c_t), be.velocity(model, x, 0.6, c_s),
                *be.dual_velocity(model, model, x, 0.6, c_t, c_s))


def test_auto_is_sdpa_on_cpu(tiny_model_dir):
    assert resolve("auto", "cpu") == Attention("sdpa", "native", "sdpa")
    be = load_backend(ModelConfig(path=str(tiny_model_dir), teacher_min_pixels=1024, teacher_max_pixels=4096))
    assert be.attention.choice == "sdpa"
    # the DiT keeps diffusers' default (None: the active backend, native SDPA); the encoders run transformers' sdpa
    assert {m.processor._attention_backend for m in be.transformer.modules() if hasattr(m, "processor")} == {None}
    assert be.text_encoder.config._attn_implementation == "sdpa"
    vl = be.teacher_encoder()[0]
    assert vl.config.text_config._attn_implementation == vl.config.vision_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("name, package", [("flash", "flash-attn"), ("flash_varlen", "flash-attn"),
                                           ("xformers", "xformers")])
def test_unusable_backend_fails_at_start(tmp_path, name, package):
    """On this CPU box the package is missing (or, where installed, the device is not CUDA): one message naming
    the key and what to do. The model directory holds an empty transformer/: the check comes before any read."""
    (tmp_path / "transformer").mkdir()
    expected = f'{package} package, which is not installed here (or too old): pip install "dopsd[gpu]"' if not installed(name) \
        else "runs on CUDA GPUs only"
    for backend in ("zimage", "flux2_klein"):
        with pytest.raises(AttentionUnavailable, match="^model.attention: " + name) as e:
            load_backend(ModelConfig(backend=backend, path=str(tmp_path), attention=name, dtype="bfloat16"))
        assert expected in str(e.value)


def test_flash_needs_half_weights():
    if not (installed("flash") and torch.cuda.is_available()):
        pytest.skip("needs flash-attn and CUDA: the dtype rule is checked after the package and the device")
    with pytest.raises(AttentionUnavailable, match="fp16/bf16"):
        resolve("flash", "cuda", torch.float32)
    assert resolve("auto", "cuda", torch.float32).choice in ("xformers", "sdpa")


def test_config_keys(tiny_model_dir):
    def config(*overrides):
        return from_dict({"model": {"path": str(tiny_model_dir)}, "data": {"path": "x"}}, list(overrides))

    with pytest.raises(ConfigError, match="model.attention: 'fa3' is not one of auto, sdpa, flash"):
        config("model.attention=fa3")
    with pytest.raises(ConfigError, match="model.attention_backend: replaced by model.attention"):
        config("model.attention_backend=native")
    with pytest.raises(ConfigError, match="model.compile: the fused dual forward"):
        config("model.compile=true")
    assert config("model.compile=true", "train.dual_forward=separate").model.compile
    assert config().model.attention == "auto"


def test_flash_on_zimage_takes_the_varlen_entry():
    """Z-Image passes a key padding mask for unequal captions, which diffusers' `flash` refuses."""
    if not (installed("flash") and torch.cuda.is_available()):
        pytest.skip("needs flash-attn and CUDA")
    assert resolve("flash", "cuda", torch.bfloat16, masked=True).dit == "flash_varlen"
    assert resolve("flash", "cuda", torch.bfloat16).dit == "flash"


@pytest.mark.parametrize("family", ["zimage", "flux2_klein"])
def test_sdpa_equals_math_and_both_paths_dispatch_through_the_backend(tiny_model_dir, klein_dir, family):
    torch.manual_seed(0)
    path = tiny_model_dir if family == "zimage" else klein_dir
    be = load_backend(ModelConfig(backend=family, path=str(path), teacher_min_pixels=1024, teacher_max_pixels=4096,
                                  max_text_tokens=16 if family == "flux2_klein" else 512))
    be.transformer.requires_grad_(False)  # one frozen network as both roles (what the fused forward may share)
    x, c_t, c_s = _inputs(be, 32 if family == "zimage" else 16)
    sdpa = _velocities(be, x, c_t, c_s)
    with attention_backend("_native_math"):  # the reference: attention as plain matmuls and a softmax
        math = _velocities(be, x, c_t, c_s)
    for a, b in zip(sdpa, math):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # With the processors set to the math backend, both paths must take it: torch's SDPA restricted to a kernel
    # that has no CPU implementation fails for any call that does not go through the processors' backend.
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        with pytest.raises(RuntimeError, match="No viable backend"):
            be.velocity(be.transformer, x, 0.6, c_s)  # the default backend (native SDPA) under that restriction
        apply_to_dit(be.transformer, Attention("sdpa", "_native_math", "sdpa"))
        routed = _velocities(be, x, c_t, c_s)
    for a, b in zip(routed, math):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["flash", "flash_varlen", "xformers"])
@pytest.mark.parametrize("family", ["zimage", "flux2_klein"])
def test_gpu_backend_parity(tiny_model_dir, klein_dir, name, family):
    """flash-attn / xformers against SDPA in bf16 on CUDA (skipped with the reason elsewhere)."""
    if not torch.cuda.is_available():
        pytest.skip(f"{name}: needs a CUDA GPU")
    if not installed(name):
        pytest.skip(f"{name}: its package is not installed (pip install \"dopsd[gpu]\")")
    path = tiny_model_dir if family == "zimage" else klein_dir
    kw = dict(backend=family, path=str(path), dtype="bfloat16", teacher_min_pixels=1024, teacher_max_pixels=4096,
              max_text_tokens=16 if family == "flux2_klein" else 512)
    ref_be = load_backend(ModelConfig(**kw, attention="sdpa"), device="cuda")
    be = load_backend(ModelConfig(**kw, attention=name), device="cuda")
    assert be.attention.choice == name
    x, c_t, c_s = (t.cuda() if isinstance(t, torch.Tensor) else t for t in _inputs(ref_be, 32 if family == "zimage"
                                                                                    else 16))
    be.transformer.load_state_dict(ref_be.transformer.state_dict())
    for b in (be, ref_be):
        b.transformer.requires_grad_(False)
    for a, b in zip(_velocities(be, x, c_t, c_s), _velocities(ref_be, x, c_t, c_s)):
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="flash may be usable here: the test needs a CPU-only machine")
def test_unusable_backend_is_one_line_from_the_command(make_config, tmp_path, capsys):
    """`dopsd train` with flash asked for on a CPU machine: exit 2 and one message naming the extra."""
    from dopsd.cli import main
    from dopsd.config import dump_config

    path = tmp_path / "cfg.yaml"
    dump_config(make_config("validation.prompts=[]"), path)
    assert main(["train", "--config", str(path), "--set", "model.attention=flash"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dopsd: error: model.attention: flash") and 'pip install "dopsd[gpu]"' in err[-1]
