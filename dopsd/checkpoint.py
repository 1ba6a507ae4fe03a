"""Resumable checkpoints: `<output.dir>/checkpoints/step_XXXXXXXX/`.

A checkpoint holds the engine state (weights being trained + optimizer; DeepSpeed's sharded files under
ZeRO), per rank the teacher/EMA state, the RNG states (torch, CUDA, numpy, python) and the trainer state
(step, data position, counters). It is complete only when the `COMPLETE` marker exists, written by rank 0
after every rank finished writing; `latest` only ever names a complete checkpoint, and resuming from
`latest` picks the newest complete one even if the pointer file is stale or missing.

The marker also lists every file of the checkpoint with its size and CRC-32 (computed by all ranks, each a
share of the files, once they have written). A resume checks them first: a truncated or overwritten file in
the newest complete checkpoint makes `latest` fall back to the previous one with a warning, and an explicit
checkpoint with a damaged file is refused, before anything is loaded. Checkpoints written before the list
existed are trusted as they are.
"""
from __future__ import annotations

import json
import logging
import os
import zlib
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
LATEST = "latest"
PREFIX = "step_"


def checkpoint_path(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def find_latest(root: Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


class CheckpointError(ValueError):
    """A checkpoint cannot be resumed from (damaged, or written by another world size / batch / run length)."""


def resolve_resume(resume: str, root: Path) -> Path | None:
    """'' -> None; 'latest' -> newest complete checkpoint or None (fresh start); a path -> that checkpoint,
    which must be complete."""
    if not resume:
        return None
    if resume == LATEST:
        return find_latest(root)
    path = Path(resume)
    if not is_complete(path):
        raise FileNotFoundError(f"checkpoint.resume: {path} is not a complete checkpoint (no {MARKER} marker)")
    return path


def resume_candidates(resume: str, root: Path) -> list[Path]:
    """The checkpoints a resume may use, preferred first: for 'latest' every complete one, newest first (a
    damaged one falls back to the one before it); for a path that checkpoint alone; none for ''."""
    if not resume:
        return []
    if resume == LATEST:
        return complete_checkpoints(root)[::-1]
    return [resolve_resume(resume, root)]


# --- file list with sizes and checksums, in the COMPLETE marker ---

def _files(path: Path) -> list[str]:
    return sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file() and f.name != MARKER)


def _crc32(file: Path) -> str:
    crc = 0
    with file.open("rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def describe_files(path: Path, rank: int = 0, world: int = 1) -> dict[str, list]:
    """{relative file: [size, crc32]} for this rank's share of the checkpoint's files (every world-th one)."""
    return {name: [(path / name).stat().st_size, _crc32(path / name)]
            for i, name in enumerate(_files(path)) if i % world == rank}


def damaged_files(path: Path, rank: int = 0, world: int = 1) -> list[str]:
    """What is wrong with this rank's share of the files the marker lists (missing, other size, other
    checksum); [] when all match or when the marker predates file lists."""
    try:
        listed = json.loads((path / MARKER).read_text()).get("files")
    except (OSError, ValueError) as e:
        return [f"{MARKER}: unreadable ({e})"]
    if not isinstance(listed, dict):
        return []
    problems = []
    for i, (name, (size, crc)) in enumerate(sorted(listed.items())):
        if i % world != rank:
            continue
        file = path / name
        if not file.is_file():
            problems.append(f"{name}: missing")
        elif file.stat().st_size != size:
            problems.append(f"{name}: {file.stat().st_size} bytes, {size} when written")
        elif _crc32(file) != crc:
            problems.append(f"{name}: checksum differs from when it was written")
    return problems


def plan_resume(cfg, root: Path, rank: int = 0, world: int = 1) -> dict | None:
    """{"path", "state"} of the checkpoint to resume from (`checkpoint.resume`), checked against this run
    before any weight is loaded; None for a fresh start. Collective: every rank takes the same decision.

    Every rank checks a share of the files the COMPLETE marker lists; a damaged newest checkpoint falls back
    to the one before it under `latest` (with a warning) and is refused when named explicitly. Then the saved
    run state must fit: same world size and batch (the data position and every sample's noise depend on
    them) and a step not past train.steps."""
    from .dist import all_gather_object, broadcast_object

    resume, main = cfg.checkpoint.resume, rank == 0
    try:
        candidates = broadcast_object(resume_candidates(resume, root) if main else None)
    except FileNotFoundError as e:  # an explicit path that is not a complete checkpoint: on rank 0 only
        raise CheckpointError(str(e)) from None
    for path in candidates:
        problems = [p for share in all_gather_object(damaged_files(path, rank, world)) for p in share]
        if not problems:
            try:  # rank 0's state says how the checkpoint was written; read it now, it is small
                verdict = load_rank_state(path, 0)[0] if main else None
            except CheckpointError as e:
                verdict = str(e)
            verdict = broadcast_object(verdict)
            if isinstance(verdict, dict):
                _check_fits(cfg, path, verdict, world, root)
                return {"path": path, "state": verdict}
            problems = [verdict]
        detail = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        if resume != LATEST:
            raise CheckpointError(f"checkpoint.resume: {path} is damaged: {detail}")
        if main:
            log.warning("checkpoint %s is damaged (%s); falling back to the previous complete checkpoint", path,
                        detail)
    if resume and main:
        log.info("checkpoint.resume=%s: no usable complete checkpoint yet, starting fresh", resume)
    return None


def _check_fits(cfg, path: Path, state: dict, world: int, root: Path) -> None:
    t = cfg.train
    saved = (state["world_size"], state["batch_size"])
    if saved != (world, t.batch_size):
        raise CheckpointError(
            f"{path} was written by {saved[0]} ranks x batch {saved[1]} (global batch {saved[0] * saved[1]}); "
            f"this run has {world} ranks x batch {t.batch_size}. Resuming needs the same world size and "
            f"train.batch_size (the data position and every sample's noise depend on them): relaunch with "
            f"{saved[0]} ranks and --set train.batch_size={saved[1]}, or start a new output.dir")
    if state["step"] > t.steps:
        raise CheckpointError(
            f"{path} is at step {state['step']}, past train.steps={t.steps}: nothing to train, and its weights "
            f"are not those of step {t.steps}. Raise train.steps, or resume from an earlier checkpoint "
            f"(--resume {root}/step_XXXXXXXX)")


def mark_complete(path: Path, root: Path, info: dict, keep: int, files: dict | None = None) -> None:
    """Rank 0, after a barrier that follows every rank's writes; `files` from describe_files (all shares)."""
    marker = {**info, "time": time.time()}
    if files is not None:
        marker["files"] = files
    (path / MARKER).write_text(json.dumps(marker))
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(path.name + "\n")
    os.replace(tmp, root / LATEST)  # atomic: the pointer is old or new, never half-written
    if keep > 0:
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


# --- RNG and trainer state, one file per rank ---

def capture_rng() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": np_state[0], "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached": float(np_state[4]), "array": torch.from_numpy(np_state[1].astype(np.int64))},
        "python": _tuples_to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["key"], n["array"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate(_lists_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples_to_lists(x):
    return [_tuples_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _lists_to_tuples(x):
    return tuple(_lists_to_tuples(v) for v in x) if isinstance(x, list) else x


def save_rank_state(path: Path, rank: int, trainer_state: dict, teacher_state: dict[str, torch.Tensor] | None) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    torch.save({"trainer": trainer_state, "rng": capture_rng()}, path / f"rank{rank:05d}_state.pt")
    if teacher_state is not None:
        save_file({k: v.contiguous() for k, v in teacher_state.items()}, path / f"rank{rank:05d}_teacher.safetensors")


def load_rank_state(path: Path, rank: int) -> tuple[dict, dict, dict[str, torch.Tensor] | None]:
    from safetensors.torch import load_file

    state_file = path / f"rank{rank:05d}_state.pt"
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} is missing: was the checkpoint written with another world size?")
    try:
        state = torch.load(state_file, weights_only=True)
    except Exception as e:  # a damaged zip raises RuntimeError, pickle errors, EOFError ... by version
        raise CheckpointError(f"{state_file} is unreadable ({type(e).__name__}: {e})") from None
    teacher_file = path / f"rank{rank:05d}_teacher.safetensors"
    try:
        teacher = load_file(teacher_file) if teacher_file.is_file() else None
    except Exception as e:  # safetensors raises SafetensorError on bad headers
        raise CheckpointError(f"{teacher_file} is unreadable ({type(e).__name__}: {e})") from None
    return state["trainer"], state["rng"], teacher
