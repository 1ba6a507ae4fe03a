"""Trackers: TensorBoard and Weights & Biases (offline mode, the real package) get scalars and sample grids."""
from __future__ import annotations

import importlib.util

import pytest

from dopsd.config import ConfigError


def test_wandb_run_gets_scalars_and_sample_grids_and_a_resume_continues_it(make_config, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dopsd.trainer import Trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    common = ["output.wandb=true", "output.wandb_project=dopsd-test", "checkpoint.every=2"]
    Trainer(make_config(*common, "train.steps=2", out_dir=out)).fit()
    run_id = (out / "wandb_id").read_text()
    Trainer(make_config(*common, "train.steps=3", "checkpoint.resume=latest", out_dir=out)).fit()
    assert (out / "wandb_id").read_text() == run_id  # the resumed run continued the same W&B run

    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    logged = b"".join(p.read_bytes() for r in runs for p in r.glob("*.wandb"))
    for key in (b"loss", b"grad_norm", b"lr", b"loss_k0", b"time/student"):
        assert key in logged, key
    images = [p.name for r in runs for p in (r / "files" / "media" / "images").glob("samples_*.png")]
    assert sorted(name.split("_")[1] for name in images) == ["2", "3"], images  # each run's final grid

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    steps = sorted({e.step for e in events.Images("samples")})
    assert steps == [2, 3], steps


def test_wandb_asked_for_but_missing_is_a_config_error(monkeypatch):
    from dopsd.config import OutputConfig
    from dopsd.metrics import check_trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"output.wandb: .*pip install wandb"):
        check_trackers(OutputConfig(wandb=True))
    check_trackers(OutputConfig(wandb=False))  # not asked for: nothing to check
