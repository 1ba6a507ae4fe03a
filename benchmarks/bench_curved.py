"""The verdict on the curved miniature world: does SFT erode few-step sampling, and does D-OPSD keep it?

    python benchmarks/bench_curved.py [--model DIR] [--out benchmarks/results/world_curved] [--smoke]

The base world (bench_world.py) cannot ask this: its captions state all six attributes, its flow is almost
straight and a many-step model already samples it well at one Euler step. In the curved world (dopsd_world.curved)
a caption states shape and colour and 0-2 more attributes, so a prompt has many images and a few Euler steps
of a many-step model average them into blur; the curved toy turbo (`dopsd-world make-toy-base --world curved`,
gated by `gate.CURVED_GATE` before this script may run on it) is step-distilled to 4 steps on it. The old
world's results (benchmarks/results/world) stay as they are.

Protocol (written before any curved-world result existed, before the curved turbo was built):
- base: --model, a curved build that passed its gate (the script refuses one whose report.json says the gate
  failed); reference rows: the untuned turbo and the model before step distillation (the build's
  `pre_distillation.safetensors`), scored exactly as the tuned models;
- data: six images of the held-out checkered texture, captioned in the curved style with "[V]" for the texture
  (`write_curved_concept_folder(count=6, seed=0)`: shape, colour, [V] and 0-1 more attributes), the same
  for every method and seed; (added after build 1 failed its gate, before any comparison ran: the prompts and
  data follow the build's own world, its report's `stated_extra` (`curved.concept_extra` for
  [V]) -- build 1's world gives exactly the counts above);
- methods: SFT; D-OPSD with the reference-image teacher; D-OPSD with the VLM teacher (both teacher routes of the
  toy). Only `train.objective` and the teacher's route differ; `ema_decay` is the recipe's default, used by
  D-OPSD's teacher only. Same budget (200 steps, batch 4, LoRA rank 8 / alpha 16, 4-step roll-outs), same data
  order per seed;
- learning rate: each method's best of LRS on seed 0, scored on the *sweep* prompt sets at 4 steps after the last
  step, by concept texture accuracy + old-prompt stated-attribute accuracy (bench_world.py's rule);
- report: the chosen lr on seeds 1..5, on separate *report* prompt sets (other prompt seeds);
- scores (the shipped world evaluator through `curved.OpenScorer`, against real samples of the same prompts), at
  1, 2, 4 Euler steps and at the many-step budget (32): concept adherence on held-out "[V]" prompts (texture
  accuracy, stated-attribute accuracy); retention on old curved-world prompts (stated-attribute accuracy,
  diversity ratio, Fréchet distance, sharpness ratio, and the share of samples that draw the checkered texture
  where the prompt leaves the texture open: leakage);
- reported: mean ± std per method, D-OPSD minus SFT per seed (paired) with a 95% t interval; the step-budget
  curve (each metric vs 1, 2, 4, 8, 32 steps) per method and reference; grids at 1 and 4 steps.
  Nothing is asserted; tests run `--smoke` on a tiny curved build.
- diagnostic (added before any curved result, to answer "is the teacher sharp at the turbo's budget on the
  student's states?" whichever method wins): along the untuned turbo's own 4-step roll-outs for the report
  `[V]` prompts, the clean image each role predicts at every state (x - sigma * v, decoded): the student's
  (text only) and the teacher's (text + a real image of the prompt, each route) -- what D-OPSD pulls the
  student towards -- scored like samples; plus the teacher's own 4-step samples.

Writes results.md, results.json, budget_curves.png and grid_*.png/.txt to --out. With --work every finished
score is kept in WORK/scores.json (`bench_world.Kept`): the same command rerun continues after it.
"""
from __future__ import annotations

import argparse
import json
import platform
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_world as bw  # noqa: E402
from paired import paired  # noqa: E402

from dopsd_world import CURVED_TURBO  # noqa: E402

METHODS = ("sft", "dopsd", "dopsd_vlm")


@dataclass(frozen=True)
class CurvedProtocol(bw.Protocol):
    model: str = str(CURVED_TURBO)
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    budgets: tuple[int, ...] = (1, 2, 4, 8, 32)  # the curve; the table shows 1, 2, 4 and many_steps
    concept_prompts: int = 32
    concept_per_prompt: int = 4
    retention_prompts: int = 32
    retention_per_prompt: int = 8
    data_count: int = 6
    data_seed: int = 0
    sweep_world_seeds: tuple[int, int] = (700, 701)
    report_world_seeds: tuple[int, int] = (800, 801)


SMOKE = dict(steps=2, lrs=(1e-3,), seeds=(1,), eval_every=2, budgets=(1, 2), many_steps=2, concept_prompts=2,
             concept_per_prompt=2, retention_prompts=2, retention_per_prompt=2)

CONCEPT = [("acc_texture", "[V]: texture acc ↑"), ("acc_mean", "[V]: stated acc ↑")]
RETENTION = [("acc_mean", "old: stated acc ↑"), ("diversity_ratio", "old: diversity ratio (1 = real)"),
             ("fd", "old: Fréchet ↓"), ("sharpness_ratio", "old: sharpness ratio (1 = real)"),
             ("concept_share", "old: [V] leakage ↓")]
COLUMNS = [("concept", k, label) for k, label in CONCEPT] + [("retention", k, label) for k, label in RETENTION]


class CurvedScorer:
    """Samples a curved build (turbo, its pre-distillation twin, or the turbo with a LoRA) and scores it."""

    def __init__(self, p: CurvedProtocol, world_seeds: tuple[int, int], extra: tuple[int, ...]):
        """`extra`: the build's own world, how many attributes beyond shape and colour its captions state."""
        from dopsd.config import ModelConfig
        from dopsd.models import load_backend
        from dopsd_world.curved import OpenScorer, concept_extra, prompt_set
        from dopsd_world.evaluator import load_evaluator

        self.p, self.size = p, 32
        self.backend = load_backend(ModelConfig(backend="zimage", path=p.model, teacher_min_pixels=4096,
                                                teacher_max_pixels=4096))
        ev = load_evaluator(p.evaluator)
        self.scorers = {
            "concept": OpenScorer(ev, prompt_set(p.concept_prompts, world_seeds[0], concept=True,
                                                        extra=concept_extra(extra)),
                                  per_prompt=p.concept_per_prompt),
            "retention": OpenScorer(ev, prompt_set(p.retention_prompts, world_seeds[1], extra=extra),
                                    per_prompt=p.retention_per_prompt)}

    def transformer(self, which: str | Path | None):
        """None: the turbo; "pre_distillation": the model before step distillation; a path: turbo + LoRA."""
        from safetensors.torch import load_file

        from dopsd_world.toybase import PRE_DISTILLATION, module_state

        t = self.backend.new_transformer()
        if which == "pre_distillation":
            t.load_state_dict(module_state(load_file(str(Path(self.p.model) / PRE_DISTILLATION)), "transformer"),
                              strict=True)
        elif which is not None:
            self.backend.load_lora(t, Path(which))
        return t.eval()

    def score(self, transformer, steps: int) -> dict:
        from dopsd.sampling import sample_batch

        out = {}
        for name, scorer in self.scorers.items():
            images = sample_batch(self.backend, transformer, scorer.texts(), scorer.seeds(), steps, self.size)
            out[name] = {k: float(v) for k, v in scorer.score(images).items()}
        return out

    def budgets(self, transformer) -> dict:
        return {str(n): self.score(transformer, n) for n in sorted({*self.p.budgets, self.p.many_steps})}


ROUTES = ("reference", "vlm")


def teacher_on_student_states(scorer: CurvedScorer, steps: int) -> dict:
    """The diagnostic of the module docstring, on the report `[V]` prompts."""
    import torch

    from dopsd.sampling import sample_batch, seeded_noise
    from dopsd.schedule import euler_step, x0_from_velocity
    from dopsd_world.toybase import _to_float, teacher_route

    b, sc = scorer.backend, scorer.scorers["concept"]
    t = scorer.transformer(None)
    texts, seeds = sc.texts(), sc.seeds()
    images = _to_float(sc.real_images(seed=2))  # the teacher's target: a real image of the prompt, one per sample
    shape = b.latent_shape(1, scorer.size, scorer.size)
    sigmas = b.sigmas(steps, shape)

    def scored(latents) -> dict:
        return {k: float(v) for k, v in sc.score(b.decode_latents(latents).cpu()).items()}

    out: dict = {"states": []}
    with torch.no_grad():
        x = torch.cat([seeded_noise(shape, s) for s in seeds]).to(b.device)
        student = b.encode_student(texts)
        teachers = {}
        for route in ROUTES:
            with teacher_route(b, route):
                teachers[route] = b.encode_teacher(texts, images)
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = b.velocity(t, x, s, student).float()
            row = {"sigma": float(s), "student": scored(x0_from_velocity(x, v, s))}
            for route, ctx in teachers.items():
                row[f"teacher_{route}"] = scored(x0_from_velocity(x, b.velocity(t, x, s, ctx).float(), s))
            out["states"].append(row)
            x = euler_step(x, v, s, s_next)
    out["samples"] = {"student": {k: float(v) for k, v in sc.score(sample_batch(b, t, texts, seeds, steps,
                                                                            scorer.size)).items()}}
    for route in ROUTES:
        with teacher_route(b, route):
            samples = sample_batch(b, t, texts, seeds, steps, scorer.size, images=images)
        out["samples"][f"teacher_{route}"] = {k: float(v) for k, v in sc.score(samples).items()}
    return out


def check_gate(model: Path, smoke: bool) -> dict:
    report = json.loads((model / "report.json").read_text())
    if report.get("settings", {}).get("world") != "curved":
        raise SystemExit(f"{model}: not a curved-world build (dopsd-world make-toy-base --world curved)")
    gate = report.get("gate")
    if gate is None and not smoke:
        raise SystemExit(f"{model}/report.json has no gate: run `dopsd-world gate --out {model}` first")
    if gate is not None and not gate["passed"] and not smoke:
        raise SystemExit(f"{model}: the gate failed ({gate['checks']}); change the world or the distillation, "
                         "not the comparison (benchmarks/world/gate.py)")
    return gate or {}


def write_table(p: CurvedProtocol, results: dict, out: Path) -> Path:
    lines = ["# SFT vs D-OPSD on the curved miniature world", "",
             f"Base: the curved toy turbo ({Path(p.model).name}; gate: "
             f"{'passed' if results['gate'].get('passed') else 'NOT passed'}). LoRA rank {p.rank}, alpha {p.alpha:g}, "
             f"{p.steps} steps, batch {p.batch_size}, the same {p.data_count} `[V]` = checkered images and seeds for "
             f"every method. Learning rates from the sweep: " + ", ".join(
                 f"{bw.METHODS[m].name} {results['chosen_lr'][m]:g}" for m in METHODS) +
             f". Seeds {list(p.seeds)}: mean ± std; D-OPSD − SFT paired by seed, 95% t interval. "
             f"{p.concept_prompts} held-out `[V]` prompts x {p.concept_per_prompt} noise seeds, "
             f"{p.retention_prompts} old prompts x {p.retention_per_prompt}.", ""]
    head = "| model | " + " | ".join(label for _, _, label in COLUMNS) + " |"
    for steps in [n for n in (1, 2, 4) if n in p.budgets] + [p.many_steps]:
        key = str(steps)
        lines += [f"## {steps} Euler step{'s' if steps > 1 else ''}", "", head, "|---" * (len(COLUMNS) + 1) + "|"]
        for ref, name in (("turbo", "turbo (untuned)"), ("pre_distillation", "before step distillation")):
            r = results["reference"][ref][key]
            lines.append(f"| {name} | " + " | ".join(bw.fmt(r[s][k]) for s, k, _ in COLUMNS) + " |")
        for m in METHODS:
            runs = [r["budgets"][key] for r in results["report"][m]]
            cells = [bw.fmt((float(np.mean([r[s][k] for r in runs])), float(np.std([r[s][k] for r in runs]))))
                     for s, k, _ in COLUMNS]
            lines.append(f"| {bw.METHODS[m].name} | " + " | ".join(cells) + " |")
        for m in METHODS[1:]:
            d = results["paired"][m][key]
            cells = [f"{d[f'{s}.{k}']['mean']:+.3f}" + (f" ± {d[f'{s}.{k}']['half_width']:.3f}"
                                                        if d[f"{s}.{k}"]["n"] > 1 else "") for s, k, _ in COLUMNS]
            lines.append(f"| {bw.METHODS[m].name} − SFT | " + " | ".join(cells) + " |")
        lines.append("")
    diag = results["teacher"]
    cols = [("acc_texture", "[V] texture acc"), ("acc_mean", "stated acc"), ("sharpness_ratio", "sharpness ratio"),
            ("fd", "Fréchet")]
    lines += [f"## Diagnostic: the teacher on the student's states (untuned turbo, report [V] prompts, "
              f"{p.few_steps}-step roll-outs)", "",
              "Clean image predicted at each state of the student's own roll-out (x − σ·v, decoded); the "
              "teacher sees the prompt and a real image of it. Last rows: each role's own samples.", "",
              "| state σ | role | " + " | ".join(c for _, c in cols) + " |", "|---|---" + "|---" * len(cols) + "|"]
    for row in diag["states"]:
        for role in ("student", *(f"teacher_{r}" for r in ROUTES)):
            lines.append(f"| {row['sigma']:.3f} | {role} | " + " | ".join(bw.fmt(row[role][k]) for k, _ in cols) + " |")
    for role, r in diag["samples"].items():
        lines.append(f"| samples | {role} | " + " | ".join(bw.fmt(r[k]) for k, _ in cols) + " |")
    lines += ["", "## Learning-rate sweep (seed 0, sweep prompts, 4 steps)", "",
              "| method | lr | [V] texture acc | old stated acc | selection score |", "|---|---|---|---|---|"]
    for m in METHODS:
        for lr, r in results["sweep"][m].items():
            a, b = r["concept"]["acc_texture"], r["retention"]["acc_mean"]
            lines.append(f"| {bw.METHODS[m].name} | {lr} | {a:.3f} | {b:.3f} | {a + b:.3f} |")
    lines += ["", f"Machine: CPU ({platform.machine()}, {os.cpu_count()} cores), torch threads {p.threads}; "
              f"{results['wall_time']}.", ""]
    path = out / "results.md"
    path.write_text("\n".join(lines))
    return path


def plot_budgets(p: CurvedProtocol, results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({*p.budgets, p.many_steps})
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(3.3 * len(COLUMNS), 3.2))
    for ax, (s, k, label) in zip(axes, COLUMNS):
        for ref, style in (("turbo", "k--"), ("pre_distillation", "k:")):
            ax.plot(steps, [results["reference"][ref][str(n)][s][k] for n in steps], style, lw=1, label=ref)
        for m in METHODS:
            vals = np.array([[r["budgets"][str(n)][s][k] for n in steps] for r in results["report"][m]])
            bw.band(ax, steps, vals, bw.METHODS[m].name)
        ax.set_xscale("log", base=2)
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("Euler steps")
    axes[0].legend(fontsize=7)
    return bw.save_figure(fig, out / "budget_curves.png", "curved world: quality vs sampling steps after tuning "
                          f"(mean and range over seeds {list(p.seeds)})")


def grids(scorer: CurvedScorer, p: CurvedProtocol, loras: dict, out: Path) -> None:
    from dopsd.sampling import sample_batch, save_grid

    models = [("turbo", None), ("before distillation", "pre_distillation")] + [
        (bw.METHODS[m].name, loras[m]) for m in METHODS]
    texts = {which: list(scorer.scorers[which].prompts.texts[:4]) for which in ("concept", "retention")}
    grid_steps = (1, p.few_steps)
    blocks: dict = {}
    for _, w in models:  # each model built once, sampled for every grid
        t = scorer.transformer(w)
        for which, rows in texts.items():
            many = [q for q in rows for _ in range(4)]
            for steps in grid_steps:
                blocks.setdefault((which, steps), []).append(
                    sample_batch(scorer.backend, t, many, list(range(4)) * len(rows), steps, scorer.size))
    for (which, steps), cols in blocks.items():
        save_grid(cols, len(texts[which]), out / f"grid_{which}_{steps}steps.png")
        (out / f"grid_{which}_{steps}steps.txt").write_text(
            "columns: " + " | ".join(n for n, _ in models) + " (4 noise seeds each); rows:\n"
            + "\n".join(texts[which]) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=CurvedProtocol.model, help="a curved build (default the shipped one, dopsd_world.CURVED_TURBO)")
    ap.add_argument("--out", default=str(bw.REPO / "benchmarks" / "results" / "world_curved"))
    ap.add_argument("--work", default="", help="where training runs go (default: a temporary directory)")
    ap.add_argument("--smoke", action="store_true", help="a few steps, one seed, one lr (for tests)")
    ap.add_argument("--threads", type=int, default=CurvedProtocol.threads,
                    help="torch threads (default 2; 1 beside another CPU job)")
    args = ap.parse_args(argv)
    p = replace(CurvedProtocol(**SMOKE) if args.smoke else CurvedProtocol(), model=args.model, threads=args.threads)
    gate = check_gate(Path(p.model), args.smoke)

    import torch

    from dopsd_world.curved import concept_extra, write_curved_concept_folder
    from dopsd_world.toybase import _extra, curved_build_settings

    torch.set_num_threads(p.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_curved_"))
    t0 = time.perf_counter()
    extra = _extra(curved_build_settings(json.loads((Path(p.model) / "report.json").read_text()), p.model))
    data = str(write_curved_concept_folder(work / "data", count=p.data_count, seed=p.data_seed,
                                           extra=concept_extra(extra)))
    # with --work every finished score is kept there; threads change float summation order only
    kept = bw.Kept(work / "scores.json" if args.work else None,
                   {k: v for k, v in asdict(p).items() if k != "threads"})
    sweep = CurvedScorer(p, p.sweep_world_seeds, extra)
    report = CurvedScorer(p, p.report_world_seeds, extra)
    results: dict = {"protocol": asdict(p), "gate": gate, "sweep": {}, "chosen_lr": {}, "report": {},
                     "reference": {ref: kept.get(f"reference/{ref}", lambda: report.budgets(report.transformer(w)))
                                   for ref, w in (("turbo", None), ("pre_distillation", "pre_distillation"))},
                     "teacher": kept.get("teacher", lambda: teacher_on_student_states(report, p.few_steps))}

    def sweep_run(m: str, lr: float) -> dict:
        run, _ = bw.train(p, m, lr, p.sweep_seed, work, data=data, tag="sweep_")
        return sweep.score(sweep.transformer(run / "exports" / "final"), p.few_steps)

    def report_run(m: str, seed: int) -> dict:
        run, secs = bw.train(p, m, results["chosen_lr"][m], seed, work, data=data)
        row = {"seed": seed, "train_seconds": secs, "budgets": report.budgets(report.transformer(run / "exports" / "final"))}
        shown = str(p.few_steps) if str(p.few_steps) in row["budgets"] else min(row["budgets"], key=int)
        print(f"{m} seed {seed}: {shown} steps", json.dumps(row["budgets"][shown]), flush=True)
        return row

    for m in METHODS:
        results["sweep"][m] = {f"{lr:g}": kept.get(f"sweep/{m}/{lr:g}", lambda: sweep_run(m, lr)) for lr in p.lrs}
        results["chosen_lr"][m] = max(p.lrs, key=lambda lr: results["sweep"][m][f"{lr:g}"]["concept"]["acc_texture"]
                                      + results["sweep"][m][f"{lr:g}"]["retention"]["acc_mean"])
        print(f"sweep {m}: lr {results['chosen_lr'][m]:g}", flush=True)
    for seed in p.seeds:  # every method per seed, interleaved
        for m in METHODS:
            results["report"].setdefault(m, []).append(kept.get(f"report/{m}/{seed}", lambda: report_run(m, seed)))
    loras = {m: bw.run_path(work, m, results["chosen_lr"][m], p.seeds[0]) / "exports" / "final" for m in METHODS}
    results["paired"] = {m: {str(n): {f"{s}.{k}": paired([r["budgets"][str(n)][s][k] for r in results["report"]["sft"]],
                                                         [r["budgets"][str(n)][s][k] for r in results["report"][m]])
                                      for s, k, _ in COLUMNS}
                             for n in sorted({*p.budgets, p.many_steps})} for m in METHODS[1:]}
    grids(report, p, loras, out)
    plot_budgets(p, results, out)
    results["wall_time"] = kept.wall_time(time.perf_counter() - t0)
    table = write_table(p, results, out)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    return bw.finish(table, work, keep=bool(args.work))


if __name__ == "__main__":
    raise SystemExit(main())
