"""Speed and memory of every dopsd_kernels op vs eager PyTorch and vs torch.compile, on a GPU.

    python benchmarks/bench_kernels.py                        # all ops, Z-Image and FLUX.2-klein sizes, bf16
    python benchmarks/bench_kernels.py --out results.csv --models zimage --reps 50
    python benchmarks/bench_kernels.py --cpu-smoke            # tiny shapes in the Triton interpreter (tests the script)

For each op and implementation (`triton`: the dopsd_kernels op; `eager`: its reference in
dopsd_kernels.reference, i.e. what diffusers runs; `compile`: torch.compile of that reference) it records the
median forward time (autograd on, as in training), backward time (gradients of every input), full
forward+backward time, and the peak memory a full step adds on top of its inputs. Figures go to a CSV
(`--out`, default benchmarks/results/kernels_<device>.csv) with the device name and library versions, and a
table to stdout. Nothing is asserted. Without CUDA (and without --cpu-smoke) it prints a message and exits 0.

Sizes: Z-Image-Turbo (hidden 3840, 30 heads x 128, 4096 image tokens + 256 text tokens, 1024^2 latents
16x128x128); FLUX.2-klein (hidden 3072, 24 heads x 128, 4096 image + 512 text tokens, latents 128x64x64).
"""
from __future__ import annotations

import argparse
import csv
import functools
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SIZES = {
    # batch, image tokens, text tokens, hidden, heads, latent (C, H, W)
    "zimage": dict(batch=2, img=4096, txt=256, dim=3840, heads=30, latent=(16, 128, 128)),
    "flux2": dict(batch=2, img=4096, txt=512, dim=3072, heads=24, latent=(128, 64, 64)),
}
SMOKE = {
    "zimage": dict(batch=2, img=24, txt=9, dim=48, heads=2, latent=(4, 6, 10)),
    "flux2": dict(batch=2, img=24, txt=9, dim=40, heads=2, latent=(8, 5, 5)),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="CSV path (default benchmarks/results/kernels_<device>.csv)")
    p.add_argument("--models", nargs="+", default=["zimage", "flux2"], choices=sorted(SIZES))
    p.add_argument("--ops", nargs="*", default=None, help="only these op names (default: all)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch", type=int, default=None, help="override the batch size")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: the default mode)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny shapes through the Triton interpreter on CPU (checks the script; timings meaningless)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- cases
def make_cases(model: str, size: dict, device, dtype, K, R):
    """(op name, shape string, make_inputs() -> list of leaf tensors, triton fn, eager fn)."""
    import torch

    b, t, d, h = size["batch"], size["img"] + size["txt"], size["dim"], size["heads"]
    hd = d // h
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0, shift=0.0, dt=dtype, grad=True):
        x = (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * scale + shift).to(dt)
        return x.requires_grad_(grad)

    cases = []
    if model == "zimage":
        eps = 1e-5
        cases += [
            ("rms_norm_modulated", f"x({b},{t},{d}) scale({b},{d})",
             lambda: [rnd(b, t, d), rnd(d, scale=0.1, shift=1.0), rnd(b, d, scale=0.3)],
             lambda x, w, s: K.rms_norm_modulated(x, w, s, eps), lambda x, w, s: R.rms_norm_modulated(x, w, s, eps)),
            ("gated_rms_norm_residual+next", f"x,y({b},{t},{d})",
             lambda: [rnd(b, t, d), rnd(b, t, d), rnd(d, scale=0.1, shift=1.0), rnd(b, d), rnd(d, scale=0.1, shift=1.0),
                      rnd(b, d, scale=0.3)],
             lambda *a: K.gated_rms_norm_residual(*a, eps=eps), lambda *a: R.gated_rms_norm_residual(*a, eps=eps)),
            ("gated_rms_norm_residual", f"x,y({b},{t},{d})",
             lambda: [rnd(b, t, d), rnd(b, t, d), rnd(d, scale=0.1, shift=1.0), rnd(b, d)],
             lambda *a: K.gated_rms_norm_residual(*a, eps=eps), lambda *a: R.gated_rms_norm_residual(*a, eps=eps)),
            ("qk_rms_norm", f"q({b},{t},{h},{hd})",
             lambda: [rnd(b, t, h, hd), rnd(hd, scale=0.1, shift=1.0)],
             lambda q, w: K.rms_norm_modulated(q, w, None, eps), lambda q, w: R.rms_norm_modulated(q, w, None, eps)),
        ]
        ang = torch.rand(b, t, hd // 2, generator=gen, device=device) * 100
        freqs = torch.polar(torch.ones_like(ang), ang)
        cases.append(("rope_apply", f"q({b},{t},{h},{hd})", lambda: [rnd(b, t, h, hd)],
                      lambda q: K.rope_apply(q, freqs), lambda q: R.rope_apply(q, freqs)))
        cases.append(("final_layer_norm_modulated", f"x({b},{size['img']},{d})",
                      lambda: [rnd(b, size["img"], d), rnd(b, d, scale=0.3)],
                      lambda x, s: K.layer_norm_modulated(x, s, None, 1e-6),
                      lambda x, s: R.layer_norm_modulated(x, s, None, 1e-6)))
        space = "x0"
    else:
        eps = 1e-6
        cases += [
            ("layer_norm_modulated", f"x({b},{t},{d})",
             lambda: [rnd(b, t, d), rnd(b, 1, d, scale=0.3), rnd(b, 1, d)],
             lambda x, s, sh: K.layer_norm_modulated(x, s, sh, eps),
             lambda x, s, sh: R.layer_norm_modulated(x, s, sh, eps)),
            ("gated_residual_layer_norm", f"x,y({b},{size['img']},{d})",
             lambda: [rnd(b, size["img"], d), rnd(b, size["img"], d), rnd(b, 1, d), rnd(b, 1, d, scale=0.3),
                      rnd(b, 1, d)],
             lambda *a: K.gated_residual_layer_norm(*a, eps=eps), lambda *a: R.gated_residual_layer_norm(*a, eps=eps)),
            ("gated_residual", f"x,y({b},{t},{d})",
             lambda: [rnd(b, t, d), rnd(b, t, d), rnd(b, 1, d)],
             lambda x, y, g: K.gated_residual_layer_norm(x, y, g, norm=False),
             lambda x, y, g: R.gated_residual_layer_norm(x, y, g, norm=False)),
        ]
        space = "v"
    c, hh, ww = size["latent"]
    sig = torch.linspace(1.0, 0.5, b, device=device)
    x_lat = rnd(b, c, hh, ww, dt=torch.float32, grad=False)
    cases.append((f"distill_loss_{space}", f"v({b},{c},{hh},{ww})",
                  lambda: [rnd(b, c, hh, ww), rnd(b, c, hh, ww, grad=False)],
                  lambda vs, vt: K.distill_loss(x_lat, vs, vt, sig, space),
                  lambda vs, vt: R.distill_loss(x_lat, vs, vt, sig, space)))
    return cases


# ---------------------------------------------------------------------------------------------- timing
class Timer:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def sync(self):
        if self.cuda:
            import torch
            torch.cuda.synchronize()

    def measure(self, fn) -> float:
        """Milliseconds of one call of fn."""
        import torch

        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def bench_one(make_inputs, fn, timer: Timer, reps: int, warmup: int, device):
    import torch

    inputs = make_inputs()
    live = [t for t in inputs if t.requires_grad]

    def forward():
        out = fn(*inputs)
        return out if isinstance(out, tuple) else (out,)

    grads = [torch.randn_like(o) for o in forward()]

    def backward(outs):
        torch.autograd.grad(outs, live, grads, allow_unused=True)

    for _ in range(warmup):
        backward(forward())
    timer.sync()
    fwd, bwd, full = [], [], []
    for _ in range(reps):
        fwd.append(timer.measure(forward))
        outs = forward()
        timer.sync()
        bwd.append(timer.measure(functools.partial(backward, outs)))
        outs = None
        full.append(timer.measure(lambda: backward(forward())))
    peak_mb = float("nan")
    if timer.cuda:
        timer.sync()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        backward(forward())
        timer.sync()
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    return statistics.median(fwd), statistics.median(bwd), statistics.median(full), peak_mb


# ---------------------------------------------------------------------------------------------- main
def device_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before dopsd_kernels is imported
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print("bench_kernels: no CUDA device here, nothing measured. The Triton kernels need a GPU for timings; "
              "run this script on one (or pass --cpu-smoke to exercise it in the Triton interpreter).")
        return 0
    import triton

    import dopsd_kernels as K
    from dopsd_kernels import reference as R

    cuda = not args.cpu_smoke
    device = torch.device("cuda" if cuda else "cpu")
    device_name = torch.cuda.get_device_name(device) if cuda else f"cpu-interpreter ({platform.processor() or 'cpu'})"
    dtype = getattr(torch, args.dtype)
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"kernels_{device_slug(device_name)}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    reps, warmup = (max(1, min(args.reps, 2)), min(args.warmup, 1)) if args.cpu_smoke else (args.reps, args.warmup)
    timer = Timer(cuda)
    use_compile = not args.no_compile and not args.cpu_smoke

    rows = []
    for model in args.models:
        size = dict((SMOKE if args.cpu_smoke else SIZES)[model])
        if args.batch:
            size["batch"] = args.batch
        for op, shape, make_inputs, fn_k, fn_e in make_cases(model, size, device, dtype, K, R):
            if args.ops and op not in args.ops:
                continue
            impls = [("triton", fn_k), ("eager", fn_e)]
            if use_compile:
                impls.append(("compile", torch.compile(fn_e, mode=args.compile_mode, dynamic=False)))
            results = {}
            for impl, fn in impls:
                try:
                    f, b, full, mem = bench_one(make_inputs, fn, timer, reps, warmup, device)
                    err = ""
                except Exception as e:  # a failing baseline must not stop the table
                    f = b = full = mem = float("nan")
                    err = f"{type(e).__name__}: {e}"[:200]
                results[impl] = full
                rows.append(dict(device=device_name, model=model, op=op, shape=shape, dtype=args.dtype, impl=impl,
                                 fwd_ms=round(f, 4), bwd_ms=round(b, 4), full_ms=round(full, 4),
                                 peak_extra_mb=round(mem, 1) if not math.isnan(mem) else "",
                                 speedup_vs_eager="", torch=torch.__version__, triton=triton.__version__,
                                 error=err))
                if cuda:
                    torch.cuda.empty_cache()
            mine = [r for r in rows if r["model"] == model and r["op"] == op]
            eager = results.get("eager", float("nan"))
            for r in mine:
                if math.isfinite(eager) and math.isfinite(r["full_ms"]) and r["full_ms"] > 0:
                    r["speedup_vs_eager"] = round(eager / r["full_ms"], 3)
            print(f"{model:7s} {op:30s} " + "  ".join(
                f"{r['impl']}: fwd {r['fwd_ms']:.3f} bwd {r['bwd_ms']:.3f} full {r['full_ms']:.3f} ms "
                f"mem {r['peak_extra_mb'] or '-'} MB x{r['speedup_vs_eager'] or '-'}"
                + (f" [{r['error']}]" if r["error"] else "") for r in mine), flush=True)

    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["device"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"bench_kernels: {len(rows)} rows for {device_name} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
