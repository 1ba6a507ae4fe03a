"""SFT vs D-OPSD on the miniature world: does D-OPSD learn a new concept and keep few-step sampling?

    python benchmarks/bench_world.py [--out benchmarks/results/world] [--smoke]

The base is the shipped toy turbo model (dopsd/assets/toy_turbo: a Z-Image-class DiT step-distilled to
4 Euler steps, made by `dopsd-world make-toy-base`). Both methods tune a LoRA on the same six images
of the held-out `checkered` texture captioned with "[V]" (dopsd/assets/quickstart), through the trainer
exactly as a user runs it (`dopsd.trainer.Trainer`), with the same step budget, batch, LoRA rank, seed
and data order. The only knob that differs is `train.objective` (`ema_decay` and `model.teacher_context`
exist only for D-OPSD's teacher; the decay is the recipe default) and each method's learning rate, picked
by the same sweep. D-OPSD runs twice, once per teacher route of the Z-Image backend: the target image as a
clean reference in the DiT's sequence (`teacher_context: reference`) and through the Qwen3-VL front-end
(`vlm`, the recipe's route for Z-Image-Turbo; on the toy it does not render the unseen texture, see the
README). The reference route was added after the VLM route's runs had been seen; the protocol, data and
evaluator were not changed.

Protocol (fixed before any result was looked at):
- sweep: every lr in LRS on seed 0, scored on the *sweep* prompt sets; each method keeps the lr with the
  highest concept-texture accuracy + retention attribute accuracy, both at 4 steps after the last step;
- report: the chosen lr on seeds 1, 2, 3, scored on separate *report* prompt sets (other world seeds);
- concept adherence: texture accuracy (== checkered) of samples for held-out "[V]" prompts (attribute
  combinations that are not in the training images), plus their mean attribute accuracy;
- retention: on prompts of the base world (no "[V]"), mean attribute accuracy, Fréchet distance of the
  evaluator's features to real world samples, and sharpness (ratio to real samples; < 1 = blur);
- all at the turbo's 4 steps and at 32 steps (the many-step budget), by the evaluator shipped in
  benchmarks/world/assets/world_evaluator.safetensors (package dopsd_world; trained once, before the base
  model existed);
- the untuned base is scored the same way as the reference row.

Writes to --out: results.md (table), results.json (every number), curves.png (metrics vs training step,
mean and range over seeds), grid_concept_4steps.png / grid_retention_4steps.png / grid_concept_32steps.png
(base | SFT | D-OPSD | D-OPSD with the VLM teacher, seed 1 runs). Nothing is asserted; tests run `--smoke`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

ASSETS = REPO / "dopsd" / "assets"
from dopsd_world import EVALUATOR_WEIGHTS  # noqa: E402  (the miniature world, installed beside dopsd)


@dataclass(frozen=True)
class Method:
    name: str
    objective: str
    teacher_context: str = ""


METHODS = {"sft": Method("SFT", "sft"),
           "dopsd": Method("D-OPSD", "dopsd", "reference"),
           "dopsd_vlm": Method("D-OPSD, VLM teacher", "dopsd", "vlm")}


@dataclass(frozen=True)
class Protocol:
    model: str = str(ASSETS / "toy_turbo")
    evaluator: str = str(EVALUATOR_WEIGHTS)
    data: str = str(ASSETS / "quickstart")
    steps: int = 200
    batch_size: int = 4
    rank: int = 8
    alpha: float = 16.0
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    sweep_seed: int = 0
    seeds: tuple[int, ...] = (1, 2, 3)
    eval_every: int = 50
    few_steps: int = 4
    many_steps: int = 32
    concept_prompts: int = 64
    retention_prompts: int = 128
    threads: int = 2
    # world seeds of the prompt sets: sweep and report never share prompts
    sweep_world_seeds: tuple[int, int] = (700, 701)
    report_world_seeds: tuple[int, int] = (800, 801)
    extra: dict = field(default_factory=dict)


SMOKE = dict(steps=2, lrs=(1e-3,), seeds=(1,), eval_every=1, many_steps=4, concept_prompts=4, retention_prompts=4)


def prompt_sets(world_seeds: tuple[int, int], n_concept: int, n_retention: int) -> dict:
    from dopsd_world import PLACEHOLDER, captions, concept_samples, sample_world

    _, concept = concept_samples(n_concept, seed=world_seeds[0])
    _, old = sample_world(n_retention, seed=world_seeds[1])
    return {"concept": ([captions(a, PLACEHOLDER)[i % 3] for i, a in enumerate(concept)], concept),
            "retention": ([captions(a)[i % 3] for i, a in enumerate(old)], old)}


class Scorer:
    """Samples and scores a base model with or without a LoRA, on fixed prompts and noise seeds."""

    def __init__(self, p: Protocol):
        from dopsd.config import ModelConfig
        from dopsd.models import load_backend
        from dopsd_world.evaluator import load_evaluator

        size = 32
        self.p = p
        self.size = size
        self.backend = load_backend(ModelConfig(backend="zimage", path=p.model, teacher_min_pixels=4 * size * size,
                                                teacher_max_pixels=4 * size * size))
        self.evaluator = load_evaluator(p.evaluator)
        self.reference = self.evaluator.reference_stats()

    def transformer(self, lora: Path | None):
        t = self.backend.new_transformer()
        if lora is not None:
            self.backend.load_lora(t, lora)
        return t.eval()

    def images(self, transformer, prompts: list[str], steps: int):
        from dopsd.sampling import sample_batch

        return sample_batch(self.backend, transformer, prompts, list(range(len(prompts))), steps, self.size)

    def score(self, transformer, sets: dict, steps: int) -> dict:
        ev = self.evaluator
        concept_prompts, concept_attrs = sets["concept"]
        old_prompts, old_attrs = sets["retention"]
        concept = ev.attribute_accuracy(self.images(transformer, concept_prompts, steps), concept_attrs)
        old = ev.score(self.images(transformer, old_prompts, steps), targets=old_attrs, reference=self.reference)
        return {"concept_texture": concept["texture"], "concept_attrs": concept["mean"],
                "retention_acc": old["acc_mean"], "fd": old["fd"], "sharpness": old["sharpness_ratio"]}


class Kept:
    """Finished results of a long benchmark, kept in one JSON file (WORK/scores.json) so that the same command
    rerun continues after the last one instead of starting again (the full curved and continual runs take
    longer than a working session). `of` names what the results belong to: a file kept for another protocol
    is refused rather than mixed in. Without a file the results are kept in memory only."""

    def __init__(self, path: Path | None, of: dict):
        self.path = path
        self.done = json.loads(path.read_text()) if path is not None and path.is_file() else {}
        of = json.loads(json.dumps(of, default=str))
        if self.done.get("of") not in (None, of):
            raise SystemExit(f"{path}: results of another protocol or learning rates; use a new --work")
        self.done["of"] = of
        self.resumed = len(self.done) - 1  # results kept by earlier invocations

    def wall_time(self, seconds: float) -> str:
        """How long this invocation took, and that earlier ones did the rest when it resumed."""
        return f"this invocation {seconds / 60:.1f} min" + (
            f" (it resumed {self.resumed} results kept in --work by earlier ones)" if self.resumed else "")

    def __contains__(self, key: str) -> bool:
        return key in self.done

    def get(self, key: str, compute):
        """The kept result under `key`, or compute() kept (as JSON: tuples become lists, keys strings)."""
        if key not in self.done:
            self.done[key] = json.loads(json.dumps(compute(), default=str))
            if self.path is not None:
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(self.done))
                tmp.replace(self.path)  # a kill mid-write leaves the previous file whole
        return self.done[key]


def run_path(out: Path, method: str, lr: float, seed: int, tag: str = "") -> Path:
    return out / f"{tag}{method}_lr{lr:g}_seed{seed}"


def train(p: Protocol, method: str, lr: float, seed: int, out: Path, data: str | None = None,
          merge: tuple[str, ...] = (), tag: str = "") -> tuple[Path, float]:
    """One tuning run as a user runs it; `data` (default p.data) and `merge` (model.merge_loras: continual
    tuning) for bench_continual.py."""
    from dopsd.config import from_dict
    from dopsd.trainer import Trainer

    run_dir = run_path(out, method, lr, seed, tag)
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = from_dict({
        "model": {"backend": "zimage", "path": p.model, "teacher_min_pixels": 4096, "teacher_max_pixels": 4096,
                  "teacher_context": METHODS[method].teacher_context, "merge_loras": [str(m) for m in merge]},
        "lora": {"rank": p.rank, "alpha": p.alpha},
        "train": {"mode": "lora", "objective": METHODS[method].objective, "steps": p.steps, "batch_size": p.batch_size, "lr": lr,
                  "rollout_steps": p.few_steps, "seed": seed, "device": "cpu"},
        "data": {"type": "folder", "path": data or p.data, "resolution": [32, 32]},
        "output": {"dir": str(run_dir), "save_every": p.eval_every, "tensorboard": False,
                   "progress_bar": False, "log_every": 10},
    })
    t0 = time.perf_counter()
    Trainer(cfg).fit()
    return run_dir, time.perf_counter() - t0


def exports(run_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for d in sorted((run_dir / "exports").iterdir()):
        step = None
        if d.name.startswith("step_"):
            step = int(d.name.split("_")[1])
        elif d.name == "final":
            step = -1
        if step is not None:
            out.append((step, d))
    return out


def evaluate_run(scorer: Scorer, p: Protocol, run_dir: Path, sets: dict, curve: bool) -> dict:
    """Scores at every export (4 steps; the curve) and, for the final LoRA, at the many-step budget too."""
    result: dict = {"curve": {}}
    for step, lora in exports(run_dir):
        final = step == -1
        if not (curve or final):
            continue
        transformer = scorer.transformer(lora)  # loaded once per export, scored at every budget
        key = p.steps if final else step
        result["curve"][key] = scorer.score(transformer, sets, p.few_steps)
        if final:
            result["few"] = result["curve"][key]
            if curve:
                result["many"] = scorer.score(transformer, sets, p.many_steps)
    return result


def aggregate(runs: list[dict], key: str) -> dict:
    metrics = runs[0][key]
    return {m: (float(np.mean([r[key][m] for r in runs])), float(np.std([r[key][m] for r in runs])))
            for m in metrics}


COLUMNS = [("concept_texture", "concept: texture acc ↑"), ("concept_attrs", "concept: attribute acc ↑"),
           ("retention_acc", "old prompts: attribute acc ↑"), ("fd", "old prompts: Fréchet ↓"),
           ("sharpness", "old prompts: sharpness ratio (1 = real)")]


def fmt(v) -> str:
    if isinstance(v, tuple):
        return f"{v[0]:.3f} ± {v[1]:.3f}" if v[0] < 10 else f"{v[0]:.1f} ± {v[1]:.1f}"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}"


def write_table(p: Protocol, results: dict, out: Path, elapsed: float) -> Path:
    lines = ["# SFT vs D-OPSD on the miniature world", "",
             f"Base: toy turbo (4-step distilled). LoRA rank {p.rank}, alpha {p.alpha:g}, {p.steps} steps, batch "
             f"{p.batch_size}, same data (6 `[V]` = checkered images) and seeds. Mean ± std over seeds "
             f"{list(p.seeds)}; {p.concept_prompts} held-out `[V]` prompts, {p.retention_prompts} old prompts. "
             f"Learning rates chosen by the sweep: " + ", ".join(
                 f"{METHODS[m].name} {results['chosen_lr'][m]:g}" for m in METHODS) + ". D-OPSD's teacher "
             "sees the target as a clean reference image in the DiT's sequence, unless marked VLM (Qwen3-VL "
             "features).", ""]
    for budget, label in (("few", f"{p.few_steps} steps (the turbo's budget)"),
                          ("many", f"{p.many_steps} steps")):
        lines += [f"## {label}", "", "| model | " + " | ".join(c for _, c in COLUMNS) + " |",
                  "|---" * (len(COLUMNS) + 1) + "|"]
        lines.append("| base (untuned) | " + " | ".join(fmt(results["base"][budget][k]) for k, _ in COLUMNS) + " |")
        for m, method in METHODS.items():
            agg = results["report"][m][budget]
            lines.append(f"| {method.name} | " + " | ".join(fmt(tuple(agg[k])) for k, _ in COLUMNS) + " |")
        lines.append("")
    lines += ["## Learning-rate sweep (seed 0, sweep prompts, 4 steps, last step)", "",
              "| method | lr | concept texture acc | old-prompt attribute acc | selection score |", "|---|---|---|---|---|"]
    for m, method in METHODS.items():
        for lr, r in results["sweep"][m].items():
            lines.append(f"| {method.name} | {lr} | {r['concept_texture']:.3f} | {r['retention_acc']:.3f} | "
                         f"{r['concept_texture'] + r['retention_acc']:.3f} |")
    lines += ["", f"Machine: CPU ({platform.machine()}, {os.cpu_count()} cores), torch threads {p.threads}; "
              f"total {elapsed / 60:.1f} min. Mean train wall time per run: " + ", ".join(
                  f"{METHODS[m].name} {results['train_seconds'][m]:.0f} s" for m in METHODS) + ".", ""]
    path = out / "results.md"
    path.write_text("\n".join(lines))
    return path


def plot(p: Protocol, results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(4 * len(COLUMNS), 3.4))
    for ax, (metric, label) in zip(axes, COLUMNS):
        base = results["base"]["few"][metric]
        ax.axhline(base, color="gray", ls="--", lw=1, label="base")
        for m, method in METHODS.items():
            runs = results["report"][m]["runs"]
            steps = sorted(int(s) for s in runs[0]["curve"])
            vals = np.array([[r["curve"][s][metric] for s in steps] for r in runs])
            steps = [0] + steps
            vals = np.concatenate([np.full((len(runs), 1), base), vals], axis=1)
            band(ax, steps, vals, method.name)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("training step")
    axes[0].legend(fontsize=8)
    return save_figure(fig, out / "curves.png", f"miniature world, {p.few_steps}-step samples (mean and range "
                       f"over seeds {list(p.seeds)})")


def band(ax, x, vals, label: str) -> None:
    """The mean over seeds (rows of `vals`) as a line, their range as a band."""
    ax.plot(x, vals.mean(0), marker="o", label=label)
    ax.fill_between(x, vals.min(0), vals.max(0), alpha=0.2)


def save_figure(fig, path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grids(scorer: Scorer, p: Protocol, results: dict, out: Path) -> list[Path]:
    from dopsd.sampling import sample_batch, save_grid

    sets = prompt_sets(p.report_world_seeds, 4, 4)
    loras = {m: results["report"][m]["final_lora"] for m in METHODS}
    paths = []
    for which, steps in (("concept", p.few_steps), ("retention", p.few_steps), ("concept", p.many_steps)):
        prompts, _ = sets[which]
        rows, cols = len(prompts), 4
        many = [q for q in prompts for _ in range(cols)]
        seeds = list(range(cols)) * rows
        blocks = []
        for lora in [None] + [loras[m] for m in METHODS]:
            t = scorer.transformer(Path(lora) if lora else None)
            blocks.append(sample_batch(scorer.backend, t, many, seeds, steps, scorer.size))
        path = save_grid(blocks, rows, out / f"grid_{which}_{steps}steps.png")
        (out / f"grid_{which}_{steps}steps.txt").write_text(
            "columns: base | " + " | ".join(m.name for m in METHODS.values()) + " (4 noise seeds each); rows:\n" + "\n".join(prompts) + "\n")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "world"))
    parser.add_argument("--work", default="", help="where training runs go (default: a temporary directory)")
    parser.add_argument("--smoke", action="store_true", help="a few steps, one seed, one lr (for tests)")
    parser.add_argument("--model", default=Protocol.model, help="base model directory (default: the shipped one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    p = replace(Protocol(**SMOKE) if args.smoke else Protocol(), model=args.model)

    import torch

    torch.set_num_threads(p.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_world_"))
    t_start = time.perf_counter()
    scorer = Scorer(p)
    sweep_sets = prompt_sets(p.sweep_world_seeds, p.concept_prompts, p.retention_prompts)
    report_sets = prompt_sets(p.report_world_seeds, p.concept_prompts, p.retention_prompts)
    base = scorer.transformer(None)
    results: dict = {"protocol": asdict(p), "base": {"few": scorer.score(base, report_sets, p.few_steps),
                                                    "many": scorer.score(base, report_sets, p.many_steps)},
                     "sweep": {}, "chosen_lr": {}, "report": {}, "train_seconds": {}}
    print("base:", json.dumps(results["base"]), flush=True)
    for method in METHODS:
        results["sweep"][method] = {}
        for lr in p.lrs:
            run_dir, _ = train(p, method, lr, p.sweep_seed, work)
            r = evaluate_run(scorer, p, run_dir, sweep_sets, curve=False)["few"]
            results["sweep"][method][f"{lr:g}"] = r
            print(f"sweep {method} lr {lr:g}:", json.dumps(r), flush=True)
        best = max(p.lrs, key=lambda lr: results["sweep"][method][f"{lr:g}"]["concept_texture"]
                   + results["sweep"][method][f"{lr:g}"]["retention_acc"])
        results["chosen_lr"][method] = best
        runs, seconds = [], []
        for seed in p.seeds:
            run_dir, secs = train(p, method, best, seed, work)
            r = evaluate_run(scorer, p, run_dir, report_sets, curve=True)
            r["seed"] = seed
            runs.append(r)
            seconds.append(secs)
            print(f"report {method} seed {seed}:", json.dumps({"few": r["few"], "many": r["many"]}), flush=True)
        results["report"][method] = {"runs": runs, "few": aggregate(runs, "few"), "many": aggregate(runs, "many"),
                                     "final_lora": str(work / f"{method}_lr{best:g}_seed{p.seeds[0]}" / "exports"
                                                       / "final")}
        results["train_seconds"][method] = float(np.mean(seconds))
    grids(scorer, p, results, out)
    plot(p, results, out)
    elapsed = time.perf_counter() - t_start
    table = write_table(p, results, out, elapsed)
    saved = json.loads(json.dumps(results, default=str))
    for m in METHODS:
        saved["report"][m].pop("final_lora")
    (out / "results.json").write_text(json.dumps(saved, indent=1) + "\n")
    return finish(table, work, keep=bool(args.work))


def finish(table: Path, work: Path, keep: bool) -> int:
    """Print the table; remove the training runs unless their directory was asked for (--work)."""
    print(table.read_text())
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
