"""Mistakes a user makes end in one `dopsd: error: ...` line and exit 2, not a traceback, and they are found
before any model weight is read: every case below runs on a model whose DiT weights are garbage, so reaching
the weights would fail differently."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from dopsd import checkpoint as ckpt
from dopsd.cli import main


@pytest.fixture(scope="module")
def broken_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with its transformer weights overwritten: loading them raises."""
    model = tmp_path_factory.mktemp("broken") / "model"
    shutil.copytree(tiny_model_dir, model)
    for f in (model / "transformer").glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    return model


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A real 2-step run with a checkpoint after each step (on the intact model)."""
    from conftest import _tiny_config
    from dopsd.data.synthetic import write_concept_folder
    from dopsd.trainer import Trainer

    tmp = tmp_path_factory.mktemp("finished")
    data = write_concept_folder(tmp / "data", count=3, size=32, seed=1)
    cfg = _tiny_config(tiny_model_dir, data, tmp / "run", "train.steps=2", "checkpoint.every=1",
                       "validation.prompts=[]")
    Trainer(cfg).fit()
    return {"run": tmp / "run", "data": data}


def _train(tmp_path, model, data, *overrides: str, data_type: str = "folder"):
    cfg = {"model": {"path": str(model)}, "lora": {"rank": 4, "alpha": 8},
           "train": {"steps": 2, "batch_size": 2, "rollout_steps": 2},
           "data": {"path": str(data), "type": data_type, "resolution": [32, 32]},
           "output": {"dir": str(tmp_path / "out"), "progress_bar": False, "tensorboard": False}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    args = ["train", "--config", str(path)]
    for o in overrides:
        args += ["--set", o]
    return main(args)


def _one_error_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dopsd: error:")]
    assert len(lines) == 1, err[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


def test_empty_data_folder(tmp_path, broken_model, capsys):
    (tmp_path / "empty").mkdir()
    assert _train(tmp_path, broken_model, tmp_path / "empty") == 2
    _one_error_line(capsys, "data.path")


def test_folder_where_every_file_is_bad(tmp_path, broken_model, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"not an image")
        (bad / f"{i}.txt").write_text("a photo of [V]")
    assert _train(tmp_path, broken_model, bad) == 2
    _one_error_line(capsys, "data.path")


def test_shard_pattern_that_matches_nothing(tmp_path, broken_model, capsys):
    assert _train(tmp_path, broken_model, tmp_path / "nowhere/shard-{000000..000003}.tar", data_type="webdataset") == 2
    _one_error_line(capsys, "data.path")


def test_missing_teacher_encoder(tmp_path, broken_model, finished_run, capsys):
    assert _train(tmp_path, broken_model, finished_run["data"], "model.teacher_encoder_path=/nonexistent/vlm") == 2
    _one_error_line(capsys, "model.teacher_encoder_path", "/nonexistent/vlm")


def test_missing_model_part(tmp_path, finished_run, capsys):
    assert _train(tmp_path, tmp_path / "no-model-here", finished_run["data"]) == 2
    _one_error_line(capsys, "model.path")


def test_batch_size_changed_on_resume(tmp_path, broken_model, finished_run, capsys):
    run = tmp_path / "out"
    shutil.copytree(finished_run["run"], run)
    assert _train(tmp_path, broken_model, finished_run["data"], "train.batch_size=1", "checkpoint.resume=latest") == 2
    _one_error_line(capsys, "batch 2", "batch 1", "train.batch_size")


def test_corrupt_checkpoint_named_explicitly(tmp_path, broken_model, finished_run, capsys):
    run = tmp_path / "out"
    shutil.copytree(finished_run["run"], run)
    target = run / "checkpoints/step_00000002"
    (target / "engine/trainable.safetensors").write_bytes(b"garbage")
    assert _train(tmp_path, broken_model, finished_run["data"], f"checkpoint.resume={target}") == 2
    _one_error_line(capsys, "step_00000002 is damaged", "trainable.safetensors")


def test_every_checkpoint_damaged_under_latest_starts_over_with_warnings(tmp_path, finished_run):
    """`latest` with no usable checkpoint left is a fresh start (as with none at all), announced per checkpoint."""
    run = tmp_path / "out"
    shutil.copytree(finished_run["run"], run)
    for marker in (run / "checkpoints").glob("step_*/" + ckpt.MARKER):
        (marker.parent / "rank00000_state.pt").write_bytes(b"x")
        assert json.loads(marker.read_text())["files"]
    from conftest import _tiny_config
    from dopsd.trainer import Trainer

    model = yaml.safe_load((finished_run["run"] / "config.yaml").read_text())["model"]["path"]
    cfg = _tiny_config(model, finished_run["data"], run, "train.steps=2", "checkpoint.resume=latest", "validation.prompts=[]")
    assert Trainer(cfg)._resume_from is None
