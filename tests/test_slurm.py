"""`sbatch launchers/slurm_train.sh` on a real Slurm: 2 simulated nodes x 1 rank, ZeRO-3 on gloo."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurm_cluster import SlurmCluster, SlurmUnavailable

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launchers/slurm_train.sh"
# Overrides of the script's GPU-cluster defaults for two 1-CPU simulated nodes.
SBATCH = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=1", "--time=20"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except SlurmUnavailable as e:
        c.stop()
        pytest.skip(f"no Slurm here: {e}")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def job_config(tiny_model_dir, tmp_path_factory):
    from dopsd.data.synthetic import write_concept_folder

    root = tmp_path_factory.mktemp("slurmjobs")
    data = write_concept_folder(root / "data", count=4, size=32, seed=5)

    def make(name: str, steps: int, **extra) -> tuple[Path, Path]:
        out = root / name
        cfg = {
            "model": {"path": str(tiny_model_dir), "teacher_min_pixels": 1024, "teacher_max_pixels": 4096},
            "lora": {"rank": 4, "alpha": 8},
            "train": {"steps": steps, "batch_size": 1, "lr": 1e-3, "rollout_steps": 4, "ema_decay": 0.9},
            "data": {"path": str(data), "resolution": [32, 32]},
            "output": {"dir": str(out), "progress_bar": False, "tensorboard": False},
            "engine": {"type": "deepspeed", "deepspeed_config": str(REPO / "configs/deepspeed/zero3.json"),
                       **extra.get("engine", {})},
            "checkpoint": {"every": 0, "keep": 2},
        }
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path, out

    make.root = root
    return make


def _env(root: Path) -> dict[str, str]:
    return {"DOPSD_PYTHON": sys.executable, "DOPSD_LOG_DIR": str(root / "logs"), "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]  # a resumed run appends: the last record of a step wins
    return out


def _job_log(root: Path, job_id: int) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(root.glob(f"*{job_id}*"))
                     if p.is_file()) + "\n".join(p.read_text(errors="replace")
                                                   for p in sorted((root / "logs").glob(f"*-{job_id}/*.log")))


@pytest.fixture(scope="module")
def reference_run(cluster, job_config):
    cfg, out = job_config("straight", steps=6)
    root = job_config.root
    job = cluster.sbatch([*SBATCH, f"--output={root}/straight-%j.out", str(SCRIPT), str(cfg)], env=_env(root),
                         cwd=root)
    info = cluster.wait(job)
    assert info["JobState"] == "COMPLETED", (info, _job_log(root, job))
    assert info.get("Restarts") == "0", info  # a run that finished its steps is not requeued
    return out, job


def test_sbatch_trains_zero3_on_two_nodes(reference_run, job_config):
    out, job = reference_run
    start = next(json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "start" in line)
    assert start["world_size"] == 2 and len(start["params_per_rank"]) == 2
    assert sorted(_losses(out)) == [1, 2, 3, 4, 5, 6]
    assert (out / "exports/final/pytorch_lora_weights.safetensors").is_file()
    assert (out / "checkpoints/step_00000006/COMPLETE").is_file()
    logs = job_config.root / "logs" / f"dopsd-{job}"
    assert (logs / "rank-0.log").is_file() and (logs / "rank-1.log").is_file()
    head = (job_config.root / f"straight-{job}.out").read_text()
    assert "master=127.0.0.1:" in head and "ranks=2" in head


@pytest.mark.parametrize("sig", ["USR1"])  # SIGTERM handling: tests/test_preemption.py (no Slurm needed)
def test_signal_checkpoints_requeues_and_resumes_exactly(cluster, job_config, reference_run, sig):
    cfg, out = job_config(f"preempted-{sig}", steps=6)
    root = job_config.root
    job = cluster.sbatch([*SBATCH, f"--output={root}/preempted-{sig}-%j.out", str(SCRIPT), str(cfg)],
                         env=_env(root), cwd=root)
    deadline = time.time() + 300
    while time.time() < deadline and len(_losses(out) if (out / "log.jsonl").exists() else {}) < 2:
        time.sleep(0.3)
    assert (out / "log.jsonl").exists(), _job_log(root, job)
    if sig == "USR1":  # Slurm's time-limit warning goes to the batch script, which forwards it
        cluster.run(["scancel", "--signal=USR1", "--batch", str(job)])
    else:  # SIGTERM straight to the ranks, as preemption or scancel deliver it
        cluster.run(["scancel", "--signal=TERM", str(job)])
    done = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
    info = cluster.wait(job, timeout=300, until=("PENDING", *done))
    if info["JobState"] == "PENDING":
        # Slurm holds a requeued job ~2 min (its begin time) before it may start again; as an admin would,
        # the test lets it start sooner. The requeue itself was the batch script's (`scontrol requeue`).
        # Not at once: slurmd revokes the old run's credential at second resolution and refuses (fails the
        # job, "Job credential revoked") a new one issued in that same second.
        time.sleep(3)
        cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
    info = cluster.wait(job, timeout=600, until=done)
    text = _job_log(root, job)
    if info["JobState"] != "COMPLETED":  # the whole job log: pytest would shorten it in an assert
        pytest.fail(f"job {job} ended {info['JobState']} ({info.get('Reason')}, exit {info.get('ExitCode')})\n{text}")
    assert int(info.get("Restarts", "0")) >= 1, info
    assert "requeueing job" in text and "resumed from" in text
    straight, resumed = _losses(reference_run[0]), _losses(out)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert resumed == straight  # bit-identical continuation (deterministic CPU run)


def test_missing_node_fails_with_rendezvous_timeout(cluster, job_config):
    cfg, out = job_config("lonely", steps=2, engine={"rendezvous_timeout_s": 20})
    root = job_config.root
    env = {**_env(root), "DOPSD_FAULT_SKIP_RANKS": "1"}  # rank 1's node never starts its process
    job = cluster.sbatch([*SBATCH, f"--output={root}/lonely-%j.out", str(SCRIPT), str(cfg)], env=env, cwd=root)
    info = cluster.wait(job, timeout=300)
    text = _job_log(root, job)
    assert info["JobState"] == "FAILED", (info, text)
    assert "rendezvous timed out after 20s" in text and "not every rank joined" in text


def test_dry_run_prints_the_plan_and_starts_nothing(cluster, job_config):
    cfg, out = job_config("dry", steps=2)
    root = job_config.root
    job = cluster.sbatch([*SBATCH, f"--output={root}/dry-%j.out", str(SCRIPT), str(cfg), "--set", "train.lr=1e-4",
                          "--dry-run"], env=_env(root), cwd=root)
    info = cluster.wait(job, timeout=120)
    text = (root / f"dry-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", text
    assert "plan: node n1 (127.0.0.1)" in text and "plan: node n2 (127.0.0.1)" in text
    assert "--set train.lr=1e-4" in text and "dry run: nothing started" in text
    assert not out.exists()
