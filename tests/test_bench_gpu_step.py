"""benchmarks/flops.py and benchmarks/bench_gpu_step.py: FlopCounterMode's count of the tiny Z-Image DiT forward
equals the analytic formula, and `bench_gpu_step.py --tiny` writes a row for every variant (run or skipped)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from dopsd.adapters import add_lora_adapters
from dopsd.models.zimage import LORA_TARGETS

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from flops import count_flops, zimage_forward_flops  # noqa: E402


@pytest.mark.parametrize("batch, image, caption, rank", [(1, 16, 20, 0), (2, 36, 33, 4)])
def test_forward_flops_equal_the_analytic_count(batch, image, caption, rank):
    """Counted with attention as math SDPA (the count is then device- and kernel-independent); sequences of a
    length that is not a multiple of 32 exercise the model's padding."""
    from diffusers import ZImageTransformer2DModel

    from bench_gpu_step import TINY

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(**{**TINY, "n_layers": 3})
    if rank:
        add_lora_adapters(model, rank, 2 * rank, LORA_TARGETS, "gaussian", with_teacher=True)  # one adapter active
    side = int(image ** 0.5) * 2  # image = (side / 2)^2 patches
    x = [torch.randn(16, 1, side, side) for _ in range(batch)]
    cap = [torch.randn(caption, TINY["cap_feat_dim"]) for _ in range(batch)]
    with torch.no_grad():
        counted, _ = count_flops(lambda: model(x, torch.full((batch,), 0.4), cap, return_dict=False))
    assert counted == zimage_forward_flops(dict(model.config), image, caption, batch, rank)


def test_bench_gpu_step_tiny(tmp_path):
    from bench_gpu_step import VARIANTS

    out = tmp_path / "gpu_step_tiny.md"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu_step.py"), "--tiny", "--repeats", "1",
                    "--k", "1", "--out", str(out)], check=True, cwd=REPO, timeout=900)
    res = json.loads(out.with_suffix(".json").read_text())
    rows = res["variants"]
    assert set(rows) == {f"{v} ckpt={c}" for v in VARIANTS for c in ("off", "on")}
    ran = {k: v for k, v in rows.items() if "skipped" not in v}
    assert "sdpa ckpt=off" in ran and "sdpa/separate ckpt=on" in ran  # SDPA runs everywhere
    if not torch.cuda.is_available():
        assert "sdpa+compile/separate ckpt=on" in ran
    for name, v in rows.items():
        assert v.get("skipped") or v["median_s"] > 0, name
    # every variant computes the same step from the same snapshot
    losses = [v["loss"] for v in ran.values()]
    assert max(losses) - min(losses) <= 1e-4 * abs(losses[0])
    f, k = res["flops"], res["args"]["k"]
    assert f["counted_teacher_forward_2_layers"] == f["analytic_teacher_forward_2_layers"]
    fwd_t, fwd_s = f["analytic_forward"]["teacher"], f["analytic_forward"]["student"]
    # the student's backward (frozen base: input gradients, attention, the adapter's weight gradients) costs
    # between half and twice its forward
    assert k * (fwd_t + 1.5 * fwd_s) <= f["step"] <= k * (fwd_t + 3 * fwd_s)
    assert "| sdpa ckpt=off | native |" in out.read_text()
