"""`dopsd train --check`: what a run checks before it loads a model weight, in one process, in seconds.

In the order a run makes them: the config (already parsed and validated when this runs), model.path and the
parts a load will read (directories only; no weight file is opened), the trackers, the DeepSpeed config, the data
(`build_data`: folders and manifests decoded in full, shard indexes read) and the checkpoint to resume. Each
problem is collected with its message, so one pass lists all of them. A normal start makes the same checks (the
trainer calls the same functions, and logs `data_summary` of the data it found) and stops at the first problem.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .config import Config, ConfigError
from .data import DataError, build_data, cached_everywhere


def needs_live_teacher(cfg: Config) -> bool:
    """The run will build teacher features with the encoders (not from cached shard features)."""
    from .objectives import OBJECTIVES

    return OBJECTIVES[cfg.train.objective].needs_teacher and not cached_everywhere(cfg)


def per_step_batch(cfg: Config) -> Config:
    """The config the data source sees: train.batch_size x train.grad_accum samples per rank and step."""
    if cfg.train.grad_accum == 1:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                              batch_size=cfg.train.batch_size * cfg.train.grad_accum))


def check_run(cfg: Config, ranks: int = 1) -> tuple[dict, list[str]]:
    """(what was found, problems). `ranks`: the world size the run will have (steps per epoch and the
    checkpoint to resume depend on it)."""
    from .checkpoint import CheckpointError, plan_resume
    from .metrics import check_trackers
    from .models import check_model_paths

    found: dict = {"ranks": ranks}
    problems: list[str] = []

    def attempt(what, *errors):
        try:
            return what()
        except errors as e:
            problems.append(str(e))
            return None

    model_dir = Path(cfg.model.path)
    if not model_dir.exists() and cfg.model.make_tiny_if_missing:
        found["model"] = f"{model_dir} (missing: the run builds the tiny {cfg.model.backend} model there)"
    elif attempt(lambda: check_model_paths(cfg.model, teacher_encoder=needs_live_teacher(cfg)) or True,
                 FileNotFoundError, ConfigError):
        found["model"] = str(model_dir)
    attempt(lambda: check_trackers(cfg.output), ConfigError)
    if cfg.engine.type == "deepspeed":
        from .engine_deepspeed import build_ds_config

        attempt(lambda: build_ds_config(cfg), ValueError, FileNotFoundError)
    data = attempt(lambda: build_data(per_step_batch(cfg), 0, ranks).describe(), DataError, FileNotFoundError, ConfigError)
    if data is not None:
        found["data"] = data
    if cfg.checkpoint.resume:
        plan = attempt(lambda: plan_resume(cfg, Path(cfg.output.dir) / "checkpoints", 0, ranks), CheckpointError)
        found["resume"] = str(plan["path"]) if plan else "nothing to resume: a fresh start"
    return found, problems


def data_summary(d: dict) -> str:
    """A few lines on the data: totals, the bucket histogram, each dataset, the bad files."""
    def buckets(b: dict) -> str:
        return ", ".join(f"{k}: {n}" for k, n in sorted(b.items(), key=lambda kv: -kv[1])) or "-"

    lines = [f"{d['samples']} usable samples, {d['steps_per_epoch']} steps per epoch; skipped: "
             f"{d['skipped'] or 'none'}; sizes {buckets(d['buckets'])}"]
    if len(d["datasets"]) > 1 or "repeats" in d["datasets"][0]:
        for i, ds in enumerate(d["datasets"]):
            share = f", repeats {ds['repeats']}" if not ds.get("weight") else f", weight {ds['weight']}"
            lines.append(f"  [{i}] {ds['type']} {ds['path']}: {ds['samples']} samples{share}, serves "
                         f"{ds.get('steps_in_epoch', ds['steps_per_epoch'])} steps per epoch; skipped "
                         f"{ds['skipped'] or 'none'}; sizes {buckets(ds['buckets'])}")
    shown = d["bad_files"][:20]
    lines += [f"  bad: {f['path']} ({f['kind']}): {f['why']}" for f in shown]
    if len(d["bad_files"]) > len(shown):
        lines.append(f"  ... and {len(d['bad_files']) - len(shown)} more bad files")
    return "\n".join(lines)


def report(found: dict, problems: list[str]) -> str:
    lines = [f"model: {found['model']}"] if "model" in found else []
    if "data" in found:
        lines.append("data: " + data_summary(found["data"]))
    if "resume" in found:
        lines.append(f"resume: {found['resume']}")
    lines += [f"problem: {p}" for p in problems]
    lines.append(f"check: {'OK' if not problems else f'{len(problems)} problem(s)'} (for {found['ranks']} rank(s); "
                 "no model weight was loaded)")
    return "\n".join(lines)
