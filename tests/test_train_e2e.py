"""3-step end-to-end runs on the tiny checkpoint: every output is written and the LoRA works in diffusers."""
import json

import pytest
import torch
from PIL import Image

from dopsd.trainer import Trainer


def _run(cfg):
    summary = Trainer(cfg).fit()
    run = cfg.output.dir
    return summary, [json.loads(line) for line in open(f"{run}/log.jsonl")]


def _check_common_outputs(cfg, summary, records):
    from pathlib import Path

    run = Path(cfg.output.dir)
    assert (run / "config.yaml").is_file() and (run / "train.log").is_file()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    steps = [r for r in records if "step" in r and "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["loss"] > 0 and r["grad_norm"] > 0 and r["lr"] == cfg.train.lr
        for phase in ("data", "encode", "rollout", "teacher", "student", "forward", "backward", "optimizer"):
            assert f"time.{phase}" in r
    grid = Image.open(summary["samples"])
    # 1 prompt row; base block and tuned block, 2 seeds each, 32 px images
    assert grid.height >= 32 and grid.width >= 4 * 32
    assert summary["steps"] == 3 and records[-1]["event"] == "end"


def test_dopsd_lora_run_writes_everything_and_lora_loads_in_diffusers(make_config, tiny_model_dir, tmp_path):
    cfg = make_config("output.save_every=2", "validation.every=2")
    summary, records = _run(cfg)
    _check_common_outputs(cfg, summary, records)
    steps = [r for r in records if "loss" in r]
    assert all(len([k for k in r if k.startswith("loss_k")]) == 4 for r in steps)
    run = tmp_path / "run"
    assert (run / "exports/step_000002/pytorch_lora_weights.safetensors").is_file()
    assert (run / "samples/step_000002.png").is_file()
    lora = run / "exports/final/pytorch_lora_weights.safetensors"
    from safetensors import safe_open

    with safe_open(lora, "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("transformer.") and "teacher" not in k and "student" not in k for k in keys)
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 8

    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(height=32, width=32, num_inference_steps=4, guidance_scale=0.0, output_type="latent")
    base = pipe("a photo of [V] ball", latents=noise.clone(), **kw).images
    pipe.load_lora_weights(str(lora.parent))
    tuned = pipe("a photo of [V] ball", latents=noise.clone(), **kw).images
    assert (tuned - base).abs().max() > 1e-4, "the LoRA must change the pipeline's output"

    # ... and it equals the trainer's own student after training (the file holds what was trained)
    from dopsd.config import ModelConfig
    from dopsd.models import load_backend
    from dopsd.sampling import rollout

    be = load_backend(ModelConfig(path=str(tiny_model_dir)))
    be.load_lora(be.transformer, lora.parent)
    ours = rollout(be, be.transformer.eval(), be.encode_student(["a photo of [V] ball"]), noise,
                   be.sigmas(4, tuple(noise.shape)))
    assert torch.allclose(ours, tuned, atol=1e-5)


def test_dopsd_full_finetune_run(make_config, tmp_path, tiny_model_dir):
    cfg = make_config("train.mode=full", "train.lr=1e-4", "train.loss_space=v", "train.backward=once")
    summary, records = _run(cfg)
    _check_common_outputs(cfg, summary, records)
    from diffusers import ZImageTransformer2DModel

    saved = ZImageTransformer2DModel.from_pretrained(tmp_path / "run/exports/final", subfolder="transformer",
                                                     use_safetensors=True)
    base = ZImageTransformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer", use_safetensors=True)
    diffs = [(a - b).abs().max().item() for a, b in zip(saved.state_dict().values(), base.state_dict().values())]
    assert saved.state_dict().keys() == base.state_dict().keys() and max(diffs) > 0


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_sft_baseline_runs(make_config, mode):
    cfg = make_config("train.objective=sft", f"train.mode={mode}", "train.lr=1e-4")
    summary, records = _run(cfg)
    _check_common_outputs(cfg, summary, records)
    assert all("loss_k0" not in r for r in records)


def test_bad_data_is_skipped_and_counted(make_config, concept_dir, tmp_path):
    (concept_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (concept_dir / "corrupt.txt").write_text("a photo of [V] ball\n")
    from dopsd.data.synthetic import draw_concept
    import random

    draw_concept(random.Random(0), 32)[0].save(concept_dir / "nocaption.png")
    cfg = make_config()
    summary, records = _run(cfg)
    assert summary["steps"] == 3
    assert summary["data_skipped"] == {"bad_image": 1, "missing_caption": 1}
    assert sum(summary["data_skipped"].values()) == 2
    assert records[0]["data_skipped"] == summary["data_skipped"]
    log = (tmp_path / "run/train.log").read_text()
    assert "corrupt.png" in log and "nocaption.png" in log


def test_kernels_switch_patches_model_and_loss_without_changing_results(make_config, tmp_path, gpu_tiles):
    # On CPU the kernels run in Triton's interpreter (tests/conftest.py): slow, so one short step.
    base = ("train.steps=1", "train.batch_size=1", "train.rollout_steps=2", "validation.prompts=[]")
    off = Trainer(make_config(*base, "model.kernels=never", out_dir=tmp_path / "off"))
    on = Trainer(make_config(*base, "model.kernels=always", out_dir=tmp_path / "on"))
    assert not off.kernels and on.kernels and on.loss_fn is not off.loss_fn
    patched = [m for m in on.module.modules() if "_dopsd_orig_forward" in m.__dict__]
    assert patched and on.module.state_dict().keys() == off.module.state_dict().keys()
    a, b = off.fit(), on.fit()
    la = [json.loads(x) for x in open(tmp_path / "off/log.jsonl") if '"loss"' in x][0]
    lb = [json.loads(x) for x in open(tmp_path / "on/log.jsonl") if '"loss"' in x][0]
    assert la["loss"] == pytest.approx(lb["loss"], rel=1e-4) and la["grad_norm"] == pytest.approx(lb["grad_norm"], rel=1e-3)
    assert a["steps"] == b["steps"] == 1
