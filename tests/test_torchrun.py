"""The plain torch engine under `torchrun --nproc_per_node 2` (gloo) is data-parallel: 2 ranks x batch 1 train
what 1 process x batch 2 trains (gradients averaged), resume exactly, write one copy of the engine state, and
export the same LoRA."""
from __future__ import annotations

import json
import os
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
from test_deepspeed import _port  # a free local port

TORCHRUN = Path(sys.executable).parent / "torchrun"


def _config(model_dir, data_dir, out_dir, **train) -> dict:
    return {
        "model": {"path": str(model_dir), "teacher_min_pixels": 1024, "teacher_max_pixels": 4096},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"steps": 4, "batch_size": 2, "lr": 1e-3, "rollout_steps": 4, "ema_decay": 0.9, **train},
        "data": {"path": str(data_dir), "resolution": [32, 32]},
        "validation": {"prompts": []},
        "output": {"dir": str(out_dir), "progress_bar": False},
        "checkpoint": {"every": 2, "keep": 5},
    }


def _torchrun(cfg: dict, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    path = tmp / f"cfg_{abs(hash(json.dumps(cfg, sort_keys=True)))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(_port()), "-m", "dopsd.train",
           "--config", str(path), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r


def _losses(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    from dopsd.data.synthetic import write_concept_folder

    tmp = tmp_path_factory.mktemp("torchrun")
    data = write_concept_folder(tmp / "data", count=4, size=32, seed=3)
    Trainer(from_dict(_config(tiny_model_dir, data, tmp / "single"))).fit()
    _torchrun(_config(tiny_model_dir, data, tmp / "ddp", batch_size=1), tmp)
    return {"tmp": tmp, "data": data, "single": tmp / "single", "ddp": tmp / "ddp", "model": tiny_model_dir}


def test_two_ranks_train_what_one_process_trains(runs):
    single, ddp = _losses(runs["single"]), _losses(runs["ddp"])
    assert sorted(single) == sorted(ddp) == [1, 2, 3, 4]
    for step in single:  # unsynchronised copies would agree at step 1 only (the logged loss is a mean)
        assert abs(single[step]["loss"] - ddp[step]["loss"]) <= 1e-4 * single[step]["loss"], step
        assert abs(single[step]["grad_norm"] - ddp[step]["grad_norm"]) <= 1e-3 * single[step]["grad_norm"], step
    a = load_file(runs["single"] / "exports/final/pytorch_lora_weights.safetensors")
    b = load_file(runs["ddp"] / "exports/final/pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-3), key
    assert any(v.abs().max() > 0 for k, v in b.items() if "lora_B" in k)
    # one copy of the (identical) engine state; a teacher and RNG state per rank
    step = runs["ddp"] / "checkpoints/step_00000004"
    assert sorted(p.name for p in (step / "engine").iterdir()) == ["optimizer.pt", "scheduler.pt",
                                                                 "trainable.safetensors"]
    assert {p.name for p in step.glob("rank*")} == {"rank00000_state.pt", "rank00001_state.pt",
                                                     "rank00000_teacher.safetensors", "rank00001_teacher.safetensors"}


def test_two_rank_resume_is_exact(runs):
    tmp = runs["tmp"]
    cfg = _config(runs["model"], runs["data"], tmp / "resumed", batch_size=1, steps=2)
    _torchrun(cfg, tmp)
    cfg["train"]["steps"] = 4
    _torchrun(cfg, tmp, "--resume", "latest")
    straight, resumed = _losses(runs["ddp"]), _losses(tmp / "resumed")
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in resumed:
        for key in ("loss", "grad_norm", "loss_k0", "loss_k3"):
            assert resumed[step][key] == straight[step][key], (step, key)
    a = load_file(runs["ddp"] / "exports/final/pytorch_lora_weights.safetensors")
    b = load_file(tmp / "resumed/exports/final/pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_world_size_names_both(runs, tmp_path):
    import shutil

    run = tmp_path / "one"
    shutil.copytree(runs["ddp"], run)
    cfg = from_dict(_config(runs["model"], runs["data"], run, batch_size=1),
                    ["checkpoint.resume=latest", "train.steps=6"])
    with pytest.raises(ckpt.CheckpointError, match=r"written by 2 ranks x batch 1 .* this run has 1 ranks x batch 1"):
        Trainer(cfg)


def test_offline_export_of_a_two_rank_checkpoint(runs, tmp_path):
    from dopsd.export import export_checkpoint

    path = export_checkpoint(runs["ddp"] / "checkpoints/step_00000004", tmp_path / "out")
    offline = load_file(path)
    in_run = load_file(runs["ddp"] / "exports/final/pytorch_lora_weights.safetensors")
    assert offline.keys() == in_run.keys() and all(torch.equal(offline[k], in_run[k]) for k in offline)
