"""ZeRO-3 parameter all-gathers of a D-OPSD LoRA step: 2 gloo ranks, the tiny DiT, the real `deepspeed` CLI.

The run is benchmarks/zero_gathers.py's (its worker wraps torch.distributed's all-gathers before DeepSpeed
loads and attributes every gathered element to the trainer's phase that gathered it). A forward needs the
model once; before engine_deepspeed.py turned ZeRO-3's prefetch off for this path, every student forward
also gathered, and dropped unused, the rest of the teacher forward's trace (about 1.5 models here, 2 on the
83M model), because the teacher and student forwards go through different LoRA modules.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "zero_gathers.py"
K = 2  # roll-out steps: 2 teacher + 2 student forwards and 2 backwards per training step
TOL = 1.1  # padding, and peft's `lora_A.weight.dtype` read that makes the other adapter's lora_A an external
# parameter of each LoRA layer (gathered with it in every forward: +1.6% of a forward at rank 4)


def _zero_gathers():
    spec = importlib.util.spec_from_file_location("zero_gathers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_fused_gathers(summary: dict, rollout_steps: int) -> None:
    """The fused pass gathers the base and both adapters once for both roles: each fused forward at most
    that (x TOL), and the step at most K of them plus its backwards'."""
    both = summary["params_total"]  # the frozen base + both adapters: what one fused pass uses
    for rank in summary["ranks_raw"]:
        for i, step in enumerate(rank["steps"]):
            events = step["events"]
            assert [e["phase"] for e in events if e["phase"] in ("teacher", "student", "forward")] == \
                ["forward"] * rollout_steps, events
            backwards = [e["gathered"] for e in events if e["phase"] == "backward"]
            for e in events:
                if e["phase"] == "forward":
                    assert e["gathered"] <= TOL * both, f"rank {rank['rank']} step {i + 1}: {e}"
            total = step["step"]["gathered"]
            assert total <= TOL * (rollout_steps * both + sum(backwards)), (total / both, backwards)


def check_gathers(summary: dict, rollout_steps: int) -> None:
    """Per training step and rank: each teacher / student forward gathers at most one forward's parameters
    (x TOL), each backward at most one, and the step as a whole (counted over all of train_step) at most
    2K forwards plus what its backwards gathered, x TOL."""
    model = summary["forward_params"]  # the frozen base + one adapter: what one forward uses
    for rank in summary["ranks_raw"]:
        for i, step in enumerate(rank["steps"]):
            events = step["events"]
            forwards = [e for e in events if e["phase"] in ("teacher", "student")]
            backwards = [e["gathered"] for e in events if e["phase"] == "backward"]
            assert [e["phase"] for e in forwards] == ["teacher", "student"] * rollout_steps, events
            assert len(backwards) == rollout_steps
            for e in forwards:
                assert e["gathered"] <= TOL * model, (
                    f"rank {rank['rank']} step {i + 1}: a {e['phase']} forward gathered "
                    f"{e['gathered'] / model:.2f} models ({e})")
            assert all(b <= model for b in backwards), backwards
            total = step["step"]["gathered"]
            bound = TOL * (2 * rollout_steps * model + sum(backwards))
            assert total <= bound, f"rank {rank['rank']} step {i + 1}: {total / model:.2f} models > {bound / model:.2f}"


def test_each_forward_of_a_zero3_dopsd_lora_step_gathers_the_model_once(tiny_model_dir, tmp_path):
    from dopsd.data.synthetic import write_concept_folder

    zg = _zero_gathers()
    data = write_concept_folder(tmp_path / "data", count=4, size=32, seed=0)
    summary = zg.run(tiny_model_dir, data, tmp_path, steps=2, rollout_steps=K, lora_rank=4, timeout=600,
                     dual_forward="separate")
    assert [len(r["steps"]) for r in summary["ranks_raw"]] == [2, 2]
    check_gathers(summary, K)


def test_a_fused_zero3_dopsd_lora_forward_gathers_the_model_once_for_both_roles(tiny_model_dir, tmp_path):
    from dopsd.data.synthetic import write_concept_folder

    zg = _zero_gathers()
    data = write_concept_folder(tmp_path / "data", count=4, size=32, seed=0)
    summary = zg.run(tiny_model_dir, data, tmp_path, steps=2, rollout_steps=K, lora_rank=4, timeout=600)
    assert [len(r["steps"]) for r in summary["ranks_raw"]] == [2, 2]
    check_fused_gathers(summary, K)
