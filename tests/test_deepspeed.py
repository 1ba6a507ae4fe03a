"""DeepSpeed ZeRO-3 on 2 CPU ranks (gloo), launched by the real `deepspeed` CLI.

One LoRA run (A) is shared by several tests: parity with one process, sharding, exact resume, export.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dopsd import checkpoint as ckpt
from dopsd.config import from_dict
from dopsd.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
DEEPSPEED = Path(sys.executable).parent / "deepspeed"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(model_dir, data_dir, out_dir, **sections) -> dict:
    cfg = {
        "model": {"path": str(model_dir), "teacher_min_pixels": 1024, "teacher_max_pixels": 4096},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"steps": 4, "batch_size": 2, "lr": 1e-3, "rollout_steps": 4, "ema_decay": 0.9},
        "data": {"path": str(data_dir), "resolution": [32, 32]},
        "validation": {"prompts": ["a photo of [V] ball"], "seeds": [0]},
        "output": {"dir": str(out_dir), "progress_bar": False},
        "checkpoint": {"every": 2, "keep": 5},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def _launch(cfg: dict, tmp: Path, *extra: str, ranks: int = 2) -> subprocess.CompletedProcess:
    path = tmp / f"cfg_{abs(hash(json.dumps(cfg, sort_keys=True, default=str)))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    cmd = [str(DEEPSPEED), "--num_accelerators", str(ranks), "--master_port", str(_port()), "--module",
           "dopsd.train", "--config", str(path), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    return r


def test_deepspeed_launch_leaves_no_shared_memory_behind(tmp_path):
    """DeepSpeed's CPU shm all-reduce creates a segment per rank in /dev/shm and never unlinks it;
    `init_distributed` releases them, so a run leaves no RAM behind."""
    script = tmp_path / "init_only.py"
    script.write_text(
        "import os, deepspeed.comm as dc\n"
        "from dopsd.dist import init_distributed\n"
        "info = init_distributed(deepspeed=True)\n"
        "backend = dc.comm.cdb\n"
        "line = f'SHM {info.rank} {os.environ.get(\"LOCAL_SIZE\")} {backend.shm_comm_op is not None}'\n"
        f"open(f'{tmp_path}/rank{{info.rank}}.txt', 'w').write(line)\n")  # one file per rank: stdout interleaves
    port = _port()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(DEEPSPEED), "--num_accelerators", "2", "--master_port", str(port), str(script)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    # the launcher said both ranks are local and the shm op was built: DeepSpeed did create the segments
    lines = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
    assert sorted(line.split()[1:] for line in lines if line.startswith("SHM")) == [
        ["0", "2", "True"], ["1", "2", "True"]], lines
    left = [p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")]
    assert left == [], left


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in _records(run) if "loss" in r}


def _zero3(cfg: dict, stage: str = "zero3") -> dict:
    cfg["train"]["batch_size"] = 1  # 2 ranks x 1 = the single process's global batch of 2
    cfg["engine"] = {"type": "deepspeed",
                     "deepspeed_config": str(Path(__file__).parents[1] / f"configs/deepspeed/{stage}.json")}
    return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from dopsd.data.synthetic import write_concept_folder

    return write_concept_folder(tmp_path_factory.mktemp("data"), count=4, size=32, seed=3)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, data_dir, tmp_path_factory):
    """single: 1 process x batch 2, 4 steps; zero3: 2 ranks x batch 1, 4 steps, checkpoints at 2 and 4."""
    tmp = tmp_path_factory.mktemp("ds")
    single = tmp / "single"
    Trainer(from_dict(_config(tiny_model_dir, data_dir, single))).fit()
    zero3 = tmp / "zero3"
    _launch(_zero3(_config(tiny_model_dir, data_dir, zero3)), tmp)
    return {"single": single, "zero3": zero3, "tmp": tmp}


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def test_zero3_lora_matches_single_process_and_shards(runs):
    single, zero3 = _losses(runs["single"]), _losses(runs["zero3"])
    assert sorted(single) == sorted(zero3) == [1, 2, 3, 4]
    for step in single:  # fp32; only reduction order differs
        assert _close(single[step]["loss"], zero3[step]["loss"], 1e-4), step
        assert _close(single[step]["grad_norm"], zero3[step]["grad_norm"], 1e-3), step
        for k in range(4):
            assert _close(single[step][f"loss_k{k}"], zero3[step][f"loss_k{k}"], 1e-4)
    start = _records(runs["zero3"])[0]
    shards = start["params_per_rank"]
    assert len(shards) == 2 and all(0.4 < s / start["params_total"] < 0.6 for s in shards), shards
    assert start["trainable_params"] == _records(runs["single"])[0]["trainable_params"]

    # the LoRA gathered from ZeRO-3 shards is non-empty and equals what one process trained
    a = load_file(runs["single"] / "exports/final/pytorch_lora_weights.safetensors")
    b = load_file(runs["zero3"] / "exports/final/pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert b[key].numel() == a[key].numel() > 0
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-3), key
    assert any(v.abs().max() > 0 for k, v in b.items() if "lora_B" in k)


def test_zero3_fused_dual_forward_equals_separate(runs, tiny_model_dir, data_dir):
    """The zero3 run is the default fused pass; the separate path (two forwards, no prefetch) on the same 2
    ranks gives the same per-step losses, per roll-out-step terms and gradient norms."""
    separate = runs["tmp"] / "zero3-separate"
    over = {"train": {"steps": 2, "dual_forward": "separate"}, "checkpoint": {"every": 0},
            "validation": {"every": 0, "prompts": []}}
    _launch(_zero3(_config(tiny_model_dir, data_dir, separate, **over)), runs["tmp"])
    fused, sep = _losses(runs["zero3"]), _losses(separate)
    for step in (1, 2):
        for key in ("loss", "grad_norm", *(f"loss_k{k}" for k in range(4))):
            assert _close(fused[step][key], sep[step][key], 1e-5), (step, key)


def test_zero3_grad_accum_and_schedule_match_one_process_batch(runs, tiny_model_dir, data_dir):
    """2 ranks x batch 1 x grad_accum 2 under ZeRO-3 computes what one process with batch 4 does: the same
    losses, gradient norms and (warmup + cosine) learning rates at every step."""
    over = {"train": {"steps": 2, "warmup_steps": 1, "lr_schedule": "cosine"}, "checkpoint": {"every": 0},
            "validation": {"every": 0, "prompts": []}}
    one = runs["tmp"] / "batch4"
    cfg = _config(tiny_model_dir, data_dir, one, **over)
    cfg["train"]["batch_size"] = 4
    Trainer(from_dict(cfg)).fit()
    accum = runs["tmp"] / "zero3-accum"
    cfg = _zero3(_config(tiny_model_dir, data_dir, accum, **over))
    cfg["train"]["grad_accum"] = 2
    _launch(cfg, runs["tmp"])
    a, b = _losses(one), _losses(accum)
    assert sorted(a) == sorted(b) == [1, 2]
    assert [a[s]["lr"] for s in (1, 2)] == [b[s]["lr"] for s in (1, 2)] and a[2]["lr"] > 0
    for step in (1, 2):
        for key in ("loss", "grad_norm", "loss_k0", "loss_k3"):
            assert _close(a[step][key], b[step][key], 1e-4), (step, key)


def test_offline_export_of_zero3_checkpoint_equals_in_run_export(runs, tmp_path):
    from dopsd.export import export_checkpoint

    latest = ckpt.find_latest(runs["zero3"] / "checkpoints")
    assert latest is not None and latest.name == "step_00000004"
    path = export_checkpoint(latest, tmp_path / "out")
    offline = load_file(path)
    in_run = load_file(runs["zero3"] / "exports/final/pytorch_lora_weights.safetensors")
    assert offline.keys() == in_run.keys()
    for key in offline:
        assert torch.allclose(offline[key], in_run[key], atol=1e-7), key


def test_zero3_exact_resume(runs, tiny_model_dir, data_dir):
    """A new run directory holding only the straight run's step-2 checkpoint (as if that run had been killed
    after writing it) resumes on 2 ranks to exactly the straight run's steps 3-4, weights and EMA teacher."""
    import shutil

    tmp = runs["tmp"]
    interrupted = tmp / "interrupted"
    shutil.copytree(runs["zero3"] / "checkpoints" / "step_00000002", interrupted / "checkpoints" / "step_00000002")
    cfg = _zero3(_config(tiny_model_dir, data_dir, interrupted))
    _launch(cfg, tmp, "--resume", "latest")
    straight, resumed = _losses(runs["zero3"]), _losses(interrupted)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "grad_norm", "loss_k0", "loss_k3"):
            assert resumed[step][key] == straight[step][key], (step, key)
    starts = [r for r in _records(interrupted) if r.get("event") == "start"]
    assert len(starts) == 1 and starts[0]["resumed_from"].endswith("step_00000002")
    a = load_file(runs["zero3"] / "exports/final/pytorch_lora_weights.safetensors")
    b = load_file(interrupted / "exports/final/pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the EMA teacher was restored too (its state files are equal)
    for rank in (0, 1):
        ta = load_file(runs["zero3"] / f"checkpoints/step_00000004/rank{rank:05d}_teacher.safetensors")
        tb = load_file(interrupted / f"checkpoints/step_00000004/rank{rank:05d}_teacher.safetensors")
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_incomplete_checkpoint_is_never_latest(runs, tmp_path):
    import shutil

    root = tmp_path / "checkpoints"
    shutil.copytree(runs["zero3"] / "checkpoints", root)
    assert ckpt.find_latest(root).name == "step_00000004"
    (root / "step_00000004" / ckpt.MARKER).unlink()  # as if a rank died while writing
    assert ckpt.find_latest(root).name == "step_00000002"
    assert ckpt.resolve_resume("latest", root).name == "step_00000002"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve_resume(str(root / "step_00000004"), root)


def test_zero3_lora_export_loads_in_diffusers_and_matches_trainer_samples(runs, tiny_model_dir):
    import numpy as np
    from diffusers import ZImagePipeline
    from PIL import Image

    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(runs["zero3"] / "exports/final"))
    noise = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))  # validation seed 0
    image = pipe("a photo of [V] ball", height=32, width=32, num_inference_steps=4, guidance_scale=0.0,
                 latents=noise).images[0]
    grid = np.asarray(Image.open(runs["zero3"] / "samples/final.png")).astype(int)
    # grid layout: pad 2, [base 32px], gap 6 ... -> tuned block starts at x = 2 + 32 + 2 + 6 - 2
    pad, gap = 2, 6
    x0 = pad + (32 + pad) + gap
    tuned = grid[pad:pad + 32, x0:x0 + 32]
    assert np.abs(tuned - np.asarray(image).astype(int)).max() <= 2


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_sharded_full_finetune_matches_single_process(tiny_model_dir, data_dir, tmp_path, stage):
    over = {"train": {"mode": "full", "lr": 1e-4, "steps": 2}, "checkpoint": {"every": 0}}
    single = tmp_path / "single"
    Trainer(from_dict(_config(tiny_model_dir, data_dir, single, **over))).fit()
    sharded = tmp_path / stage
    _launch(_zero3(_config(tiny_model_dir, data_dir, sharded, **over), stage), tmp_path)
    a, b = _losses(single), _losses(sharded)
    for step in (1, 2):
        assert _close(a[step]["loss"], b[step]["loss"], 1e-4) and _close(a[step]["grad_norm"], b[step]["grad_norm"], 1e-3)
    wa = load_file(single / "exports/final/transformer/diffusion_pytorch_model.safetensors")
    wb = load_file(sharded / "exports/final/transformer/diffusion_pytorch_model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-6, rtol=1e-4), key


def test_zero3_with_the_reference_teacher_matches_single_process(tiny_model_dir, data_dir, tmp_path):
    """The reference route's teacher is one omni forward of the sharded DiT per roll-out step, on every rank."""
    overrides = {"model": {"teacher_context": "reference"}, "train": {"steps": 2}, "checkpoint": {"every": 0},
                 "validation": {"every": 0, "prompts": []}}
    single = tmp_path / "single"
    Trainer(from_dict(_config(tiny_model_dir, data_dir, single, **overrides))).fit()
    zero3 = tmp_path / "zero3"
    _launch(_zero3(_config(tiny_model_dir, data_dir, zero3, **overrides)), tmp_path)
    a, b = _losses(single), _losses(zero3)
    assert sorted(a) == sorted(b) == [1, 2]
    for step in a:
        assert _close(a[step]["loss"], b[step]["loss"], 1e-4), step


def test_sigterm_to_the_deepspeed_command_stops_the_ranks_with_a_checkpoint(tiny_model_dir, data_dir, tmp_path):
    """SIGTERM kills DeepSpeed's runner alone; its launcher and the ranks would train on unsupervised. The
    ranks notice that the runner is gone, finish the step and stop with a complete checkpoint."""
    import signal
    import time

    import psutil

    steps = 200
    run = tmp_path / "run"
    cfg = _zero3(_config(tiny_model_dir, data_dir, run, train={"steps": steps}, checkpoint={"every": 0},
                         validation={"prompts": []}))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([str(DEEPSPEED), "--num_accelerators", "2", "--master_port", str(_port()), "--module",
                             "dopsd.train", "--config", str(path)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not ((run / "log.jsonl").exists() and _losses(run)):
        time.sleep(0.1)
    assert _losses(run), "the run never logged a step"
    tree = psutil.Process(proc.pid).children(recursive=True)  # the launcher and the two ranks
    assert len(tree) >= 3, tree
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) != 0  # the runner dies at once (143)
    gone, alive = psutil.wait_procs(tree, timeout=300)
    for p in alive:
        p.kill()
    assert not alive, "ranks kept running after the deepspeed command was terminated"
    latest = ckpt.find_latest(run / "checkpoints")
    stopped_at = max(_losses(run))
    assert latest is not None and latest.name == f"step_{stopped_at:08d}" and stopped_at < steps
    assert ckpt.damaged_files(latest) == []
    assert "the deepspeed runner exited" in (run / "train.log").read_text()


def test_zero3_merges_a_previous_lora_into_the_sharded_base(runs, tiny_model_dir, data_dir):
    """Continual tuning under ZeRO-3: the previous run's LoRA is added into each weight while it is gathered,
    rank 0's values kept on every shard; the run computes what one process computes from the merged base."""
    lora = runs["zero3"] / "exports" / "final"
    over = {"model": {"merge_loras": [str(lora)]}, "train": {"steps": 2}, "checkpoint": {"every": 0},
            "validation": {"every": 0, "prompts": []}}
    single = runs["tmp"] / "merged-single"
    Trainer(from_dict(_config(tiny_model_dir, data_dir, single, **over))).fit()
    zero3 = runs["tmp"] / "merged-zero3"
    _launch(_zero3(_config(tiny_model_dir, data_dir, zero3, **over)), runs["tmp"])
    a, b = _losses(single), _losses(zero3)
    plain = _losses(runs["zero3"])
    assert sorted(a) == sorted(b) == [1, 2]
    for step in (1, 2):
        assert _close(a[step]["loss"], b[step]["loss"], 1e-4), step
        assert _close(a[step]["grad_norm"], b[step]["grad_norm"], 1e-3), step
    assert not _close(a[1]["loss"], plain[1]["loss"], 1e-3)  # the merge changed the model the run starts from
