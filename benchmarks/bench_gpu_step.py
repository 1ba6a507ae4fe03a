"""One D-OPSD LoRA step of a real-size Z-Image-Turbo DiT on a GPU: attention backends, kernels, compile, fused vs
separate dual forward, gradient checkpointing off and on; step time, its split, samples/s, peak memory, MFU.

    python benchmarks/bench_gpu_step.py [--repeats 3] [--resolution 1024] [--out benchmarks/results/gpu_step.md]
    python benchmarks/bench_gpu_step.py --tiny    # the same variants at a tiny size, fp32 (CPU: under a minute)

The DiT is `ZImageTransformer2DModel` with Z-Image-Turbo's published config (`ZIMAGE_TURBO`), random-init in bf16
(one network: the weights do not change the cost), LoRA rank 64 / alpha 128 on the recipe's targets with both
adapters (student + EMA teacher), K = 4 recipe sigmas, batch 1, cached encoder features (random, of the real
shapes: `--student-tokens` Qwen3 caption features, `--teacher-tokens` Qwen3-VL image + prompt features), AdamW,
clip 1.0, EMA 0.9999. The backend is dopsd's ZImageBackend around that network (no VAE, no encoders loaded).

Variants (`VARIANTS`), each with gradient checkpointing off and on, run interleaved (A B C ... A B C ...): round 0
is a warm-up (compiles), rounds 1..R are timed; every step restores the adapters and AdamW from one snapshot, so
all variants compute the same step (their losses are shown). A variant whose backend cannot run here (package
missing, no CUDA) is a row "skipped" with the reason. The compiled variants use the separate dual forward: the
fused one restates the blocks and never calls a compiled block (dopsd/models/compile.py).

FLOPs (benchmarks/flops.py): one step counted by FlopCounterMode with attention as math SDPA, on twins of the DiT
with 1 and 2 main layers (same width, tokens and adapters), extrapolated to the full depth (exact: the layers are
identical); checked against the analytic forward count. MFU = those FLOPs / median step time / the device's dense
bf16 peak (`PEAK_BF16`; none for other devices). Peak memory: torch.cuda.max_memory_allocated during the step.
Writes --out (markdown) and its .json; asserts nothing.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step  # noqa: E402  (sets the offline env and the repo path)
from flops import count_flops, zimage_forward_flops  # noqa: E402

from dopsd.adapters import STUDENT, TEACHER, add_lora_adapters  # noqa: E402
from dopsd.models.attention import AttentionUnavailable, apply_to_dit, resolve  # noqa: E402
from dopsd.models.compile import compile_blocks, uncompile_blocks  # noqa: E402
from dopsd.models.zimage import LORA_TARGETS, ZImageBackend  # noqa: E402
from dopsd.objectives import StepBatch, StepContext, dopsd_objective  # noqa: E402

# Tongyi-MAI/Z-Image-Turbo transformer/config.json (6.15B parameters); axes_lens does not change the cost.
ZIMAGE_TURBO = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30,
                    n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
                    rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
TINY = dict(ZIMAGE_TURBO, dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
            axes_dims=[16, 8, 8], axes_lens=[256, 64, 64])  # the test checkpoint's DiT (dopsd/models/zimage_tiny.py)
VAE_CONFIG = {"block_out_channels": [128, 256, 512, 512]}  # Z-Image's VAE: 8x downsampling
SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": False}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peak (SXM), FLOP/s

# name: (model.attention, kernels, compile, dual forward)
VARIANTS = {"sdpa": ("sdpa", False, False, "fused"), "sdpa/separate": ("sdpa", False, False, "separate"),
            "flash": ("flash", False, False, "fused"), "xformers": ("xformers", False, False, "fused"),
            "sdpa+kernels": ("sdpa", True, False, "fused"), "sdpa+compile/separate": ("sdpa", False, True, "separate"),
            "auto+kernels+compile/separate": ("auto", True, True, "separate")}
CUDA = torch.cuda.is_available()


def _no_part():
    return None  # the VAE and encoders are never loaded: features are cached


class Bench(bench_step.Bench):
    """The DiT with both adapters, AdamW, the EMA teacher and the cached contexts, shared by every variant; every
    step restores the adapters and AdamW from one snapshot (`bench_step.Bench.restore`)."""

    def __init__(self, config: dict, args, dtype: torch.dtype, device: torch.device):
        from diffusers import ZImageTransformer2DModel

        torch.manual_seed(0)
        with device:
            model = ZImageTransformer2DModel(**config).to(dtype)
        with torch.no_grad():  # created uninitialised by diffusers
            model.x_pad_token.normal_(std=0.02)
            model.cap_pad_token.normal_(std=0.02)
        self.backend = ZImageBackend(model, _no_part, None, None, SCHEDULER, Path("."), device,
                                     transformer_config=config, vae_config=VAE_CONFIG)
        self.model, self.dtype, self.device, self.args = model, dtype, device, args
        add_lora_adapters(model, args.lora_rank, 2 * args.lora_rank, LORA_TARGETS, "gaussian", with_teacher=True)
        from dopsd.teacher import EmaTeacher

        self.teacher = EmaTeacher.for_lora(model, decay=0.9999)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if f"lora_B.{STUDENT}" in name:
                    p.normal_(std=0.02)
        model.train()
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.shape = self.backend.latent_shape(1, args.resolution, args.resolution)
        self.sigmas = self.backend.sigmas(args.k, self.shape, schedule="recipe")
        gen = torch.Generator().manual_seed(1)
        feats = lambda n: [torch.randn(n, config["cap_feat_dim"], generator=gen).to(device, dtype)]  # noqa: E731
        self.c_s, self.c_t = feats(args.student_tokens), feats(args.teacher_tokens)
        self.images = torch.zeros(1, 3, args.resolution, args.resolution, device=device)  # unused (cached)
        self.adapters = [p for n, p in model.named_parameters() if f".{STUDENT}." in n or f".{TEACHER}." in n]
        self.snapshot = ([p.detach().clone() for p in self.adapters], copy.deepcopy(self.opt.state_dict()))

    def configure(self, attention, kernels: bool, compiled: bool, checkpointing: bool) -> None:
        from dopsd_kernels.patch import patch_zimage, unpatch

        apply_to_dit(self.model, attention)
        patch_zimage(self.model) if kernels else unpatch(self.model)
        if compiled:
            compile_blocks(self.backend, self.model, backend=self.args.compile_backend)
        else:
            uncompile_blocks(self.backend, self.model)
        self.model.enable_gradient_checkpointing() if checkpointing else self.model.disable_gradient_checkpointing()

    def objective_step(self, timer) -> float:
        """The D-OPSD objective with the configured dual forward and loss (bench_step.Bench.step does the rest:
        restore, optimizer, EMA, timing)."""
        loss_fn = {}
        if self.kernels:
            from dopsd_kernels import distill_loss

            loss_fn = {"loss_fn": distill_loss}
        autocast = (lambda: torch.autocast("cuda", torch.bfloat16)) if self.dtype == torch.bfloat16 and CUDA \
            else nullcontext
        ctx = StepContext(self.backend, self.model, self.teacher, timer=timer, dual_forward=self.dual,
                          autocast=autocast, **loss_fn)
        batch = StepBatch(["cached"], self.images, [torch.Generator().manual_seed(100)], self.sigmas, self.c_s,
                          self.c_t)
        return dopsd_objective(ctx, batch).loss

    def step(self, dual: str, kernels: bool) -> dict:
        self.dual, self.kernels = dual, kernels
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        out = super().step(GPU_STEP)
        return {**out, "loss": float(out["loss"]),
                "cuda_peak_bytes": torch.cuda.max_memory_allocated() if CUDA else None}


GPU_STEP = "gpu_step"
bench_step.STEPS[GPU_STEP] = lambda b, timer: b.objective_step(timer)  # what bench_step.Bench.step runs


def step_flops(config: dict, args, dtype, device) -> dict:
    """Counted FLOPs of one step (separate path, no checkpointing) at full depth, from 1- and 2-layer twins."""
    counts = {}
    for layers in (1, 2):
        b = Bench({**config, "n_layers": layers}, args, dtype, device)
        b.configure(resolve("sdpa", device), False, False, False)
        counts[layers] = count_flops(lambda: b.step("separate", False))[0]
        with torch.no_grad():
            forward = count_flops(lambda: b.backend.velocity(b.model, torch.zeros(b.shape, device=device), 0.5,
                                                             b.c_t))[0]
        del b
    per_layer = counts[2] - counts[1]
    tokens = (args.resolution // 16) ** 2  # 8x VAE, 2x2 patches
    analytic = {role: zimage_forward_flops(config, tokens, n, 1, args.lora_rank)
                for role, n in (("teacher", args.teacher_tokens), ("student", args.student_tokens))}
    return {"step": counts[1] + (config["n_layers"] - 1) * per_layer, "per_main_layer": per_layer,
            "analytic_forward": analytic, "counted_teacher_forward_2_layers": forward,
            "analytic_teacher_forward_2_layers": zimage_forward_flops({**config, "n_layers": 2}, tokens,
                                                                      args.teacher_tokens, 1, args.lora_rank)}


def run(args, write) -> dict:
    device = torch.device("cuda" if CUDA else "cpu")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    config = TINY if args.tiny else ZIMAGE_TURBO
    name = torch.cuda.get_device_name(0) if CUDA else "CPU"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None) if dtype == torch.bfloat16 else None
    res = {"device": name, "torch": torch.__version__, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(["python", *sys.argv]), "args": vars(args), "dtype": str(dtype), "config": config,
           "peak_flops": peak, "flops": step_flops(config, args, dtype, device), "variants": {}}
    b = Bench(config, args, dtype, device)
    res["params"], res["trainable"] = sum(p.numel() for p in b.model.parameters()), sum(p.numel() for p in b.params)
    write(res)
    rows = {}
    for vname, (attn, kernels, compiled, dual) in VARIANTS.items():
        for ckpt in (False, True):
            row = f"{vname} ckpt={'on' if ckpt else 'off'}"
            try:
                attention = resolve(attn, device, dtype, masked=True)
                if kernels and not CUDA:
                    raise AttentionUnavailable("dopsd_kernels: Triton kernels need CUDA (on CPU only the "
                                               "interpreter runs them, which is no speed measurement)")
                rows[row] = dict(spec=(attention, kernels, compiled, ckpt, dual), runs=[], attention=attention.dit)
            except AttentionUnavailable as e:
                res["variants"][row] = {"skipped": str(e)}
    for r in range(args.repeats + 1):
        for row, v in rows.items():
            attention, kernels, compiled, ckpt, dual = v["spec"]
            try:
                b.configure(attention, kernels, compiled, ckpt)
                v["runs"].append(b.step(dual, kernels))
            except Exception as e:  # a backend that imports but fails on this device: report, go on
                res["variants"][row] = {"skipped": f"failed: {type(e).__name__}: {str(e)[:300]}"}
                v["runs"] = None
            print(f"round {r} {row}: " + (f"{v['runs'][-1]['step_s']:.3f} s" if v["runs"] else "failed"), flush=True)
        rows = {k: v for k, v in rows.items() if v["runs"] is not None}
        for row, v in rows.items():
            res["variants"][row] = summary(v, res)
        write(res)  # after every round: a run stopped by its time limit keeps what it measured
    return res


def summary(v: dict, res: dict) -> dict:
    """One variant's figures over its timed steps (round 0, the warm-up, excluded)."""
    timed = v["runs"][1:]
    if not timed:
        return {"skipped": "warm-up only (the run ended before a timed round)"}
    steps = [x["step_s"] for x in timed]
    med, peak = statistics.median(steps), res["peak_flops"]
    peaks = [x["cuda_peak_bytes"] for x in timed if x["cuda_peak_bytes"] is not None]
    return {"attention": v["attention"], "median_s": med, "min_s": min(steps), "steps_s": steps,
            "phases_median_s": {p: statistics.median(x["phases"].get(p, 0.0) for x in timed)
                                for p in bench_step.PHASES if any(p in x["phases"] for x in timed)},
            "samples_per_s": 1 / med, "cuda_peak_bytes": max(peaks) if peaks else None,
            "mfu": res["flops"]["step"] / med / peak if peak else None,
            "loss": timed[0]["loss"], "grad_norm": timed[0]["grad_norm"]}


def markdown(res: dict) -> str:
    a, f = res["args"], res["flops"]
    lines = [f"# One D-OPSD LoRA step, Z-Image DiT{' (tiny)' if a['tiny'] else ''}, {res['device']}", "",
             f"`{res['command']}` ({res['date']}, torch {res['torch']}, {res['dtype']}): DiT {res['params'] / 1e6:.1f}M "
             f"parameters ({res['trainable'] / 1e6:.2f}M trainable, both adapters), {a['resolution']}² image, batch 1, "
             f"K = {a['k']}, LoRA rank {a['lora_rank']}, cached features ({a['student_tokens']} student / "
             f"{a['teacher_tokens']} teacher tokens); {a['repeats']} timed rounds after a warm-up, interleaved. "
             f"Methods: the script's docstring.", "",
             f"DiT FLOPs per step (counted, math attention): {f['step'] / 1e12:.4g} TFLOP; analytic forward teacher "
             f"{f['analytic_forward']['teacher'] / 1e12:.4g} / student {f['analytic_forward']['student'] / 1e12:.4g} "
             f"TFLOP; 2-layer twin teacher forward counted {f['counted_teacher_forward_2_layers']} vs analytic "
             f"{f['analytic_teacher_forward_2_layers']}. " + (f"Peak {res['peak_flops'] / 1e12:.0f} TFLOP/s bf16."
                                                              if res["peak_flops"] else
                                                              "No bf16 peak known for this device and dtype: no MFU."),
             ""]
    phases = [p for p in bench_step.PHASES if any(p in v.get("phases_median_s", {}) for v in res["variants"].values())]
    head = ["variant", "attention", "median s", "min s", "samples/s", "MFU", *phases, "peak MiB", "loss"]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, v in res["variants"].items():
        if "skipped" in v:
            lines.append(f"| {name} | skipped: {v['skipped']} |" + " |" * (len(head) - 2))
            continue
        cells = [name, v["attention"], f"{v['median_s']:.3f}", f"{v['min_s']:.3f}", f"{v['samples_per_s']:.3f}",
                 f"{v['mfu']:.1%}" if v["mfu"] is not None else "-",
                 *(f"{v['phases_median_s'].get(p, 0):.3f}" for p in phases),
                 bench_step._mib(v["cuda_peak_bytes"]) if v["cuda_peak_bytes"] else "-", f"{v['loss']:.6g}"]
        lines.append("| " + " | ".join(cells) + " |")
    best = max((v["mfu"] for v in res["variants"].values() if v.get("mfu")), default=None)
    if best is not None:
        lines += ["", f"Best MFU {best:.1%} (target >= 40%: {bench_step._met(best >= 0.4)})."]
    return "\n".join(lines + [""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny DiT in fp32 (CI, CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=None, help="default 1024 (--tiny: 32)")
    ap.add_argument("--lora-rank", type=int, default=None, help="default 64 (--tiny: 4)")
    ap.add_argument("--student-tokens", type=int, default=None, help="default 160 (--tiny: 20)")
    ap.add_argument("--teacher-tokens", type=int, default=None,
                    help="default 736: 576 image tokens of a 768² image + 160 (--tiny: 40)")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; --tiny on "
                    "CPU: aot_eager, as inductor's C++ build takes minutes there)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default); 1 keeps a "
                    "shared box's neighbours from stalling the run")
    ap.add_argument("--out", default=None, help="default benchmarks/results/gpu_step[_tiny].md")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for key, real, tiny in (("resolution", 1024, 32), ("lora_rank", 64, 4), ("student_tokens", 160, 20),
                            ("teacher_tokens", 736, 40)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else real)
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.tiny and not CUDA else "inductor"
    out = Path(args.out or f"benchmarks/results/gpu_step{'_tiny' if args.tiny else ''}.md")
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(res: dict) -> None:
        out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
        out.write_text(markdown(res))
        print(f"wrote {out} and {out.with_suffix('.json')}", flush=True)

    run(args, write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
