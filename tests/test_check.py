"""`dopsd train --check`: config, paths, data and resume checked without loading a model weight."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from dopsd.cli import main


@pytest.fixture
def model_with_garbage_weights(tiny_model_dir, tmp_path):
    """The tiny model's layout with every weight file replaced by garbage: loading any of them would fail."""
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    weights = [p for p in out.rglob("*") if p.suffix in (".safetensors", ".bin")]
    assert weights
    for p in weights:
        p.write_bytes(b"not a weight file")
    return out


def _config(tmp_path, model_dir, data_dir, **sections) -> str:
    cfg = {"model": {"path": str(model_dir)}, "data": {"path": str(data_dir), "resolution": [32, 32]},
           "output": {"dir": str(tmp_path / "run")}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_check_lists_bad_files_and_counts_without_loading_weights(model_with_garbage_weights, concept_dir,
                                                                  tmp_path, capsys):
    (concept_dir / "broken.png").write_bytes(b"\x89PNG truncated")
    (concept_dir / "broken.txt").write_text("a broken sample")
    (concept_dir / "nocaption.png").write_bytes((concept_dir / "broken.png").read_bytes())
    shutil.copy(next(concept_dir.glob("*.png")), concept_dir / "orphan.png")  # an image without caption
    code = main(["train", "--config", _config(tmp_path, model_with_garbage_weights, concept_dir), "--check"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "3 usable samples" in out and "32x32: 3" in out
    assert "broken.png (bad_image)" in out and "orphan.png" in out
    assert "check: OK" in out and not (tmp_path / "run").exists()  # nothing written, no weight read


def test_check_collects_every_problem_and_exits_2(tmp_path, capsys, concept_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = _config(tmp_path, tmp_path / "no-model", empty, output={"wandb": False},
                  engine={"type": "deepspeed", "deepspeed_config": str(tmp_path / "missing.json")},
                  checkpoint={"resume": str(tmp_path / "no-such-checkpoint")})
    code = main(["train", "--config", cfg, "--check"])
    out = capsys.readouterr().out
    assert code == 2
    problems = [line for line in out.splitlines() if line.startswith("problem:")]
    assert len(problems) == 4, out
    for what in ("model.path", "engine.deepspeed_config", "data.path", "no-such-checkpoint"):
        assert any(what in p for p in problems), (what, out)


def test_check_accepts_a_good_run_and_its_resume(make_config, tmp_path, capsys):
    from dopsd.config import dump_config
    from dopsd.trainer import Trainer

    cfg = make_config("train.steps=1", "validation.prompts=[]")
    Trainer(cfg).fit()
    path = tmp_path / "again.yaml"
    dump_config(cfg, path)
    assert main(["train", "--config", str(path), "--resume", "latest", "--set", "train.steps=2", "--check"]) == 0
    out = capsys.readouterr().out
    assert "resume: " in out and "step_00000001" in out and "check: OK" in out
    # a checkpoint written by 1 rank does not fit a 2-rank run: --ranks says so before any job starts
    assert main(["train", "--config", str(path), "--resume", "latest", "--set", "train.steps=2", "--check",
                 "--ranks", "2"]) == 2
    assert "problem:" in capsys.readouterr().out


@pytest.mark.parametrize("preset", ["zimage_turbo_lora_24gb.yaml", "zimage_turbo_lora_8gpu.yaml"])
def test_presets_pass_the_check_on_tiny_stand_ins(preset, tiny_model_dir, concept_dir, tmp_path, capsys,
                                                  monkeypatch):
    """Each preset's keys fit together (engine, data, schedule, trackers): with the tiny model and data in place
    of the real paths, `--check` passes for the rank count it is written for."""
    import json

    from dopsd.config import load_config

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # the presets name configs/deepspeed/*.json relative to the repository
    path = repo / "configs" / "presets" / preset
    cfg = load_config(path)
    assert cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing and cfg.lora.rank == 64
    over = ["--set", f"model.path={tiny_model_dir}", "--set", "model.teacher_encoder_path=", "--set",
            "data.resolution=[32,32]",
            "--set", f"output.dir={tmp_path / 'run'}", "--set", "train.device=cpu"]
    if cfg.data.datasets:  # the same list shape, on tiny stand-ins: a folder and a manifest
        manifest = tmp_path / "reg.jsonl"
        manifest.write_text("".join(json.dumps({"image": str(p), "caption": "a photo"}) + "\n"
                                    for p in sorted(concept_dir.glob("*.png"))))
        datasets = [{**vars(cfg.data.datasets[0]), "path": str(concept_dir)},
                    {**vars(cfg.data.datasets[1]), "path": str(manifest)}]
        over += ["--set", f"data.datasets={json.dumps(datasets)}"]
        ranks = 8
    else:
        over += ["--set", "data.type=folder", "--set", f"data.path={concept_dir}"]
        ranks = 1
    assert main(["train", "--config", str(path), *over, "--check", "--ranks", str(ranks)]) == 0
    out = capsys.readouterr().out
    assert "check: OK" in out and f"for {ranks} rank(s)" in out
