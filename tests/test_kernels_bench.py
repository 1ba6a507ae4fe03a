"""benchmarks/bench_kernels.py runs: a clean exit without CUDA, and its --cpu-smoke mode writes the CSV."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_kernels.py"


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_bench_without_cuda_exits_cleanly(tmp_path):
    out = tmp_path / "k.csv"
    res = _run("--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no CUDA device" in res.stdout
    assert not out.exists()


def test_bench_cpu_smoke_writes_csv(tmp_path):
    out = tmp_path / "k.csv"
    res = _run("--cpu-smoke", "--out", str(out), "--reps", "1", "--warmup", "0")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    ops = {r["op"] for r in rows}
    assert {"rms_norm_modulated", "gated_rms_norm_residual+next", "rope_apply", "layer_norm_modulated",
            "gated_residual_layer_norm", "distill_loss_x0", "distill_loss_v"} <= ops
    assert {r["impl"] for r in rows} == {"triton", "eager"}
    assert all(r["device"].startswith("cpu-interpreter") and not r["error"] for r in rows)
    assert all(float(r["full_ms"]) > 0 for r in rows)
