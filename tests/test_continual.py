"""Continual tuning (`model.merge_loras`): a run starts from a previous run's LoRA merged into the base."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dopsd.adapters import add_lora_adapters, merge_lora, student_lora
from dopsd.config import ModelConfig
from dopsd.models import load_backend
from dopsd.trainer import Trainer


def _backend(model_dir):
    return load_backend(ModelConfig(path=str(model_dir), teacher_min_pixels=1024, teacher_max_pixels=4096))


def _velocity(backend, prompt: str = "a photo of a ball") -> torch.Tensor:
    x = torch.randn(backend.latent_shape(1, 32, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return backend.velocity(backend.transformer, x, 0.6, backend.encode_student([prompt]))


def test_merged_lora_computes_what_the_loaded_adapter_computes(tiny_model_dir, tmp_path):
    """W + scale * B A in the weights equals the LoRA applied by peft as diffusers loads it (alpha != rank)."""
    src = _backend(tiny_model_dir)
    torch.manual_seed(0)
    add_lora_adapters(src.transformer, 4, 2.0, src.lora_targets, "gaussian", with_teacher=False)
    with torch.no_grad():
        for name, p in src.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    state, meta = student_lora(src.transformer)
    src.save_lora(state, meta, tmp_path / "lora")

    loaded, merged, plain = _backend(tiny_model_dir), _backend(tiny_model_dir), _backend(tiny_model_dir)
    loaded.load_lora(loaded.transformer, tmp_path / "lora")
    lora_state, lora_meta = merged.read_lora(tmp_path / "lora")
    assert merge_lora(merged.transformer, lora_state, lora_meta, "test") == len(state) // 2
    v_loaded, v_merged, v_plain = _velocity(loaded), _velocity(merged), _velocity(plain)
    assert (v_loaded - v_plain).abs().max() > 1e-2  # the LoRA does change the model
    torch.testing.assert_close(v_merged, v_loaded, atol=1e-5, rtol=1e-4)


def test_merge_refuses_what_it_cannot_merge(tiny_model_dir):
    be = _backend(tiny_model_dir)
    with pytest.raises(ValueError, match="not a linear layer"):
        merge_lora(be.transformer, {"nope.lora_A.weight": torch.zeros(2, 4), "nope.lora_B.weight": torch.zeros(4, 2)},
                   {}, "x")
    with pytest.raises(ValueError, match="lacks lora_B"):
        merge_lora(be.transformer, {"layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 4)}, {}, "x")
    with pytest.raises(FileNotFoundError, match="no such file"):
        be.read_lora("/no/such/lora")


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_concept_b_on_top_of_concept_a_and_both_loras_reproduce_it_in_diffusers(make_config, tmp_path):
    """Two commands: tune A, then B with A merged. B's run starts from A's model (its step-0 samples are A's
    final samples), and diffusers with both LoRAs stacked draws what B's run drew."""
    from diffusers import ZImagePipeline
    from PIL import Image

    from dopsd.data.synthetic import write_concept_folder

    prompt = "a photo of [V] ball"
    common = ("train.steps=3", f'validation.prompts=["{prompt}"]', "validation.seeds=[0]",
              "validation.metrics=[base_distance]")
    a_run = tmp_path / "a"
    Trainer(make_config(*common, out_dir=a_run)).fit()
    lora_a = a_run / "exports" / "final"
    data_b = write_concept_folder(tmp_path / "data_b", count=3, size=32, seed=7)
    b_run = tmp_path / "b"
    cfg = make_config(*common, f'model.merge_loras=["{lora_a}"]', data_dir=data_b, out_dir=b_run)
    assert cfg.model.merge_loras == [str(lora_a)]
    Trainer(cfg).fit()
    assert "merged LoRA" in (b_run / "train.log").read_text()

    def grid_block(run, block):  # (pad 2) [base 32px] (gap 6) [tuned 32px]
        grid = np.asarray(Image.open(run / "samples" / "final.png")).astype(int)
        x0 = 2 + block * (32 + 2 + 6)
        return grid[2:34, x0:x0 + 32]

    # B's base block is A's tuned model: the run started where A ended
    assert np.abs(grid_block(b_run, 0) - grid_block(a_run, 1)).max() <= 1
    assert np.abs(grid_block(b_run, 1) - grid_block(b_run, 0)).max() > 0  # and B tuned further

    pipe = ZImagePipeline.from_pretrained(make_config().model.path, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_a), adapter_name="a")
    pipe.load_lora_weights(str(b_run / "exports" / "final"), adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 1.0])
    noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    image = pipe(prompt, height=32, width=32, num_inference_steps=4, guidance_scale=0.0, latents=noise).images[0]
    assert np.abs(grid_block(b_run, 1) - np.asarray(image).astype(int)).max() <= 2

    # the validation metric of B's run measures distance to B's own start (A's model): 0 at step 0
    val = [json.loads(line) for line in (b_run / "log.jsonl").read_text().splitlines() if '"validation"' in line]
    assert val[0]["step"] == 0 and val[0]["val.base_rmse"] == 0.0 and val[-1]["val.base_rmse"] > 0
