"""benchmarks/bench_curved.py: the smoke run on a tiny curved build writes its table, curves and grids; a build
whose gate failed is refused."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.fixture(scope="module")
def tiny_curved(tmp_path_factory):
    from dopsd_world.toybase import CurvedToyBaseSettings, make_toy_base

    out = tmp_path_factory.mktemp("curved") / "turbo"
    s = CurvedToyBaseSettings(num_images=64, num_unnamed=16, vae_steps=3, vae_batch=8, pretrain_steps=3,
                              incontext_steps=2, batch=8, trajectories=16, teacher_steps=8, distill_steps=2,
                              dit_dim=64, dit_layers=1)
    threads = torch.get_num_threads()
    try:
        make_toy_base(out, s)  # no evaluator: no scores, no gate (the smoke run allows that)
    finally:
        torch.set_num_threads(threads)
    return out


def test_curved_verdict_smoke_run_writes_its_table(tmp_path, tiny_curved):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_curved.py"), "--smoke", "--model",
                        str(tiny_curved), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    table = (tmp_path / "out" / "results.md").read_text()
    for row in ("| turbo (untuned) |", "| before step distillation |", "| SFT |", "| D-OPSD − SFT |",
                "| D-OPSD, VLM teacher − SFT |", "## 1 Euler step", "## 2 Euler steps"):
        assert row in table, row
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    # the reference rows are two different models: the build's turbo and its pre-distillation transformer
    assert res["reference"]["turbo"]["1"] != res["reference"]["pre_distillation"]["1"]
    for m in ("sft", "dopsd", "dopsd_vlm"):
        (run,) = res["report"][m]
        assert 0.0 <= run["budgets"]["2"]["concept"]["acc_texture"] <= 1.0
        assert run["budgets"]["1"]["retention"]["fd"] >= 0.0
    assert res["paired"]["dopsd"]["2"]["retention.fd"]["n"] == 1
    for f in ("budget_curves.png", "grid_concept_1steps.png", "grid_retention_1steps.png"):
        assert (tmp_path / "out" / f).stat().st_size > 0, f
    # both methods trained on the curved-style concept data: captions with [V] and only some attributes
    caps = [p.read_text() for p in (tmp_path / "work" / "data").glob("*.txt")]
    assert len(caps) == 6 and all("[V]" in c for c in caps)
    # the diagnostic: one row per roll-out state (4 steps: sigmas 1 > ... > 0) for the student and each route
    states = res["teacher"]["states"]
    assert len(states) == 4 and states[0]["sigma"] > states[-1]["sigma"] > 0.0
    assert set(states[0]) == {"sigma", "student", "teacher_reference", "teacher_vlm"}
    assert states[0]["student"] != states[0]["teacher_reference"]  # the image context changes the prediction
    assert "| samples | teacher_vlm |" in table
    # a rerun with the same --work continues after the last kept score: nothing is trained or scored again
    logs = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").glob("*/train.log")}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_curved.py"), "--smoke", "--model",
                        str(tiny_curved), "--out", str(tmp_path / "again"), "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "work").glob("*/train.log")} == logs and len(logs) == 6
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["report"] == res["report"] and again["teacher"] == res["teacher"]


def test_kept_results_refuse_another_protocol(tmp_path):
    import bench_world as bw

    calls = []
    kept = bw.Kept(tmp_path / "scores.json", {"lr": (1e-3,)})
    assert kept.get("a", lambda: calls.append(1) or {"x": (1, 2)}) == {"x": [1, 2]}  # kept as JSON
    assert bw.Kept(tmp_path / "scores.json", {"lr": [1e-3]}).get("a", lambda: calls.append(2)) == {"x": [1, 2]}
    assert calls == [1]
    with pytest.raises(SystemExit, match="another protocol"):
        bw.Kept(tmp_path / "scores.json", {"lr": [3e-3]})


def test_a_build_whose_gate_failed_is_refused(tmp_path, tiny_curved):
    import shutil

    from bench_curved import check_gate

    model = tmp_path / "m"
    shutil.copytree(tiny_curved, model)
    report = json.loads((model / "report.json").read_text())
    with pytest.raises(SystemExit, match="no gate"):
        check_gate(model, smoke=False)
    report["gate"] = {"passed": False, "checks": {"base_4_clearly_worse": False}}
    (model / "report.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="gate failed"):
        check_gate(model, smoke=False)
    report["gate"] = {"passed": True, "checks": {}}
    (model / "report.json").write_text(json.dumps(report))
    assert check_gate(model, smoke=False)["passed"]
