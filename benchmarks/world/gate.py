"""The curved world's toy turbo gate (issue 22): is the flow curved enough that step distillation matters,
and did the distillation work? Stated here, with its bars, before any curved build ran.

On the curved world's held-out prompts (`CurvedToyBaseSettings.eval_prompts` prompts from seed 20_000, each
sampled with `eval_seeds` noise seeds, scored by `curved.OpenScorer` against real samples of the same prompts),
with M = `teacher_steps` (32) the pre-distillation model's many-step budget:

1. **clearly worse before distillation**: the model before step distillation at 4 Euler steps has a Fréchet
   distance at least 1.5x the turbo's at 4 steps, *or* a sharpness ratio at least 0.2 lower;
2. **the turbo keeps the many-step model's quality** at 4 steps, against the pre-distillation model at M
   steps: stated-attribute accuracy at most 0.03 lower, Fréchet distance at most 1.25x, diversity ratio at
   most 0.1 lower, sharpness ratio within 0.15.

The gate passes when 1 and every part of 2 hold. `curved_gate` also reports part 1's **ceiling**: part 1 with
the turbo replaced by the pre-distillation model at M steps (`base_4_steps` vs `base_many_steps`), i.e. what
a turbo that exactly matches its teacher would reach. It is a diagnostic of the world, not part of the gate:
below the bar, only a turbo *better* than its own teacher could pass, so the world's flow is not curved
enough and the world, not the distillation, has to change (build 1: ceiling 1.47x and 0.145, bars 1.5x and
0.2). `dopsd-world probe` reads the same two numbers after a short pretraining, to compare worlds cheaply.

If it fails, the world or the distillation changes (and what
was tried is recorded), never the comparison that runs on the turbo. `curved_gate` evaluates it from a
report's scores; `gate_from_build` (`dopsd-world gate --out DIR`) writes it into a build's report.json, from
the scores there or, with an evaluator, recomputed from the build's weights (the turbo and
`pre_distillation.safetensors`), optionally on a smaller prompt set.
"""
from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

from .curved import OpenScorer, prompt_set

EVAL_SEED = 20_000  # the prompt seed of every curved build report (no stage trains on it)

CURVED_GATE = {
    "base_fd_over_turbo_min": 1.5,          # 1: Fréchet(pre-distillation, 4) / Fréchet(turbo, 4) at least this ...
    "base_sharpness_below_turbo_min": 0.2,  # 1: ... or its sharpness ratio at least this much lower
    "acc_below_many_max": 0.03,             # 2: turbo at 4 vs pre-distillation at M steps
    "fd_over_many_max": 1.25,
    "diversity_below_many_max": 0.1,
    "sharpness_gap_max": 0.15,
}


def curved_scorer(evaluator, s) -> OpenScorer:
    """The scorer of a curved build's report (settings `s`: a `CurvedToyBaseSettings`)."""
    from .toybase import _extra

    return OpenScorer(evaluator, prompt_set(s.eval_prompts, EVAL_SEED, extra=_extra(s)), per_prompt=s.eval_seeds)


def curved_scores(backend, evaluator, s, scorer: OpenScorer | None = None):
    """A function num_steps -> rounded `OpenScorer` scores of `backend`'s transformer at that many Euler steps
    (the transformer as it is when called: the build calls it before and after distillation)."""
    from dopsd.sampling import sample_batch as sample

    scorer = scorer or curved_scorer(evaluator, s)

    def score(num_steps: int, transformer=None) -> dict:
        out = sample(backend, transformer if transformer is not None else backend.transformer, scorer.texts(),
                     scorer.seeds(), num_steps, s.size)
        return {k: round(float(v), 4) for k, v in scorer.score(out).items()}
    return score


def curved_gate(report: dict, bar: dict = CURVED_GATE) -> dict:
    """The gate (module docstring) from a report's `base_many_steps`, `base_4_steps` and `turbo_4_steps`."""
    many, base, turbo = report["base_many_steps"], report["base_4_steps"], report["turbo_4_steps"]
    fd_ratio = base["fd"] / turbo["fd"]
    sharp_drop = turbo["sharpness_ratio"] - base["sharpness_ratio"]
    checks = {
        "base_4_clearly_worse": bool(fd_ratio >= bar["base_fd_over_turbo_min"]
                                     or sharp_drop >= bar["base_sharpness_below_turbo_min"]),
        "turbo_4_acc_close": bool(turbo["acc_mean"] >= many["acc_mean"] - bar["acc_below_many_max"]),
        "turbo_4_fd_close": bool(turbo["fd"] <= bar["fd_over_many_max"] * many["fd"]),
        "turbo_4_diversity_close": bool(turbo["diversity_ratio"] >= many["diversity_ratio"]
                                        - bar["diversity_below_many_max"]),
        "turbo_4_sharpness_close": bool(abs(turbo["sharpness_ratio"] - many["sharpness_ratio"])
                                        <= bar["sharpness_gap_max"]),
    }
    return {"passed": all(checks.values()), "checks": checks, "bar": dict(bar),
            "base_fd_over_turbo": round(fd_ratio, 4), "base_sharpness_below_turbo": round(sharp_drop, 4),
            "turbo_fd_over_many": round(turbo["fd"] / many["fd"], 4), "ceiling": gate_ceiling(base, many, bar)}


def gate_ceiling(four: dict, many: dict, bar: dict = CURVED_GATE) -> dict:
    """Part 1 of the gate for a turbo equal to the pre-distillation model at its many-step budget (`many`):
    how much worse 4 Euler steps (`four`) are than the model's own many-step samples (module docstring)."""
    fd_ratio, sharp_drop = four["fd"] / many["fd"], many["sharpness_ratio"] - four["sharpness_ratio"]
    return {"base_fd_over_many": round(fd_ratio, 4), "base_sharpness_below_many": round(sharp_drop, 4),
            "reachable": bool(fd_ratio >= bar["base_fd_over_turbo_min"]
                              or sharp_drop >= bar["base_sharpness_below_turbo_min"])}


def gate_from_build(out_dir: str | Path, evaluator=None, pre_distillation: str | Path | None = None,
                    eval_prompts: int | None = None, eval_seeds: int | None = None) -> dict:
    """Evaluate the gate of a curved build in `out_dir` and write it into its report.json (key "gate").

    Without `evaluator`: from the scores the build wrote. With one: recomputed from the build's weights (the
    turbo in `out_dir`, the model before distillation from `pre_distillation`, default the build's
    `pre_distillation.safetensors`, or a `--work` cache's incontext-*.safetensors), on `eval_prompts` x
    `eval_seeds` samples (default the build's)."""
    from .toybase import PRE_DISTILLATION, curved_build_settings

    out = Path(out_dir)
    report = json.loads((out / "report.json").read_text())
    s = curved_build_settings(report, out)
    s = replace(s, eval_prompts=eval_prompts or s.eval_prompts, eval_seeds=eval_seeds or s.eval_seeds)
    scores = {k: report[k] for k in ("base_many_steps", "base_4_steps", "turbo_4_steps") if k in report}
    if evaluator is not None:
        scores = _recompute(out, Path(pre_distillation or out / PRE_DISTILLATION), evaluator, s)
    elif len(scores) < 3:
        raise ValueError(f"{out}/report.json has no scores (built without --evaluator): pass an evaluator")
    gate = {**curved_gate(scores), "recomputed": evaluator is not None,
            "samples": f"{s.eval_prompts} prompts x {s.eval_seeds} seeds"}
    if evaluator is not None:
        gate["scores"] = scores
    report["gate"] = gate
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return gate


def _recompute(out: Path, pre_distillation: Path, evaluator, s) -> dict:
    import torch
    from safetensors.torch import load_file

    from dopsd.config import ModelConfig
    from dopsd.models import load_backend

    from .toybase import module_state

    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)  # the build's thread count: its float summation order
    try:
        backend = load_backend(ModelConfig(backend="zimage", path=str(out), teacher_min_pixels=s.teacher_pixels,
                                           teacher_max_pixels=s.teacher_pixels))
        before = copy.deepcopy(backend.transformer)
        # strict: weights of another build's settings fail here, not silently
        before.load_state_dict(module_state(load_file(str(pre_distillation)), "transformer"), strict=True)
        score = curved_scores(backend, evaluator, s)
        return {"base_many_steps": score(s.teacher_steps, before), "base_4_steps": score(s.turbo_steps, before),
                "turbo_4_steps": score(s.turbo_steps)}
    finally:
        torch.set_num_threads(threads)


__all__ = ["CURVED_GATE", "curved_gate", "gate_ceiling", "curved_scorer", "curved_scores", "gate_from_build"]
