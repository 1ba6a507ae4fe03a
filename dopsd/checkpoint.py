"""Resumable checkpoints: `<output.dir>/checkpoints/step_XXXXXXXX/`.

A checkpoint holds the engine state (weights being trained + optimizer; DeepSpeed's sharded files under
ZeRO), per rank the teacher/EMA state, the RNG states (torch, CUDA, numpy, python) and the trainer state
(step, data position, counters). It is complete only when the `COMPLETE` marker exists, written by rank 0
after every rank finished writing; `latest` only ever names a complete checkpoint, and resuming from
`latest` picks the newest complete one even if the pointer file is stale or missing.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

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


def mark_complete(path: Path, root: Path, info: dict, keep: int) -> None:
    """Rank 0, after a barrier that follows every rank's writes."""
    (path / MARKER).write_text(json.dumps({**info, "time": time.time()}))
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
        raise FileNotFoundError(f"{state_file} is missing: was the checkpoint written with another world size?")
    state = torch.load(state_file, weights_only=True)
    teacher_file = path / f"rank{rank:05d}_teacher.safetensors"
    teacher = load_file(teacher_file) if teacher_file.is_file() else None
    return state["trainer"], state["rng"], teacher
