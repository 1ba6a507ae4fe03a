"""One D-OPSD LoRA training step four ways: the authors' loop vs dopsd's separate, fused, fused + cached.

    python benchmarks/bench_step.py [--sizes tiny mid] [--repeats 5] [--k 4] [--resolution 64 [96]]
        [--batch 2] [--lora-rank 16] [--threads N] [--zero] [--out benchmarks/results/step_cpu.md]

official: the authors' Z-Image LoRA step (reference/paper.md section 0), written out below: text encoder, VLM
and a VAE encode of the target every step, K teacher + K student forwards as separate calls, ONE backward of
the mean loss at the end (all K student graphs alive), clip 1.0, AdamW, EMA. separate / fused:
`dopsd_objective` with that `dual_forward` (per-step backward). fused+cached: fused, with both contexts
computed once beforehand (as cached features in shards). Only the loop differs: per size one backend
(dopsd's loading), one AdamW and one EMA teacher serve all variants; every step first restores the adapters
and the optimizer state from one snapshot and uses the same noise seeds, so losses and gradient norms must
agree (shown, not asserted). Variants run interleaved (A B C D A B C D ...) so machine noise hits them alike;
round 0 is a warm-up and probe, rounds 1..R are timed. `--resolution`: one value, or one per size.

Memory: peak RSS cannot be split among interleaved variants, so the untimed probe step sums the storages of
the tensors autograd saves for the backward (saved_tensors_hooks; the model's parameters excluded) while they
live: the peak is where one backward through K graphs and K per-step backwards differ (transient forward
buffers are not in it). On CUDA, torch.cuda.max_memory_allocated above the step's start too. The probe also
counts passes: DiT calls (layer 0's attention.to_q: one per role when separate, one for both when fused),
backward passes reaching the student adapter, encoder passes (text encoder, VLM vision tower, VAE encoder).

--zero: all-gathers per step under 2-rank ZeRO-3, separate and fused, by benchmarks/zero_gathers.py (real
`deepspeed` launches of the trainer, batch 1 per rank); not for the official loop (its forwards are the
separate path's calls). Writes --out (markdown) and its .json; asserts nothing.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dopsd.adapters import STUDENT, TEACHER, add_lora_adapters, set_active_adapter  # noqa: E402
from dopsd.config import ModelConfig  # noqa: E402
from dopsd.metrics import StepTimer  # noqa: E402
from dopsd.models import load_backend  # noqa: E402
from dopsd.objectives import StepBatch, StepContext, dopsd_objective, per_sample_randn  # noqa: E402
from dopsd.teacher import EmaTeacher  # noqa: E402


# the ZeRO-3 gather measurement (imported by path, as tests/test_zero_gathers.py does), and its model sizes
_spec = importlib.util.spec_from_file_location("zero_gathers", REPO / "benchmarks" / "zero_gathers.py")
zg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zg)
SIZES = zg.SIZES
VARIANTS = ("official", "separate", "fused", "fused+cached")
PHASES = ("encode", "teacher", "student", "forward", "backward", "optimizer", "ema")
DIT_PHASES = ("teacher", "student", "forward", "backward")  # the DiT's passes: what the floor is made of
PROMPTS = ["a photo of [V] ball", "a [V] ball with red stripes on a green background, seen from above"]
CUDA = torch.cuda.is_available()


def official_step(b: "Bench", timer) -> float:
    """The authors' loop: encoders every step, 2K separate forwards, one backward of the mean of K losses."""
    be, model, sigmas = b.backend, b.model, b.sigmas
    k_steps = len(sigmas) - 1
    with timer("encode"), torch.no_grad():
        c_s = be.encode_student(b.prompts)
        c_t = be.encode_teacher(b.prompts, b.images)
        be.encode_images(b.images)  # the released script VAE-encodes the target; the latent is never used
    x = per_sample_randn(b.shape, b.generators(), be.device)  # the script draws fresh noise; seeded here
    loss = 0.0
    for k in range(k_steps):
        s, s_next = sigmas[k], sigmas[k + 1]
        x = x.detach()
        with timer("teacher"), torch.no_grad():
            set_active_adapter(model, TEACHER)
            v_t = be.velocity(model, x, s, c_t)
            set_active_adapter(model, STUDENT)
        with timer("student"):
            v_s = be.velocity(model, x, s, c_s)
        loss = loss + F.mse_loss(x - s * v_s, (x - s * v_t).detach())  # x0 space
        x = x + (s_next - s) * v_s
    loss = loss / k_steps
    with timer("backward"):
        loss.backward()  # through all K student graphs, held until now
    return loss.item()


def dopsd_step(b: "Bench", timer, dual: str, cached: bool) -> float:
    ctx = StepContext(b.backend, b.model, b.teacher, timer=timer, dual_forward=dual)
    batch = StepBatch(b.prompts, b.images, b.generators(), b.sigmas, student_context=b.c_s if cached else None,
                      teacher_context=b.c_t if cached else None)
    return dopsd_objective(ctx, batch).loss


STEPS = {"official": official_step,
         "separate": lambda b, t: dopsd_step(b, t, "separate", False),
         "fused": lambda b, t: dopsd_step(b, t, "fused", False),
         "fused+cached": lambda b, t: dopsd_step(b, t, "fused", True)}


class Probe:
    """For one untimed step: peak bytes autograd holds for the backward, and the passes (see the docstring)."""

    def __init__(self, b: "Bench"):
        self.params = {p.untyped_storage().data_ptr() for p in b.model.parameters()}
        self.live: dict[int, list[int]] = {}  # storage -> [saved tensors holding it, bytes]
        self.bytes = self.peak = 0
        self.calls = Counter()
        be, to_q = b.backend, b.model.layers[0].attention.to_q
        count = lambda name: (lambda *_: self.calls.update([name]))  # noqa: E731
        self.handles = [to_q.register_forward_pre_hook(count("dit_calls")),
                        to_q.lora_B[STUDENT].weight.register_hook(count("backward_passes")),
                        be.text_encoder.register_forward_pre_hook(count("text_encoder")),
                        be.teacher_encoder()[0].model.visual.register_forward_pre_hook(count("vlm")),
                        be.vae.encoder.register_forward_pre_hook(count("vae_encoder"))]
        self.saved = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda h: h.tensor)

    def pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params:
            entry = self.live.setdefault(ptr, [0, t.untyped_storage().nbytes()])
            if entry[0] == 0:
                self.bytes += entry[1]
                self.peak = max(self.peak, self.bytes)
            entry[0] += 1
        return _Held(self, ptr, t)

    def __enter__(self):
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.cuda_start = torch.cuda.memory_allocated()
        self.saved.__enter__()
        return self

    def __exit__(self, *exc):
        self.saved.__exit__(*exc)
        for h in self.handles:
            h.remove()
        self.cuda_peak = torch.cuda.max_memory_allocated() - self.cuda_start if CUDA else None


class _Held:
    """A saved tensor as autograd keeps it: its release (graph freed) is seen by __del__."""

    def __init__(self, probe: Probe, ptr: int, tensor: torch.Tensor):
        self.probe, self.ptr, self.tensor = probe, ptr, tensor

    def __del__(self):  # autograd let go of it (backward done, or graph dropped)
        entry = self.probe.live.get(self.ptr)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.probe.bytes -= entry[1]
                del self.probe.live[self.ptr]


class Bench:
    """One model size: backend, both adapters, AdamW and the EMA teacher, shared by every variant."""

    def __init__(self, model_dir: Path, batch: int, resolution: int, k: int, rank: int, device: str):
        torch.manual_seed(0)
        px = resolution * resolution
        self.backend = be = load_backend(ModelConfig(path=str(model_dir), teacher_min_pixels=px,
                                                     teacher_max_pixels=px), device=device)
        self.model = be.transformer
        add_lora_adapters(self.model, rank, 2 * rank, be.lora_targets, "gaussian", with_teacher=True)
        self.teacher = EmaTeacher.for_lora(self.model, decay=0.9999)
        with torch.no_grad():  # a student some way from its teacher (at B = 0 both are the base model)
            for name, p in self.model.named_parameters():
                if f"lora_B.{STUDENT}" in name:
                    p.normal_(std=0.02)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.adapters = [p for n, p in self.model.named_parameters() if f".{STUDENT}." in n or f".{TEACHER}." in n]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        self.prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        images = torch.rand(batch, 3, resolution, resolution, generator=torch.Generator().manual_seed(1))
        self.images = images.to(device)
        self.shape = be.latent_shape(batch, resolution, resolution)
        self.sigmas = be.sigmas(k, self.shape, schedule="recipe")
        with torch.no_grad():  # what cached features would hold (also loads both encoders)
            self.c_s, self.c_t = be.encode_student(self.prompts), be.encode_teacher(self.prompts, self.images)
        self.step("separate", restore=False)  # AdamW gets its moments; every measured step starts from here
        self.snapshot = ([p.detach().clone() for p in self.adapters], copy.deepcopy(self.opt.state_dict()))

    def generators(self) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(100 + i) for i in range(len(self.prompts))]

    def restore(self) -> None:
        with torch.no_grad():
            for p, saved in zip(self.adapters, self.snapshot[0]):
                p.copy_(saved)  # the EMA's float32 shadows are these tensors themselves
        self.opt.load_state_dict(copy.deepcopy(self.snapshot[1]))  # load aliases what it is given

    def step(self, variant: str, restore: bool = True, probe: bool = False) -> dict:
        if restore:
            self.restore()
        self.opt.zero_grad(set_to_none=True)
        timer = StepTimer(sync_cuda=CUDA)
        watch = Probe(self) if probe else None
        with watch or nullcontext(), timer("step"):
            loss = STEPS[variant](self, timer)
            with timer("optimizer"):
                norm = float(torch.nn.utils.clip_grad_norm_(self.params, 1.0))
                self.opt.step()
            with timer("ema"):
                self.teacher.update()
        phases = timer.reset()
        out = {"step_s": phases.pop("step"), "phases": phases, "loss": loss, "grad_norm": norm}
        if watch:
            out.update(saved_peak_bytes=watch.peak, cuda_peak_bytes=watch.cuda_peak, calls=dict(watch.calls))
        return out


def bench_size(size: str, model_dir: Path, args, resolution: int) -> dict:
    b = Bench(model_dir, args.batch, resolution, args.k, args.lora_rank, "cuda" if CUDA else "cpu")
    runs = {v: [] for v in VARIANTS}  # per variant: round 0 (warm-up + probe, not timed), then the timed ones
    for r in range(args.repeats + 1):
        for v in VARIANTS:
            runs[v].append(b.step(v, probe=r == 0))
            print(f"{size} round {r} {v}: {runs[v][-1]['step_s']:.3f} s loss {runs[v][-1]['loss']:.6g}", flush=True)
    out = {"params": sum(p.numel() for p in b.model.parameters()), "trainable": sum(p.numel() for p in b.params),
           "latent_shape": list(b.shape), "resolution": resolution, "sigmas": b.sigmas, "variants": {}}
    for v, (probe, *timed) in runs.items():
        steps = [x["step_s"] for x in timed]
        out["variants"][v] = {
            "median_s": statistics.median(steps), "min_s": min(steps), "steps_s": steps,
            "phases_median_s": {p: statistics.median(x["phases"].get(p, 0.0) for x in timed) for p in PHASES},
            "samples_per_s": args.batch / statistics.median(steps),
            "dit_share": statistics.median(sum(x["phases"].get(p, 0.0) for p in DIT_PHASES) / x["step_s"]
                                           for x in timed),
            **{key: probe[key] for key in ("loss", "grad_norm", "saved_peak_bytes", "cuda_peak_bytes", "calls")}}
    return out


def zero_size(model_dir: Path, work: Path, resolution: int, args) -> dict:
    from dopsd.data.synthetic import write_concept_folder

    data = write_concept_folder(work / f"data-{resolution}", count=4, size=resolution, seed=0)
    out = {}
    for dual in ("separate", "fused"):
        t0 = time.time()
        s = zg.run(model_dir, data, work, steps=args.zero_steps, resolution=resolution, rollout_steps=args.k,
                   lora_rank=args.lora_rank, dual_forward=dual, timeout=1800)
        keys = ("gathered", "gathered_bytes", "gather_calls", "models")
        out[dual] = {**{k: s["step"][k] for k in keys}, "forward_params": s["forward_params"],
                     "phases": {p: {k: row[k] for k in (*keys, "calls_per_step")} for p, row in s["phases"].items()},
                     "launch_s": time.time() - t0, "steady_steps": s["steady_steps"]}
        print(f"zero3 {model_dir.name} {dual}: {s['step']['gathered_bytes'] / 2 ** 20:.1f} MiB, "
              f"{s['step']['gather_calls']:.0f} gathers per step", flush=True)
    out["fused_over_separate_bytes"] = out["fused"]["gathered_bytes"] / out["separate"]["gathered_bytes"]
    return out


def _mib(x: float) -> str:
    return f"{x / 2 ** 20:.1f}"


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def markdown(res: dict) -> str:
    a, k = res["args"], res["args"]["k"]
    lines = [f"# One D-OPSD LoRA step: the authors' loop vs dopsd ({res['device']})", "",
             f"`{res['command']}` ({res['date']}, torch {res['torch']}, {res['threads']} threads): fp32, batch "
             f"{a['batch']}, K = {k}, LoRA rank {a['lora_rank']} / alpha {2 * a['lora_rank']}, recipe sigmas, EMA "
             f"0.9999, AdamW 1e-4, clip 1.0; {a['repeats']} timed rounds of the 4 variants interleaved after a warm-up"
             " and probe round. Phase columns: each phase's median, in s. Loss, grad norm, memory and passes: the "
             "probe step. Methods: the script's docstring.", ""]
    head = ["variant", "median s", "min s", "samples/s", "x official", *PHASES, "loss", "grad norm",
            "saved peak MiB", *(["CUDA peak MiB"] if CUDA else [])]
    targets = ["## Targets", ""]
    for size, r in res["sizes"].items():
        v = r["variants"]
        lines += [f"## {size}: DiT {r['params'] / 1e6:.1f}M parameters with both adapters ({r['trainable'] / 1e6:.2f}M "
                  f"trainable), {r['resolution']}² images, latent {r['latent_shape']}", "",
                  "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for name, x in v.items():
            ph = [f"{x['phases_median_s'][p]:.3f}" if x["phases_median_s"][p] else "-" for p in PHASES]
            cells = [name, f"{x['median_s']:.3f}", f"{x['min_s']:.3f}", f"{x['samples_per_s']:.3f}",
                     f"{v['official']['median_s'] / x['median_s']:.2f}", *ph, f"{x['loss']:.7g}",
                     f"{x['grad_norm']:.6g}", _mib(x["saved_peak_bytes"]),
                     *([_mib(x["cuda_peak_bytes"])] if CUDA else [])]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Passes per step; the floor is {k} teacher forwards + {k} student forwards + {k} student "
                  "backwards and nothing else. DiT share: the share of the step spent in those passes (teacher + "
                  "student + forward + backward phases; median over the timed steps).",
                  "", "| variant | DiT calls | backward passes | text encoder | VLM | VAE encoder | DiT share |",
                  "|---|---|---|---|---|---|---|"]
        for name, x in v.items():
            c = x["calls"]
            counts = [c.get(n, 0) for n in ("dit_calls", "backward_passes", "text_encoder", "vlm", "vae_encoder")]
            lines.append(f"| {name} | " + " | ".join(map(str, counts)) + f" | {x['dit_share']:.0%} |")
        speed = v["fused+cached"]["samples_per_s"] / v["official"]["samples_per_s"]
        mem, sep = v["fused+cached"]["saved_peak_bytes"], v["separate"]["saved_peak_bytes"]
        drift = max(abs(x["loss"] / v["official"]["loss"] - 1) for x in v.values())
        targets.append(f"- {size}: fused+cached samples/s {speed:.2f}x official (target >= 2: {_met(speed >= 2)}); "
                       f"saved-tensor peak {_mib(mem)} MiB vs separate {_mib(sep)} MiB (target: not above: "
                       f"{_met(mem <= sep)}; official: {v['official']['saved_peak_bytes'] / sep:.2f}x separate); "
                       f"largest relative loss difference from official {drift:.1e}")
        z = res["zero"].get(size)
        if z:
            lines += ["", f"ZeRO-3, 2 ranks, per training step and rank, mean of {z['separate']['steady_steps']} "
                      "steady steps (benchmarks/zero_gathers.py, batch 1 per rank; models = gathered elements / "
                      "the parameters one forward uses, base + one adapter):", "",
                      "| path | phase | calls/step | all-gather MiB per call | all-gathers per call | models |",
                      "|---|---|---|---|---|---|"]
            for d in ("separate", "fused"):
                lines += [f"| {d} | {p} | {g['calls_per_step']:.0f} | {_mib(g['gathered_bytes'])} | "
                          f"{g['gather_calls']:.0f} | {g['models']:.2f} |" for p, g in z[d]["phases"].items()]
                lines.append(f"| {d} | **step** | | **{_mib(z[d]['gathered_bytes'])}** | "
                             f"**{z[d]['gather_calls']:.0f}** | {z[d]['models']:.2f} |")
            ratio = z["fused_over_separate_bytes"]
            targets[-1] += f"; ZeRO-3 all-gather bytes fused/separate {ratio:.2f} (target <= 0.6: {_met(ratio <= 0.6)})"
        lines.append("")
        targets[-1] += "."
    return "\n".join(lines + targets + [""])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=sorted(SIZES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--resolution", type=int, nargs="+", default=[64], help="one value, or one per size")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); on a shared box "
                    "1 thread keeps a neighbour's job from stalling both of ours")
    ap.add_argument("--zero", action="store_true", help="also measure ZeRO-3 all-gathers (deepspeed launches)")
    ap.add_argument("--zero-steps", type=int, default=3, help="trainer steps per launch (the first is skipped)")
    ap.add_argument("--out", default="benchmarks/results/step_cpu.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    resolutions = dict(zip(args.sizes, args.resolution * len(args.sizes)))  # one value for all, or one each
    if len(args.resolution) not in (1, len(args.sizes)):
        ap.error("--resolution: one value, or one per size")
    from dopsd.models.zimage_tiny import make_tiny_zimage

    cpu = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    device = torch.cuda.get_device_name(0) if CUDA else cpu
    res = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(["python", *sys.argv]), "args": vars(args), "sizes": {}, "zero": {}}
    work = Path(tempfile.mkdtemp(prefix="dopsd-bench-step-"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:  # after every part: a long run stopped midway keeps what it measured
        out.with_suffix(".json").write_text(json.dumps(res, indent=1))
        out.write_text(markdown(res))
        print(f"wrote {out} and {out.with_suffix('.json')}", flush=True)

    try:
        for size in args.sizes:
            model_dir = make_tiny_zimage(work / f"zimage-{size}", seed=0, **SIZES[size])
            res["sizes"][size] = bench_size(size, model_dir, args, resolutions[size])
            write()
            if args.zero:
                res["zero"][size] = zero_size(model_dir, work, resolutions[size], args)
                write()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
