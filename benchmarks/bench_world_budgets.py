"""Why the miniature world shows no few-step erosion: the same models scored at 1, 2 and 4 Euler steps.

    python benchmarks/bench_world_budgets.py [--pre-distillation FILE] [--runs WORK] [--out benchmarks/results/world]

A post-hoc diagnostic, written after bench_world.py's results were seen (it changes nothing in that protocol).
bench_world found that neither SFT nor D-OPSD loses few-step quality on the toy: 4 and 32 steps score alike.
Step distillation matters when the flow from noise to image is curved, so a few Euler steps of the base model
land between modes (blur) and only the distilled model's velocities reach an image. This script measures how
curved the toy's flow is, on bench_world's report prompt sets and noise seeds, at each budget:

- the shipped turbo;
- the model before step distillation (`--pre-distillation`: the `incontext-*.safetensors` stage cache of a
  `dopsd-world make-toy-base --work DIR` build with the default settings; its transformer weights are loaded);
- the final LoRAs of a `bench_world.py --work WORK` run (`--runs WORK`; the report seeds' runs).

Writes budgets.md and budgets.json to --out. Nothing is asserted; tests run `--smoke`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_world as bw  # noqa: E402  (also puts the repository on sys.path)


def lora_runs(runs: str, seeds: tuple[int, ...]) -> list[tuple[str, int, Path]]:
    """(method name, seed, final LoRA) of every report run in a bench_world --work directory, all found up front."""
    out = []
    for method, spec in bw.METHODS.items():
        for seed in seeds:
            found = sorted(Path(runs).glob(f"{method}_lr*_seed{seed}/exports/final"))
            if len(found) != 1:
                raise SystemExit(f"expected one {method} run of seed {seed} in {runs}, found {found}")
            out.append((spec.name, seed, found[0]))
    return out


def models(scorer: bw.Scorer, pre_distillation: str, loras: list[tuple[str, int, Path]]):
    """(label, seed, transformer) for every model to score, loaded one at a time."""
    yield "turbo (shipped)", None, scorer.transformer(None)
    if pre_distillation:
        from safetensors.torch import load_file

        from dopsd_world.toybase import module_state

        t = scorer.transformer(None)
        # strict: a cache of other settings fails here, not silently
        t.load_state_dict(module_state(load_file(pre_distillation), "transformer"), strict=True)
        yield "before step distillation", None, t
    for name, seed, path in loras:
        yield name, seed, scorer.transformer(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(bw.REPO / "benchmarks" / "results" / "world"))
    parser.add_argument("--pre-distillation", default="", help="incontext-*.safetensors of a make-toy-base --work")
    parser.add_argument("--runs", default="", help="the --work directory of a bench_world.py run")
    parser.add_argument("--budgets", default="1,2,4", help="comma-separated Euler step counts")
    parser.add_argument("--smoke", action="store_true", help="bench_world's smoke protocol (for tests)")
    args = parser.parse_args(argv)
    p = bw.Protocol(**bw.SMOKE) if args.smoke else bw.Protocol()
    budgets = [int(b) for b in args.budgets.split(",")]

    import torch

    torch.set_num_threads(p.threads)
    t_start = time.perf_counter()
    scorer = bw.Scorer(p)
    sets = bw.prompt_sets(p.report_world_seeds, p.concept_prompts, p.retention_prompts)
    scores: dict[str, dict[str, list[dict]]] = {}  # label -> budget -> one score per seed
    loras = lora_runs(args.runs, p.seeds) if args.runs else []
    for label, seed, transformer in models(scorer, args.pre_distillation, loras):
        for n in budgets:
            r = scorer.score(transformer, sets, n)
            scores.setdefault(label, {}).setdefault(str(n), []).append({**r, "seed": seed})
            print(label, seed, n, json.dumps(r), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# The miniature world's models at {args.budgets} Euler steps (post-hoc diagnostic)", "",
             f"`benchmarks/bench_world_budgets.py`; bench_world's report prompts ({p.concept_prompts} held-out `[V]`, "
             f"{p.retention_prompts} old) and noise seeds; tuned rows: mean ± std over seeds {list(p.seeds)}.", "",
             "| model | steps | " + " | ".join(c for _, c in bw.COLUMNS) + " |", "|---" * (len(bw.COLUMNS) + 2) + "|"]
    for label, by_budget in scores.items():
        for n, runs in by_budget.items():
            agg = bw.aggregate([{"s": {k: v for k, v in r.items() if k != "seed"}} for r in runs], "s")
            cells = [bw.fmt(agg[k] if len(runs) > 1 else agg[k][0]) for k, _ in bw.COLUMNS]
            lines.append(f"| {label} | {n} | " + " | ".join(cells) + " |")
    lines += ["", f"Total {(time.perf_counter() - t_start) / 60:.1f} min on {p.threads} torch threads.", ""]
    (out / "budgets.md").write_text("\n".join(lines))
    (out / "budgets.json").write_text(json.dumps({"protocol": vars(args), "scores": scores}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
