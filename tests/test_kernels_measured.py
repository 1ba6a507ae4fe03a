"""model.kernels: auto follows the measured table, and the table is the committed benchmark's figures."""
from __future__ import annotations

from pathlib import Path

from dopsd_kernels.measured import FAMILY_OPS, MEASURED, auto_choice, earns_place, rows_from_csv

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def test_table_is_the_committed_benchmark_csv():
    for cls, ops in MEASURED.items():
        assert rows_from_csv(str(RESULTS / f"kernels_{cls.lower()}.csv")) == ops, cls


def test_auto_patches_only_what_wins_on_the_gpu_class():
    # H100 as measured: every patched op loses to torch.compile (and some to eager): nothing is patched
    for family in FAMILY_OPS:
        for space in ("x0", "v"):
            blocks, loss, why = auto_choice(family, "NVIDIA H100 80GB HBM3", space)
            assert not blocks and not loss and why.startswith("H100")
    # an unmeasured GPU: nothing, and the reason says so
    assert auto_choice("zimage", "NVIDIA H200", "x0")[:2] == (False, False)
    # a class where Triton beats both (and uses less memory) gets the blocks; the loss only where it wins too
    fast = {"triton": (1.0, 10.0), "eager": (2.0, 20.0), "compile": (1.5, 5.0)}
    slow = {"triton": (3.0, 10.0), "eager": (2.0, 20.0), "compile": (1.5, 5.0)}
    table = {"B200": {**{op: fast for op in FAMILY_OPS["zimage"]}, "distill_loss_x0": slow}}
    assert auto_choice("zimage", "NVIDIA B200", "x0", table)[:2] == (True, False)
    table["B200"]["rope_apply"] = slow  # one losing op keeps the whole family's blocks eager
    assert auto_choice("zimage", "NVIDIA B200", "x0", table)[:2] == (False, False)
    assert not earns_place({"triton": (1.0, 30.0), "eager": (2.0, 20.0)})  # faster but more memory: no
