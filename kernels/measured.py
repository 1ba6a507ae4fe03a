"""The measured table behind `model.kernels: auto`: patch the kernels only where they were measured to win.

An op earns its place on a GPU class when its Triton forward + backward is at least as fast as the eager code
AND as `torch.compile` of the eager code, with no more memory than eager (issue 20's bar). The patch functions
swap whole block forwards (every op of a family at once), so `auto` patches a family's blocks only when every op
its patch uses earns its place there; the distillation loss kernel is decided on its own. A GPU class without
measurements gets no kernels: a guess is not a measurement. `model.kernels: always` patches regardless.

The numbers are `benchmarks/bench_kernels.py` medians (full = forward + backward, ms; peak extra memory, MB),
copied from `benchmarks/results/kernels_<class>.csv` (a test checks they agree). To add a GPU class: run the
benchmark there, commit its CSV, and add its rows here with `python -m dopsd_kernels.measured CSV`.
"""
from __future__ import annotations

import csv
import sys

# GPU class -> op -> {impl: (full ms, peak extra MB)}; from benchmarks/results/kernels_h100.csv (2026-11-27,
# torch 2.11.0+cu130, Triton 3.6.0, bf16).
MEASURED: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "H100": {
        "rms_norm_modulated": {"triton": (1.227, 143.6), "eager": (2.1559, 768.3), "compile": (0.8466, 136.5)},
        "gated_rms_norm_residual+next": {"triton": (1.5296, 286.1), "eager": (4.4076, 1087.1),
                                        "compile": (1.0893, 264.1)},
        "gated_rms_norm_residual": {"triton": (1.6898, 206.8), "eager": (2.2443, 767.0), "compile": (0.9915, 135.5)},
        "qk_rms_norm": {"triton": (1.2314, 129.7), "eager": (2.0112, 767.5), "compile": (0.8531, 132.6)},
        "rope_apply": {"triton": (1.5343, 128.5), "eager": (0.5851, 324.5), "compile": (1.1545, 324.5)},
        "final_layer_norm_modulated": {"triton": (1.2382, 127.6), "eager": (0.5579, 376.1),
                                      "compile": (0.5506, 120.1)},
        "distill_loss_x0": {"triton": (0.5356, 5.1), "eager": (0.4463, 8.1), "compile": (0.7291, 3.1)},
        "layer_norm_modulated": {"triton": (0.9842, 120.1), "eager": (0.5242, 348.1), "compile": (0.7682, 108.1)},
        "gated_residual_layer_norm": {"triton": (1.4187, 210.1), "eager": (0.8168, 372.1),
                                     "compile": (0.7002, 192.8)},
        "gated_residual": {"triton": (1.6447, 168.0), "eager": (0.3922, 294.0), "compile": (0.6132, 108.0)},
        "distill_loss_v": {"triton": (0.8037, 10.0), "eager": (0.1947, 4.0), "compile": (0.8226, 2.0)},
    },
}

# The ops each backend's patch (dopsd_kernels.patch) puts into its blocks.
FAMILY_OPS = {
    "zimage": ("rms_norm_modulated", "gated_rms_norm_residual+next", "gated_rms_norm_residual", "qk_rms_norm",
               "rope_apply", "final_layer_norm_modulated"),
    "flux2_klein": ("layer_norm_modulated", "gated_residual_layer_norm", "gated_residual"),
}


def gpu_class(device_name: str, table: dict = MEASURED) -> str | None:
    """"NVIDIA H100 80GB HBM3" -> "H100"; a name with no measured class -> None."""
    return next((c for c in table if c in device_name.upper()), None)


def earns_place(times: dict[str, tuple[float, float]]) -> bool:
    triton, eager = times["triton"], times["eager"]
    fastest_other = min(eager[0], times.get("compile", eager)[0])
    return triton[0] <= fastest_other and triton[1] <= eager[1]


def auto_choice(family: str, device_name: str, loss_space: str,
                table: dict = MEASURED) -> tuple[bool, bool, str]:
    """(patch the family's blocks, use the loss kernel, why) for `model.kernels: auto` on this GPU."""
    cls = gpu_class(device_name, table)
    if cls is None:
        return False, False, f"no kernel measurements for {device_name}: eager ops (model.kernels=always to force)"
    ops = table[cls]
    missing = [op for op in FAMILY_OPS.get(family, ()) if op not in ops]
    losing = [op for op in FAMILY_OPS.get(family, ()) if op in ops and not earns_place(ops[op])]
    blocks = family in FAMILY_OPS and not missing and not losing
    loss_op = f"distill_loss_{loss_space}"
    loss = loss_op in ops and earns_place(ops[loss_op])
    why = (f"{cls}: blocks {'patched' if blocks else 'eager'}"
           + (f" ({', '.join(losing + missing)} measured slower than eager or torch.compile, or unmeasured)"
              if not blocks else "")
           + f"; loss {'kernel' if loss else 'eager'}")
    return blocks, loss, why


def rows_from_csv(path: str) -> dict[str, dict[str, tuple[float, float]]]:
    """The MEASURED entry of one GPU class from a bench_kernels.py CSV."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("error") or not row.get("full_ms"):
                continue
            out.setdefault(row["op"], {})[row["impl"]] = (float(row["full_ms"]), float(row["peak_extra_mb"] or 0.0))
    return out


if __name__ == "__main__":
    import pprint

    pprint.pprint(rows_from_csv(sys.argv[1]), width=120)
