"""Resuming must never load the wrong state silently: a damaged checkpoint falls back or is refused, a checkpoint
of another batch / world size / a later step is refused before any model weight is loaded, and the run log
never counts a step twice."""
import json
import shutil

import pytest

from dopsd import checkpoint as ckpt
from dopsd.trainer import Trainer

STEPS = 4


def _records(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _losses(run):
    return {r["step"]: r["loss"] for r in _records(run) if "loss" in r}


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    """4 steps, a checkpoint after each; the reference for every resumed run below."""
    from conftest import _tiny_config
    from dopsd.data.synthetic import write_concept_folder

    tmp = tmp_path_factory.mktemp("resume")
    data = write_concept_folder(tmp / "data", count=3, size=32, seed=1)

    def make(out, *overrides):
        return _tiny_config(tiny_model_dir, data, tmp / out, f"train.steps={STEPS}", "checkpoint.every=1",
                            "checkpoint.keep=10", "validation.prompts=[]", *overrides)

    Trainer(make("straight")).fit()
    return {"run": tmp / "straight", "make": make, "tmp": tmp}


def _copy(straight, name):
    dst = straight["tmp"] / name
    shutil.copytree(straight["run"], dst)
    return dst


def _no_model_load(monkeypatch):
    import dopsd.trainer

    def refuse(*a, **k):
        raise AssertionError("model weights were loaded before the checkpoint was checked")

    monkeypatch.setattr(dopsd.trainer, "load_backend", refuse)


def test_checkpoint_marker_lists_every_file_with_its_checksum(straight):
    path = straight["run"] / "checkpoints/step_00000004"
    listed = json.loads((path / ckpt.MARKER).read_text())["files"]
    assert "engine/trainable.safetensors" in listed and "rank00000_state.pt" in listed
    assert ckpt.damaged_files(path) == []


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one_exactly(straight, caplog):
    run = _copy(straight, "damaged")
    optimizer = run / "checkpoints/step_00000004/engine/optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped: only the checksum sees it
    optimizer.write_bytes(bytes(data))
    # the crashed run had logged step 4 before dying; the resumed run redoes it from step 3
    cfg = straight["make"]("damaged", "checkpoint.resume=latest")
    with caplog.at_level("WARNING"):
        summary = Trainer(cfg).fit()
    assert "step_00000004 is damaged" in caplog.text and "optimizer.pt" in caplog.text
    starts = [r for r in _records(run) if r.get("event") == "start"]
    assert starts[-1]["resumed_from"].endswith("step_00000003")
    assert summary["steps_this_run"] == 1
    assert _losses(run) == _losses(straight["run"])  # exact, and step 4 is logged once
    steps = [r["step"] for r in _records(run) if "loss" in r]
    assert steps == [1, 2, 3, 4]


def test_damaged_explicit_checkpoint_is_refused_before_loading_the_model(straight, monkeypatch):
    run = _copy(straight, "explicit")
    target = run / "checkpoints/step_00000002"
    state = target / "rank00000_state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    _no_model_load(monkeypatch)
    with pytest.raises(ckpt.CheckpointError, match="step_00000002 is damaged: rank00000_state.pt: 100 bytes"):
        Trainer(straight["make"]("explicit", f"checkpoint.resume={target}"))


def test_checkpoint_of_another_batch_size_is_refused_before_loading_the_model(straight, monkeypatch):
    _copy(straight, "batch")
    _no_model_load(monkeypatch)
    with pytest.raises(ckpt.CheckpointError, match=r"1 ranks x batch 2 .* this run has 1 ranks x batch 1"):
        Trainer(straight["make"]("batch", "checkpoint.resume=latest", "train.batch_size=1"))


def test_checkpoint_past_train_steps_is_refused(straight, monkeypatch):
    _copy(straight, "short")
    _no_model_load(monkeypatch)
    with pytest.raises(ckpt.CheckpointError, match="at step 4, past train.steps=2"):
        Trainer(straight["make"]("short", "checkpoint.resume=latest", "train.steps=2"))


def test_checkpoint_without_file_list_is_still_resumable(straight):
    """Checkpoints written before the marker listed files are trusted as they are."""
    run = _copy(straight, "old")
    for marker in (run / "checkpoints").glob("step_*/" + ckpt.MARKER):
        marker.write_text(json.dumps({"step": int(marker.parent.name[5:])}))
    (run / "checkpoints/step_00000004").rename(run / "checkpoints/gone")  # resume from 3, redo step 4
    Trainer(straight["make"]("old", "checkpoint.resume=latest")).fit()
    assert _losses(run) == _losses(straight["run"])
