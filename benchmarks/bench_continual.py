"""Continual tuning on the miniature world: concept A, then concept B from A's result, SFT vs D-OPSD.

    python benchmarks/bench_continual.py [--out benchmarks/results/world_continual] [--model DIR] [--smoke]

What a user does with two commands (README, "Continual tuning"): tune A; then tune B with A's LoRA merged
into the base (`model.merge_loras: [runs/a/exports/final]`). The question is the paper's title: after B, does
the model still draw A, and the old prompts as the base did, at its few-step budget?

Protocol (written before any result of this script was seen):
- base: --model (default the shipped toy turbo; rerun with the curved world's turbo once it is built);
- concept A: the quickstart's six "[V]" = checkered images (dopsd/assets/quickstart), as bench_world.py;
  concept B: six images of the dotted texture captioned with "[W]" in place of its name (world seed 11), a
  new word for a look the evaluator can read;
- methods: SFT and D-OPSD with the reference-image teacher; only `train.objective` (and the teacher's route,
  which exists only for D-OPSD) differ. Learning rates: each method's choice in bench_world.py's sweep
  (benchmarks/results/world/results.json `chosen_lr`, same data A, same budget), used for A and for B;
- budget: bench_world's Protocol (200 steps, batch 4, LoRA rank 8 / alpha 16) per concept; seeds 1..5 (the
  training seed; data order follows it), the same seed for A and B of one chain;
- scores, by the shipped world evaluator, at the turbo's 4 steps and at 32 steps, on bench_world's *report*
  prompt sets (A's held-out "[V]" prompts, old base-world prompts) plus held-out "[W]" prompts (world seed
  802): A adherence (texture == checkered on "[V]" prompts), B adherence (texture == dotted on "[W]"
  prompts), retention (old prompts: attribute accuracy, Fréchet, sharpness ratio); after A and after B;
- reported: mean ± std per method, and D-OPSD minus SFT per seed (paired) with a 95% t interval; the base
  as the reference row. Nothing is asserted; tests run `--smoke`.

Writes continual.md and continual.json to --out. With --work the runs stay there and every finished score is
kept in WORK/scores.json: the same command rerun (same protocol and learning rates) continues after it.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_world as bw  # noqa: E402
from paired import paired  # noqa: E402

METHODS = ("sft", "dopsd")
CONCEPT_B = {"texture": "dotted", "placeholder": "[W]", "data_seed": 11, "prompt_seed": 802}
SEEDS = (1, 2, 3, 4, 5)
FALLBACK_LR = {"sft": 3e-3, "dopsd": 3e-3}  # bench_world's choices when its results file is absent
SMOKE_SEEDS = (1,)


def chosen_lrs(results: Path) -> dict[str, float]:
    if results.is_file():
        chosen = json.loads(results.read_text())["chosen_lr"]
        return {m: float(chosen[m]) for m in METHODS}
    return dict(FALLBACK_LR)


def concept_b_sets(n: int) -> tuple[list[str], list]:
    from dopsd_world import captions, concept_samples

    _, attrs = concept_samples(n, seed=CONCEPT_B["prompt_seed"], concept_texture=CONCEPT_B["texture"])
    return [captions(a, CONCEPT_B["placeholder"])[i % 3] for i, a in enumerate(attrs)], attrs


def chain(scorer: bw.Scorer, loras: list[Path]):
    """The base with every LoRA of the chain merged in order (what stacking them computes)."""
    from dopsd.adapters import merge_lora

    t = scorer.backend.new_transformer()
    for lora in loras:
        state, meta = scorer.backend.read_lora(lora)
        merge_lora(t, state, meta, str(lora))
    return t.eval()


def score(scorer: bw.Scorer, transformer, sets: dict, b_sets, steps: int) -> dict:
    out = scorer.score(transformer, sets, steps)
    prompts, attrs = b_sets
    b = scorer.evaluator.attribute_accuracy(scorer.images(transformer, prompts, steps), attrs)
    return {"a_texture": out["concept_texture"], "b_texture": b["texture"], "retention_acc": out["retention_acc"],
            "fd": out["fd"], "sharpness": out["sharpness"]}


COLUMNS = [("a_texture", "A: texture acc ↑"), ("b_texture", "B: texture acc ↑"),
           ("retention_acc", "old prompts: attribute acc ↑"), ("fd", "old prompts: Fréchet ↓"),
           ("sharpness", "old prompts: sharpness ratio (1 = real)")]


def write_table(p, results: dict, out: Path) -> Path:
    lines = ["# Continual tuning on the miniature world: A ([V] = checkered), then B ([W] = dotted) from A", "",
             f"Base: {Path(p.model).name}. Each concept: {p.steps} steps, batch {p.batch_size}, LoRA rank {p.rank}; "
             f"B trains with A's LoRA merged into the base (`model.merge_loras`). Learning rates (bench_world's "
             f"sweep): " + ", ".join(f"{bw.METHODS[m].name} {results['lr'][m]:g}" for m in METHODS) +
             f". Seeds {list(results['seeds'])}; mean ± std; D-OPSD − SFT: paired by seed, 95% t interval.", ""]
    for budget, label in (("few", f"{p.few_steps} steps (the turbo's budget)"), ("many", f"{p.many_steps} steps")):
        lines += [f"## {label}", "", "| model | stage | " + " | ".join(c for _, c in COLUMNS) + " |",
                  "|---|---" + "|---" * len(COLUMNS) + "|",
                  "| base (untuned) | - | " + " | ".join(bw.fmt(results["base"][budget][k]) for k, _ in COLUMNS) + " |"]
        for stage in ("after_a", "after_b"):
            for m in METHODS:
                runs = [r[stage][budget] for r in results["runs"][m]]
                cells = [bw.fmt((float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs]))))
                         for k, _ in COLUMNS]
                lines.append(f"| {bw.METHODS[m].name} | {stage.replace('_', ' ')} | " + " | ".join(cells) + " |")
            diffs = results["paired"][stage][budget]
            cells = [f"{d['mean']:+.3f} ± {d['half_width']:.3f}" if d["n"] > 1 else f"{d['mean']:+.3f}"
                     for d in (diffs[k] for k, _ in COLUMNS)]
            lines.append(f"| D-OPSD − SFT | {stage.replace('_', ' ')} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"CPU, torch threads {p.threads}; {results['wall_time']}.", ""]
    path = out / "continual.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(bw.REPO / "benchmarks" / "results" / "world_continual"))
    ap.add_argument("--work", default="", help="where training runs go (default: a temporary directory)")
    ap.add_argument("--model", default=bw.Protocol.model)
    ap.add_argument("--smoke", action="store_true", help="a few steps, one seed (for tests)")
    ap.add_argument("--threads", type=int, default=bw.Protocol.threads,
                    help="torch threads (default 2; 1 beside another CPU job: two threads on one free core are "
                         "several times slower than one)")
    args = ap.parse_args(argv)
    p = replace(bw.Protocol(**bw.SMOKE) if args.smoke else bw.Protocol(), model=args.model, threads=args.threads)
    seeds = SMOKE_SEEDS if args.smoke else SEEDS

    import torch

    from dopsd_world import write_concept_folder

    torch.set_num_threads(p.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_continual_"))
    t0 = time.perf_counter()
    data_b = write_concept_folder(work / "data_b", count=6, seed=CONCEPT_B["data_seed"],
                                  concept_texture=CONCEPT_B["texture"], placeholder=CONCEPT_B["placeholder"])
    scorer = bw.Scorer(p)
    sets = bw.prompt_sets(p.report_world_seeds, p.concept_prompts, p.retention_prompts)
    b_sets = concept_b_sets(p.concept_prompts)
    lrs = chosen_lrs(bw.REPO / "benchmarks" / "results" / "world" / "results.json")
    # with --work, every finished score is kept there: a rerun (same protocol) continues after the last one
    kept = bw.Kept(work / "scores.json" if args.work else None,
                   {"protocol": asdict(p), "lr": lrs, "concept_b": CONCEPT_B})
    base = kept.get("base", lambda: {b: score(scorer, scorer.transformer(None), sets, b_sets, s)
                                     for b, s in (("few", p.few_steps), ("many", p.many_steps))})
    results: dict = {"protocol": asdict(p), "seeds": list(seeds), "lr": lrs, "concept_b": CONCEPT_B,
                     "base": base, "runs": {m: [] for m in METHODS}}

    def run_chain(m: str, seed: int) -> dict:
        run_a, _ = bw.train(p, m, lrs[m], seed, work, tag="a_")
        lora_a = run_a / "exports" / "final"
        run_b, _ = bw.train(p, m, lrs[m], seed, work, data=str(data_b), merge=(lora_a,), tag="b_")
        lora_b = run_b / "exports" / "final"
        row = {"seed": seed}
        for stage, loras in (("after_a", [lora_a]), ("after_b", [lora_a, lora_b])):
            t = chain(scorer, loras)
            row[stage] = {b: score(scorer, t, sets, b_sets, s) for b, s in (("few", p.few_steps),
                                                                            ("many", p.many_steps))}
        print(f"{m} seed {seed}:", json.dumps({k: row[k]["few"] for k in ("after_a", "after_b")}), flush=True)
        return row

    for seed in seeds:  # both methods per seed, interleaved
        for m in METHODS:
            results["runs"][m].append(kept.get(f"{m}/{seed}", lambda: run_chain(m, seed)))
    results["paired"] = {stage: {b: {k: paired([r[stage][b][k] for r in results["runs"]["sft"]],
                                               [r[stage][b][k] for r in results["runs"]["dopsd"]])
                                     for k, _ in COLUMNS} for b in ("few", "many")}
                         for stage in ("after_a", "after_b")}
    results["wall_time"] = kept.wall_time(time.perf_counter() - t0)
    table = write_table(p, results, out)
    (out / "continual.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    return bw.finish(table, work, keep=bool(args.work))


if __name__ == "__main__":
    raise SystemExit(main())
