"""Learning-rate schedules, warmup and gradient accumulation on the tiny Z-Image (CPU)."""
from __future__ import annotations

import json

import pytest
import torch

from dopsd.config import ConfigError, TrainConfig


def _log(run_dir):
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("schedule,diffusers_name", [("constant", "constant_with_warmup"), ("cosine", "cosine"),
                                                     ("linear", "linear")])
def test_lr_at_every_step_equals_diffusers(schedule, diffusers_name):
    from diffusers.optimization import get_scheduler

    from dopsd.engine import TorchEngine

    t = TrainConfig(lr=3e-4, steps=12, warmup_steps=3, lr_schedule=schedule)
    engine = TorchEngine(torch.nn.Linear(3, 2), t)
    ref_opt = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=3e-4)
    ref = get_scheduler(diffusers_name, ref_opt, num_warmup_steps=3, num_training_steps=12)
    seen, expected = [], []
    for step in range(12):
        seen.append(engine.lr)
        expected.append(ref_opt.param_groups[0]["lr"])
        engine.module(torch.randn(4, 3)).square().mean().backward()
        if step == 5:
            engine.zero_grad()
            engine.skip_step()  # a step with nothing to apply still advances the schedule
        else:
            engine.step()
        ref_opt.step()
        ref.step()
    assert seen == pytest.approx(expected, rel=1e-12, abs=0)
    assert seen[0] == 0.0 and seen[3] == pytest.approx(3e-4)  # warmup from 0 to the peak
    if schedule != "constant":
        assert seen[-1] < seen[4]


def test_bad_schedule_keys_name_the_key(make_config):
    with pytest.raises(ConfigError, match="train.lr_schedule"):
        make_config("train.lr_schedule=exponential")
    with pytest.raises(ConfigError, match="train.grad_accum"):
        make_config("train.grad_accum=0")
    with pytest.raises(ConfigError, match="train.warmup_steps"):
        make_config("train.warmup_steps=-1")


def _lora_state(trainer):
    from dopsd.adapters import student_params

    return {n: p.detach().clone() for n, p in student_params(trainer.module).items()}


@pytest.mark.parametrize("objective", ["dopsd", "sft"])
def test_grad_accum_equals_the_larger_batch(make_config, tmp_path, objective):
    """grad_accum 2 x batch 1 takes the same samples, noise, losses and updates as batch 2."""
    from dopsd.trainer import Trainer

    runs = {}
    for name, overrides in {"batch2": ["train.batch_size=2"],
                            "accum2": ["train.batch_size=1", "train.grad_accum=2"]}.items():
        trainer = Trainer(make_config(f"train.objective={objective}", "train.steps=2", "validation.prompts=[]",
                                      "train.warmup_steps=1", "train.lr_schedule=linear", *overrides,
                                      out_dir=tmp_path / name))
        trainer.fit()
        runs[name] = (_log(tmp_path / name), _lora_state(trainer))
    (log_a, state_a), (log_b, state_b) = runs["batch2"], runs["accum2"]
    for a, b in zip(log_a, log_b, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-9)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["lr"] == a["lr"]
    assert log_a[0]["lr"] == 0.0 and log_a[1]["lr"] > 0  # the second step's update is a real one
    moved = max((state_b[n] - state_a[n]).abs().max().item() for n in state_a)
    scale = max(state_a[n].abs().max().item() for n in state_a)
    assert scale > 0 and moved <= 1e-5 * scale


def test_schedule_resumes_where_it_stopped(make_config, tmp_path):
    """Resumed from its step-2 checkpoint, a 4-step run logs steps 3-4 with the rates and losses of the run
    that went on (the schedule's state is in the checkpoint, mid-warmup here)."""
    from dopsd import checkpoint as ckpt
    from dopsd.trainer import Trainer

    common = ["train.steps=4", "train.warmup_steps=3", "train.lr_schedule=cosine", "validation.prompts=[]",
              "train.batch_size=1", "train.grad_accum=2", "checkpoint.every=2", "checkpoint.keep=3"]
    Trainer(make_config(*common, out_dir=tmp_path / "whole")).fit()
    step2 = ckpt.checkpoint_path(tmp_path / "whole" / "checkpoints", 2)
    Trainer(make_config(*common, f"checkpoint.resume={step2}", out_dir=tmp_path / "resumed")).fit()
    whole, resumed = _log(tmp_path / "whole"), _log(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in whole[2:]]
    assert whole[2]["lr"] != whole[3]["lr"]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in whole[2:]], rel=1e-6)
