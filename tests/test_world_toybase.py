"""The miniature world's toy turbo model: the script that makes it, the shipped checkpoint, and the SFT vs
D-OPSD comparison's smoke run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dopsd.config import ModelConfig
from dopsd.models import load_backend
from dopsd.sampling import sample_batch as sample
from dopsd_world import EVALUATOR_WEIGHTS, PLACEHOLDER, captions, concept_samples, sample_world
from dopsd_world.evaluator import load_evaluator
from dopsd_world.toybase import QUALITY_BAR, ToyBaseSettings, make_toy_base, strip_texture

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "dopsd" / "assets"
TOY = ASSETS / "toy_turbo"


def _backend(path: Path):
    return load_backend(ModelConfig(backend="zimage", path=str(path), teacher_min_pixels=4096,
                                    teacher_max_pixels=4096))


def test_strip_texture_removes_every_texture_phrase():
    _, attrs = sample_world(40, seed=3)
    for a in attrs:
        for caption in captions(a):
            stripped = strip_texture(caption)
            assert a.texture not in stripped and "stripes" not in stripped and "dots" not in stripped
            assert a.shape in stripped and a.color in stripped and a.background in stripped
            assert "  " not in stripped and " ," not in stripped


def test_settings_defaults_are_the_shipped_checkpoints():
    """`dopsd-world make-toy-base` with no --set reproduces the shipped toy turbo only while the defaults
    are the settings its report.json records."""
    from dataclasses import asdict

    shipped = json.loads((TOY / "report.json").read_text())["settings"]
    assert shipped == json.loads(json.dumps(asdict(ToyBaseSettings())))


def test_script_builds_a_loadable_model_and_reuses_finished_stages(tmp_path):
    tiny = dict(num_images=64, num_unnamed=32, vae_steps=3, vae_batch=8, pretrain_steps=3, incontext_steps=2, batch=8,
                trajectories=16, teacher_steps=8, distill_steps=2, dit_dim=64, dit_layers=1)
    work = tmp_path / "work"
    first = make_toy_base(tmp_path / "a", ToyBaseSettings(**tiny), work=work)
    assert not first["stages"]["vae"].get("cached") and not first["stages"]["pretrain"].get("cached")
    # a distillation-only change reuses the cached VAE and pretraining stages
    second = make_toy_base(tmp_path / "b", ToyBaseSettings(**{**tiny, "distill_steps": 3}), work=work)
    assert all(second["stages"][k]["cached"] for k in ("vae", "pretrain", "incontext"))
    assert json.loads((tmp_path / "b" / "report.json").read_text())["settings"]["distill_steps"] == 3

    backend = _backend(tmp_path / "a")  # the real loading code: ZImageBackend.from_config
    assert backend.transformer.config.dim == 64 and backend.vae.config.latent_channels == 8
    images = sample(backend, backend.transformer, ["a small red plain circle"], [0], 4, 32)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    # the teacher path (grafted Qwen3-VL front-end) loads from the saved teacher_encoder/ too
    ctx = backend.encode_teacher([""], images)
    assert len(ctx) == 1 and ctx[0].shape[-1] == backend.transformer.config.cap_feat_dim


class _Killed(Exception):
    pass


def _kill_on_call(monkeypatch, module, name: str, n: int) -> None:
    """Make module.name raise on its n-th call from now (a build killed in the middle of a stage)."""
    real, calls = getattr(module, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            raise _Killed(f"{name} call {n}")
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)


def test_build_killed_in_every_long_stage_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """`--work`: a build killed mid-pretraining, mid-in-context training, mid-trajectories and mid-distillation
    continues each time from its last mid-stage checkpoint and ends with the weights of an unbroken build."""
    import dopsd_world.toybase as tb

    tiny = dict(num_images=64, num_unnamed=32, vae_steps=3, vae_batch=8, pretrain_steps=4, incontext_steps=3,
                batch=8, trajectories=16, teacher_steps=8, distill_steps=3, dit_dim=64, dit_layers=1)
    monkeypatch.setattr(tb, "TRAJECTORY_CHUNK", 4)  # 4 chunks, so the trajectories stage can stop between two
    make_toy_base(tmp_path / "straight", ToyBaseSettings(**tiny))
    work = tmp_path / "work"
    kills = [("_optimizer_step", 3),  # pretraining step 3 (steps 1-2 saved)
             ("_optimizer_step", 4),  # pretraining 3-4, then in-context step 2
             ("velocity", 20),        # in-context step 3, then the trajectories' third chunk
             ("_optimizer_step", 2)]  # distillation step 2
    partials = []
    for name, n in kills:
        with monkeypatch.context() as m:
            _kill_on_call(m, tb, name, n)
            with pytest.raises(_Killed):
                make_toy_base(tmp_path / "resumed", ToyBaseSettings(**tiny), work=work, checkpoint_every_s=0)
        partials.append(sorted(p.name.split("-")[0] for p in work.glob("*.partial.safetensors")))
    assert partials == [["pretrain"], ["incontext"], ["trajectories"], ["distill"]]
    report = make_toy_base(tmp_path / "resumed", ToyBaseSettings(**tiny), work=work, checkpoint_every_s=0)
    assert not list(work.glob("*.partial.safetensors"))  # each stage's loop state goes once its result is kept
    assert report["stages"]["pretrain"]["cached"] and report["stages"]["incontext"]["cached"]
    for part in ("transformer", "text_encoder", "vae"):
        for f in (tmp_path / "straight" / part).glob("*.safetensors"):
            a, b = load_file(f), load_file(tmp_path / "resumed" / part / f.name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_data_parallel_build_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m dopsd_world.toybase`: each rank computes half of every global batch (and
    half of the trajectories) and gradients are averaged, so the model is the one-process model up to float
    summation order; the work cache written by rank 0 alone is reused."""
    import socket

    from dopsd.models.zimage_tiny import build_tiny_components
    from dopsd_world.toybase import world_corpus

    sets = dict(num_images=48, num_unnamed=16, vae_steps=2, vae_batch=8, pretrain_steps=4, incontext_steps=3, batch=8,
                trajectories=256, teacher_steps=8, distill_steps=3, dit_dim=64, dit_layers=1, threads=1,
                # large warm-up steps in pretraining (weights move ~0.03); none in distillation, whose tiny
                # x0-weighted gradients let Adam amplify float noise (1 vs 2 threads differ as much there)
                pretrain_lr=0.5, incontext_lr=0.05, distill_lr=0.0)
    threads = torch.get_num_threads()
    try:
        make_toy_base(tmp_path / "one", ToyBaseSettings(**sets))
    finally:
        torch.set_num_threads(threads)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "dopsd_world.toybase", "--out", str(tmp_path / "two"), "--work", str(tmp_path / "work"), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["processes"] == 2
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "work").iterdir()) == [
        "incontext", "pretrain", "trajectories", "vae"]
    s = ToyBaseSettings(**sets)
    torch.manual_seed(s.seed)
    init = build_tiny_components(s.seed, dit_dim=s.dit_dim, dit_layers=s.dit_layers, text_hidden=s.text_hidden,
                                 vae_channels=s.vae_channels, vae_groups=s.vae_groups,
                                 latent_channels=s.latent_channels, teacher_patch=s.teacher_patch,
                                 vision_hidden=s.vision_hidden, shift=s.shift, tokenizer_corpus=world_corpus())
    for part, name in (("transformer/diffusion_pytorch_model.safetensors", "transformer"),
                       ("text_encoder/model.safetensors", "text_encoder")):
        a, b = load_file(tmp_path / "one" / part), load_file(tmp_path / "two" / part)
        start = init[name].state_dict()
        assert a.keys() == b.keys()
        trained = max((a[k] - start[k]).abs().max().item() for k in a)
        apart = max((a[k] - b[k]).abs().max().item() for k in a)
        assert apart < 1e-3 < 0.02 < trained, (part, apart, trained)
    # the trajectories and the distillation loss (a global-batch mean, as logged) are the same too
    first = json.loads((tmp_path / "one" / "report.json").read_text())["stages"]
    for stage in ("pretrain", "incontext", "distill"):
        a, b = first[stage]["final_loss"], report["stages"][stage]["final_loss"]
        assert abs(a - b) <= 1e-3 * abs(a), (stage, a, b)


def test_mixed_batches_route_each_sample_to_its_context():
    """Pretraining batches mix text, VLM and DiT-reference samples; `velocity` splits them into one plain and
    one omni call and puts every prediction back in its place."""
    from dopsd_world.toybase import REFERENCE, TEXT, VLM, contexts, velocity

    backend = _tiny_backend()
    pixels, attrs = sample_world(5, seed=7)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    prompts = [captions(a)[0] for a in attrs]
    kinds = [REFERENCE, TEXT, VLM, REFERENCE, TEXT]
    x = torch.randn(backend.latent_shape(5, 32, 32), generator=torch.Generator().manual_seed(0))
    sig = torch.linspace(0.2, 0.9, 5)
    with torch.no_grad():
        mixed = velocity(backend, backend.transformer, x, sig, contexts(backend, prompts, images, kinds, grad=False))
        for i, kind in enumerate(kinds):
            one = velocity(backend, backend.transformer, x[i:i + 1], sig[i:i + 1],
                           contexts(backend, prompts[i:i + 1], images[i:i + 1], [kind], grad=False))
            assert torch.allclose(mixed[i], one[0], atol=1e-5), (i, kind)


def _tiny_backend():
    """An untrained toy-base backend over live components (as the script builds it)."""
    from dopsd.models.zimage_tiny import build_tiny_components
    from dopsd_world.toybase import build_backend, world_corpus

    s = ToyBaseSettings(dit_dim=64, dit_layers=1)
    c = build_tiny_components(0, dit_dim=64, dit_layers=1, text_hidden=s.text_hidden, vae_channels=s.vae_channels,
                              vae_groups=s.vae_groups, latent_channels=s.latent_channels,
                              teacher_patch=s.teacher_patch, vision_hidden=s.vision_hidden,
                              tokenizer_corpus=world_corpus())
    return build_backend(c, s, trainable=False)


def test_image_token_span_points_at_the_reference_image_tokens():
    """The auxiliary reconstruction head reads the teacher context's image tokens: the span must start right
    after the (image-independent) template prefix and hold one token per merged patch."""
    from dopsd_world.toybase import image_token_span

    s = ToyBaseSettings(dit_dim=64, dit_layers=1)
    backend = _tiny_backend()
    start, count = image_token_span(backend, s.size)
    assert count == (2 * s.size // (s.teacher_patch * 2)) ** 2
    pixels, _ = sample_world(2, seed=5)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        a, b = (backend.vlm_features(["a red circle"], x[None])[0] for x in images)
    assert torch.equal(a[:start], b[:start])  # the causal prefix does not see the image
    assert not torch.allclose(a[start], b[start])  # the first image token does


def test_script_options_for_in_context_experiments(tmp_path):
    """Opt-in knobs: both unnamed-texture families, and the auxiliary patch-reconstruction loss."""
    tiny = dict(num_images=48, num_unnamed=16, unnamed_textures="4x1,8x2", aux_weight=1.0, vae_steps=2,
                vae_batch=8, pretrain_steps=3, incontext_steps=0, batch=8, trajectories=8, teacher_steps=4, distill_steps=1, dit_dim=64,
                dit_layers=1)
    report = make_toy_base(tmp_path / "m", ToyBaseSettings(**tiny))
    without = make_toy_base(tmp_path / "n", ToyBaseSettings(**{**tiny, "aux_weight": 0.0}))
    # the reconstruction term is in the optimised loss (untrained, it dwarfs 3 steps' flow-loss drift)
    assert report["stages"]["pretrain"]["final_loss"] > without["stages"]["pretrain"]["final_loss"] + 0.01
    assert _backend(tmp_path / "m").transformer.config.dim == 64


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return _backend(TOY), load_evaluator(EVALUATOR_WEIGHTS)


def test_shipped_turbo_reaches_the_quality_bar_at_4_steps(toy):
    backend, evaluator = toy
    images, attrs = sample_world(64, seed=31_337)
    prompts = [captions(a)[i % 3] for i, a in enumerate(attrs)]
    out = sample(backend, backend.transformer, prompts, list(range(64)), 4, 32)
    scores = evaluator.score(out, targets=attrs)
    assert scores["acc_mean"] >= QUALITY_BAR["acc_mean"], scores
    assert scores["sharpness_ratio"] >= QUALITY_BAR["sharpness_ratio"], scores


def test_shipped_turbo_copies_the_reference_image_in_context(toy):
    """The teacher path: with the image as context and no text, the turbo redraws the reference (colour,
    size, position, background and named texture come from the image alone)."""
    backend, evaluator = toy
    pixels, attrs = sample_world(64, seed=31_338)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    out = sample(backend, backend.transformer, [""] * 64, list(range(64)), 4, 32, images=images)
    acc = evaluator.attribute_accuracy(out, attrs)
    assert acc["mean"] >= QUALITY_BAR["image_only_acc"], acc
    for name in ("color", "background", "position", "texture"):
        assert acc[name] >= 0.9, acc


def _concept_teacher_samples(backend, route: str):
    from dopsd_world.toybase import teacher_samples

    pixels, attrs = concept_samples(32, seed=4242)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    prompts = [captions(a, PLACEHOLDER)[i % 3] for i, a in enumerate(attrs)]
    out = teacher_samples(backend, prompts, images, route, 4, 32)
    assert backend.teacher_context == "vlm"  # the configured route is back
    return out, attrs


def test_shipped_turbo_renders_the_unseen_texture_from_a_reference(toy):
    """The teacher D-OPSD needs: shown an image of the texture it never saw, with a "[V]" prompt, the turbo
    draws that texture -- when the image reaches the DiT as a reference (`teacher_context: reference`)."""
    backend, evaluator = toy
    teacher, attrs = _concept_teacher_samples(backend, "reference")
    acc = evaluator.attribute_accuracy(teacher, attrs)
    # 0.81 here (0.88 on the build report's 64 references); through the VLM 0.12, from the text alone 0
    assert acc["texture"] >= 0.6 and acc["mean"] >= QUALITY_BAR["reference_acc"], acc
    student = sample(backend, backend.transformer, [captions(a, PLACEHOLDER)[i % 3] for i, a in enumerate(attrs)],
                     list(range(32)), 4, 32)
    assert evaluator.attribute_accuracy(student, attrs)["texture"] <= 0.1  # the text alone does not know "[V]"


@pytest.mark.xfail(strict=True, reason="known limit of the shipped toy base: through the Qwen3-VL front-end its "
                   "teacher rarely draws the unseen checkered texture (it cannot decode a texture it has no word "
                   "for from the encoder's tokens; see benchmarks/world/README.md)")
def test_shipped_turbo_renders_the_unseen_texture_through_the_vlm(toy):
    backend, evaluator = toy
    teacher, attrs = _concept_teacher_samples(backend, "vlm")
    assert evaluator.attribute_accuracy(teacher, attrs)["texture"] >= 0.5


def test_quickstart_config_teaches_the_concept(toy, tmp_path):
    """The quickstart's D-OPSD run (shortened: 40 steps at a higher lr) makes the student draw the texture it
    never saw for held-out "[V]" prompts, which the base never does (measured: 0.78-0.88 after, 0 before)."""
    from dopsd.config import load_config
    from dopsd.trainer import Trainer

    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        "train.steps=40", "train.lr=3e-3", "validation.every=0", f"output.dir={tmp_path}", "output.save_every=0",
        "output.progress_bar=false", "output.tensorboard=false", f"model.path={TOY}", f"data.path={ASSETS / 'quickstart'}"])
    Trainer(cfg).fit()
    backend, evaluator = toy
    _, attrs = concept_samples(32, seed=77)
    prompts = [captions(a, PLACEHOLDER)[i % 3] for i, a in enumerate(attrs)]
    before = evaluator.attribute_accuracy(sample(backend, backend.transformer, prompts, list(range(32)), 4, 32), attrs)
    tuned = _backend(TOY)
    tuned.load_lora(tuned.transformer, tmp_path / "exports" / "final")
    after = evaluator.attribute_accuracy(sample(tuned, tuned.transformer, prompts, list(range(32)), 4, 32), attrs)
    assert before["texture"] <= 0.1 and after["texture"] >= 0.5, (before, after)


def test_comparison_smoke_run_writes_its_table(tmp_path, toy):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_world.py"), "--smoke", "--out",
                        str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| SFT |" in table and "| D-OPSD |" in table and "| base (untuned) |" in table
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["report"]) == {"sft", "dopsd", "dopsd_vlm"}
    assert "| D-OPSD, VLM teacher |" in table
    for method in ("sft", "dopsd", "dopsd_vlm"):
        assert 0.0 <= results["report"][method]["few"]["concept_texture"][0] <= 1.0
    assert (tmp_path / "out" / "curves.png").stat().st_size > 0
    assert (tmp_path / "out" / "grid_concept_4steps.png").stat().st_size > 0
    # the post-hoc budgets diagnostic scores the same runs' LoRAs, and a "pre-distillation" stage cache: here
    # the turbo's weights with noise added, so its row must differ from the turbo's (the cache is what is scored)
    cache = tmp_path / "incontext-test.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_file({f"transformer.{k}": (v + 0.5 * v.abs().mean() * torch.randn(v.shape, generator=gen)).contiguous()
               for k, v in toy[0].transformer.state_dict().items()}, str(cache))
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_world_budgets.py"), "--smoke", "--out",
                        str(tmp_path / "out"), "--runs", str(tmp_path / "work"), "--budgets", "1,2",
                        "--pre-distillation", str(cache)],
                       capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    scores = json.loads((tmp_path / "out" / "budgets.json").read_text())["scores"]
    assert set(scores) == {"turbo (shipped)", "before step distillation", "SFT", "D-OPSD", "D-OPSD, VLM teacher"}
    assert scores["before step distillation"]["2"][0]["fd"] != scores["turbo (shipped)"]["2"][0]["fd"]
    assert all(set(by_budget) == {"1", "2"} for by_budget in scores.values())
    assert 0.0 <= scores["SFT"]["1"][0]["retention_acc"] <= 1.0
    assert "| D-OPSD | 2 |" in (tmp_path / "out" / "budgets.md").read_text()
