"""FLUX.2-klein editing task on the tiny checkpoint: reference preprocessing, student and teacher parity with
`Flux2KleinPipeline(image=[...])`, where reference tokens go and what the loss sees, Z-Image's refusal, and
3-step D-OPSD / SFT runs on an editing folder whose LoRA loads into the pipeline (and `dopsd sample`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_flux2_klein import ATOL, _backend, _image, _pipe_latents, klein_dir, pipe  # noqa: F401 (fixtures)

from dopsd.data.images import to_tensor
from dopsd.data.references import prepare_reference, reference_tensors
from dopsd.models.flux2_klein import EDIT_INSTRUCTION, EDIT_TASK_INSTRUCTION, pack
from dopsd.objectives import StepBatch, StepContext, dopsd_objective, sft_objective
from dopsd.sampling import rollout, seeded_noise
from dopsd.adapters import add_lora_adapters

INSTRUCTION = "change the background to green"


class _Stop(Exception):
    pass


def _pil(height: int, width: int, seed: int, mode: str = "RGB") -> Image.Image:
    channels = 4 if mode == "RGBA" else 3
    array = (np.random.RandomState(seed).rand(height, width, channels) * 255).astype(np.uint8)
    return Image.fromarray(array, mode)


def _t(pil: Image.Image) -> torch.Tensor:
    return to_tensor(pil)[None]


def _pipeline_references(pipe, images: list[Image.Image]) -> list[torch.Tensor]:
    """The reference tensors the pipeline hands its VAE, as the real klein prepares them (VAE factor 8: sides
    floored to multiples of 16); the run stops before any denoising."""
    seen = []

    def capture(images, **kwargs):
        seen.extend(images)
        raise _Stop

    saved = pipe.vae_scale_factor
    pipe.vae_scale_factor = 8
    pipe.prepare_image_latents = capture
    try:
        with pytest.raises(_Stop):
            pipe(prompt="x", image=images, num_inference_steps=1, max_sequence_length=32,
                 text_encoder_out_layers=(1, 2, 3))
    finally:
        pipe.vae_scale_factor = saved
        del pipe.prepare_image_latents
    return seen


# ----------------------------------------------------------------------------------------------------------

def test_reference_preprocessing_is_the_pipelines(pipe):
    inputs = [_pil(64, 64, 0), _pil(90, 70, 1), _pil(800, 1500, 2), _pil(100, 75, 3, "RGBA")]
    theirs = _pipeline_references(pipe, inputs)
    for img, ref in zip(inputs, theirs):
        ours = to_tensor(prepare_reference(img))
        assert ours.shape[-2] % 16 == 0 and ours.shape[-1] % 16 == 0 and ours.shape[-2] * ours.shape[-1] <= 1 << 20
        assert ref.shape == (1, *ours.shape)
        assert torch.allclose(ours * 2 - 1, ref[0], atol=1e-6, rtol=0)  # the pipeline's tensors are in [-1, 1]
    assert tuple(theirs[2].shape[-2:]) == (736, 1392)  # > 1 MP: Lanczos to 1 MP, then floored to 16
    for refused in (_pil(48, 80, 4), _pil(64, 640, 5)):  # a side under 64 px; aspect ratio 10
        with pytest.raises(ValueError):
            prepare_reference(refused)
        with pytest.raises(ValueError):
            pipe(prompt="x", image=[refused], num_inference_steps=1, max_sequence_length=32,
                 text_encoder_out_layers=(1, 2, 3))


def test_student_with_references_matches_the_pipeline(klein_dir, pipe):
    """Student = `pipeline(image=[ref0, ref1], prompt=instruction)`: zero LoRA, same noise."""
    be = _backend(klein_dir)
    add_lora_adapters(be.transformer, rank=4, alpha=8, targets=be.lora_targets, init="gaussian", with_teacher=True)
    refs = [_pil(64, 64, 10), _pil(64, 80, 11)]
    shape = be.latent_shape(1, 64, 64)
    noise = seeded_noise(shape, seed=5)
    ctx = be.encode_student([INSTRUCTION], references=[_t(r) for r in refs])
    ours = be.to_vae_latents(rollout(be, be.transformer.eval(), ctx, noise, be.sigmas(4, shape)))
    ref = _pipe_latents(pipe, INSTRUCTION, noise, size=64, image=refs)
    diff = (ours - ref).abs().max().item()
    print(f"student with 2 references vs pipeline: max abs diff {diff:.3g}")
    assert diff <= ATOL
    plain = rollout(be, be.transformer, be.encode_student([INSTRUCTION]), noise, be.sigmas(4, shape))
    assert (be.to_vae_latents(plain) - ours).abs().max() > 1e-3  # the references change the prediction


def test_teacher_is_the_pipeline_with_the_target_as_last_reference(klein_dir, pipe):
    be = _backend(klein_dir)
    be.transformer.eval()
    refs = [_pil(64, 64, 12), _pil(80, 64, 13)]
    target_pil, target = _image(64, seed=14)
    teacher_prompt = be.teacher_prompt(INSTRUCTION, editing=True)
    assert teacher_prompt == f"{INSTRUCTION} {EDIT_TASK_INSTRUCTION}" and "last image" in teacher_prompt
    assert be.teacher_prompt(INSTRUCTION) == f"{INSTRUCTION} {EDIT_INSTRUCTION}"  # text-to-image wording
    shape = be.latent_shape(1, 64, 64)
    noise = seeded_noise(shape, seed=6)
    ctx = be.encode_teacher([INSTRUCTION], target, references=[_t(r) for r in refs])
    ours = be.to_vae_latents(rollout(be, be.transformer, ctx, noise, be.sigmas(4, shape)))
    ref = _pipe_latents(pipe, teacher_prompt, noise, size=64, image=refs + [target_pil])
    diff = (ours - ref).abs().max().item()
    print(f"teacher (2 references + target) vs pipeline: max abs diff {diff:.3g}")
    assert diff <= ATOL


def _record_calls(transformer, calls: list):
    def pre(module, args, kw):
        calls.append({"tokens": kw["hidden_states"].shape[1], "ids": kw["img_ids"].clone(),
                      "hidden": kw["hidden_states"].detach().clone(), "grad": torch.is_grad_enabled()})

    def post(module, args, kw, out):
        calls[-1]["out"] = out[0].detach().clone()

    return [transformer.register_forward_pre_hook(pre, with_kwargs=True),
            transformer.register_forward_hook(post, with_kwargs=True)]


def test_teacher_call_has_one_more_reference_and_the_loss_sees_noisy_tokens_only(klein_dir):
    be = _backend(klein_dir)
    add_lora_adapters(be.transformer, rank=4, alpha=8, targets=be.lora_targets, init="gaussian", with_teacher=True)
    from dopsd.teacher import EmaTeacher

    teacher = EmaTeacher.for_lora(be.transformer, 0.9)
    refs = [torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 80)]
    images = torch.rand(2, 3, 32, 32)
    n, n_r0, n_r1, n_t = 8 * 8, 16 * 16, 16 * 20, 8 * 8
    sigmas = be.sigmas(2, be.latent_shape(2, 32, 32))
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    calls: list = []
    hooks = _record_calls(be.transformer, calls)
    try:
        result = dopsd_objective(StepContext(be, be.transformer, teacher),
                                 StepBatch(["a", "b"], images, gens, sigmas, references=refs))
    finally:
        for h in hooks:
            h.remove()
    teacher_calls, student_calls = calls[0::2], calls[1::2]
    assert len(teacher_calls) == len(student_calls) == 2
    assert all(c["tokens"] == n + n_r0 + n_r1 + n_t and not c["grad"] for c in teacher_calls)
    assert all(c["tokens"] == n + n_r0 + n_r1 and c["grad"] for c in student_calls)
    s_ids, t_ids = student_calls[0]["ids"], teacher_calls[0]["ids"]
    assert s_ids[:, 0].unique().tolist() == [0, 10, 20] and t_ids[:, 0].unique().tolist() == [0, 10, 20, 30]
    assert torch.equal(t_ids[:n + n_r0 + n_r1], s_ids)  # same references at the same places; the target last
    assert torch.allclose(teacher_calls[0]["hidden"][:, n + n_r0 + n_r1:], pack(be.encode_images(images)))
    assert torch.allclose(student_calls[0]["hidden"][:, n:n + n_r0], pack(be.encode_images(refs[0])))
    # the loss of roll-out step 0 is the x0 MSE of the first n output tokens of each call, nothing else
    x, s = student_calls[0]["hidden"][:, :n], sigmas[0]
    v_s, v_t = student_calls[0]["out"][:, :n], teacher_calls[0]["out"][:, :n]
    assert result.terms[0] == pytest.approx(F.mse_loss(x - s * v_s, x - s * v_t).item(), rel=1e-5)

    calls.clear()
    hooks = _record_calls(be.transformer, calls)
    try:
        sft_objective(StepContext(be, be.transformer), StepBatch(["a", "b"], images, gens, references=refs))
    finally:
        for h in hooks:
            h.remove()
    assert [(c["tokens"], c["grad"]) for c in calls] == [(n + n_r0 + n_r1, True)]


def test_zimage_refuses_references(backend, tiny_model_dir):
    from dopsd.config import ConfigError, from_dict

    refs = [torch.rand(1, 3, 64, 64)]
    with pytest.raises(ValueError, match="flux2_klein"):
        backend.encode_student(["a"], references=refs)
    with pytest.raises(ValueError, match="flux2_klein"):
        backend.encode_teacher(["a"], torch.rand(1, 3, 32, 32), references=refs)
    assert len(backend.encode_student(["a"], references=[])) == 1  # no references: text-to-image as before
    with pytest.raises(ConfigError, match="validation.references"):
        from_dict({"model": {"path": str(tiny_model_dir)}, "data": {"path": "d"},
                   "validation": {"prompts": ["a"], "references": ["r.png"]}})


@pytest.mark.parametrize("objective", ["dopsd", "sft"])
def test_edit_run_writes_a_lora_that_loads_in_the_pipeline(klein_dir, pipe, tmp_path, objective):
    from safetensors import safe_open

    from dopsd.config import from_dict
    from dopsd.data.synthetic import write_edit_folder
    from dopsd.trainer import Trainer

    data = write_edit_folder(tmp_path / "data", count=3, size=64, seed=2)
    tokens = 192  # holds the teacher prompt (the tiny tokenizer spends ~170 tokens on it); faster than 512
    cfg = from_dict({
        "model": {"backend": "flux2_klein", "path": str(klein_dir), "max_text_tokens": tokens},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "rollout_steps": 2, "ema_decay": 0.9,
                  "objective": objective, "dual_forward": "separate"},  # the hook below counts separate calls
        "data": {"path": str(data), "resolution": [32, 32]},
        "validation": {"prompts": [INSTRUCTION], "seeds": [0], "references": [str(data / "000.ref0.png")]},
        "output": {"dir": str(tmp_path / "run"), "progress_bar": False, "tensorboard": False},
    })
    trainer = Trainer(cfg)
    n, n_ref = 8 * 8, 16 * 16
    calls = []
    hook = trainer.backend.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append((kw["hidden_states"].shape[1], torch.is_grad_enabled())), with_kwargs=True)
    summary = trainer.fit()
    hook.remove()
    assert summary["steps"] == 3 and summary["data_skipped"] == {}
    trained = [c for c in calls if c[1]]
    assert len(trained) == (3 * 2 if objective == "dopsd" else 3) and all(t == n + n_ref for t, _ in trained)
    teacher = [c for c in calls if c[0] == n + n_ref + n]  # the target appended as one more reference
    assert len(teacher) == (3 * 2 if objective == "dopsd" else 0) and not any(g for _, g in teacher)
    # validation samples (2 x 2 steps before and after) see the reference too
    assert sum(1 for t, g in calls if not g and t == n + n_ref) == 4
    assert Path(summary["samples"]).is_file()

    lora = Path(summary["final"]) / "pytorch_lora_weights.safetensors"
    with safe_open(lora, "pt") as f:
        assert all(k.startswith("transformer.") and "teacher" not in k for k in f.keys())
    ref_pil = Image.open(data / "000.ref0.png")
    noise = seeded_noise((1, 16, 8, 8), 0)
    kw = dict(steps=2, size=32, image=[ref_pil], max_sequence_length=tokens)
    base = _pipe_latents(pipe, INSTRUCTION, noise, **kw)
    pipe.load_lora_weights(str(lora.parent))
    try:
        tuned = _pipe_latents(pipe, INSTRUCTION, noise, **kw)
    finally:
        pipe.unload_lora_weights()
    assert (tuned - base).abs().max() > 1e-4, "the LoRA must change the pipeline's output"
    be = _backend(klein_dir)
    be.max_text_tokens = tokens
    be.load_lora(be.transformer, lora.parent)
    ctx = be.encode_student([INSTRUCTION], references=[r[None] for r in reference_tensors([data / "000.ref0.png"])])
    ours = rollout(be, be.transformer.eval(), ctx, noise, be.sigmas(2, tuple(noise.shape)))
    assert torch.allclose(be.to_vae_latents(ours), tuned, atol=ATOL)


def test_sample_cli_takes_references(klein_dir, tmp_path):
    from dopsd.cli import main

    ref = tmp_path / "in.png"
    _pil(64, 64, 20).save(ref)
    common = ["sample", "--model", str(klein_dir), "--backend", "flux2_klein", "--prompt", INSTRUCTION,
              "--resolution", "32", "32", "--steps", "2"]
    assert main(common + ["--reference", str(ref), "--out", str(tmp_path / "edit.png")]) == 0
    assert main(common + ["--out", str(tmp_path / "plain.png")]) == 0
    edit, plain = (np.asarray(Image.open(tmp_path / name)) for name in ("edit.png", "plain.png"))
    assert edit.shape == plain.shape and not np.array_equal(edit, plain)
    _pil(32, 32, 21).save(tmp_path / "small.png")
    assert main(common + ["--reference", str(tmp_path / "small.png")]) == 2  # the pipeline refuses it too


def test_shipped_edit_config_and_data(tmp_path):
    from dopsd.config import load_config
    from dopsd.data.folder import FolderDataset
    from dopsd.data.synthetic import write_edit_folder

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "flux2_klein_edit_tiny.yaml")
    assert cfg.model.backend == "flux2_klein" and cfg.model.make_tiny_if_missing
    shipped = repo / cfg.data.path
    ds = FolderDataset(shipped, *cfg.data.resolution)
    assert len(ds) == 4 and ds.num_skipped == 0 and all(len(it.references) == 1 for it in ds.items)
    assert cfg.validation.references and all((repo / p).is_file() for p in cfg.validation.references)
    again = write_edit_folder(tmp_path / "again", count=4, size=64, seed=0)  # the generator wrote what ships
    assert {p.name: p.read_bytes() for p in shipped.iterdir()} == {p.name: p.read_bytes() for p in again.iterdir()}
