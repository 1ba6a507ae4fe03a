"""benchmarks/bench_continual.py --smoke: A, then B from A, both methods, one seed; its table is written."""
import json
import subprocess
import sys

from conftest import REPO


def test_continual_smoke_run_writes_its_table(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_continual.py"), "--smoke", "--out",
                        str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    table = (tmp_path / "out" / "continual.md").read_text()
    assert "| SFT | after b |" in table and "| D-OPSD − SFT | after b |" in table
    res = json.loads((tmp_path / "out" / "continual.json").read_text())
    for method in ("sft", "dopsd"):
        (run,) = res["runs"][method]
        for stage in ("after_a", "after_b"):
            assert 0.0 <= run[stage]["few"]["a_texture"] <= 1.0 and 0.0 <= run[stage]["few"]["b_texture"] <= 1.0
        # B's run started from A's model: its log names the merged LoRA
        log = (tmp_path / "work" / f"b_{method}_lr{res['lr'][method]:g}_seed1" / "train.log").read_text()
        assert "merged LoRA" in log and f"a_{method}_lr" in log
    assert res["paired"]["after_b"]["few"]["b_texture"]["n"] == 1
    # a rerun with the same --work continues after the last kept score: nothing is trained or scored again
    logs = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").glob("*/train.log")}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_continual.py"), "--smoke", "--out",
                        str(tmp_path / "again"), "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=900, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "work").glob("*/train.log")} == logs and len(logs) == 4
    assert json.loads((tmp_path / "again" / "continual.json").read_text())["runs"] == res["runs"]
