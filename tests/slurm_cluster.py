"""A real single-host Slurm "cluster" with two simulated nodes, for the launcher tests.

Installs Debian's slurmctld/slurmd/slurm-client/munge when missing (root + apt-get), writes its config in a
temporary directory (never in the repository), starts munged (if not already running), slurmctld and one
slurmd per node, and stops every daemon it started, by PID.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
NODES = ("n1", "n2")


class SlurmUnavailable(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        r = subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {r.stderr[-500:]}")


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pids: list[int] = []

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> "SlurmCluster":
        ensure_installed()
        self._start_munge()
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        gres = []
        for i, node in enumerate(NODES):
            (self.root / f"fakegpu{i}").touch()
            gres.append(f"NodeName={node} Name=gpu File={self.root}/fakegpu{i}")
        (self.root / "gres.conf").write_text("\n".join(gres) + "\n")
        node_lines = [f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={_free_port()} CPUs=1 "
                      f"RealMemory=4000 Gres=gpu:1 State=UNKNOWN" for n in NODES]
        self.conf.write_text("\n".join([
            "ClusterName=dopsdci", "SlurmctldHost=localhost(127.0.0.1)", f"SlurmctldPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "SchedulerType=sched/backfill", "MpiDefault=none",
            f"StateSaveLocation={self.root}/state", f"SlurmdSpoolDir={self.root}/spool/%n",
            f"SlurmctldPidFile={self.root}/slurmctld.pid", f"SlurmdPidFile={self.root}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.root}/log/slurmctld.log", f"SlurmdLogFile={self.root}/log/slurmd-%n.log",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "JobAcctGatherType=jobacct_gather/none", "ReturnToService=2", "KillWait=30", "GresTypes=gpu",
            "JobRequeue=1", "MinJobAge=600",
            *node_lines,
            "PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n")
        self._daemon(["slurmctld", "-f", str(self.conf)], self.root / "slurmctld.pid")
        for node in NODES:
            self._daemon(["slurmd", "-f", str(self.conf), "-N", node], self.root / f"slurmd-{node}.pid")
        self._wait_idle()
        return self

    def _start_munge(self) -> None:
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged is already serving this host: use it, do not own it
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force"], check=True, capture_output=True)
        pid_file = run / "munged.pid"
        for _ in range(50):
            if pid_file.exists() and subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
                self._pids.append(int(pid_file.read_text().strip()))
                return
            time.sleep(0.1)
        raise SlurmUnavailable("munged did not start")

    def _daemon(self, cmd: list[str], pid_file: Path) -> None:
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SlurmUnavailable(f"{cmd[0]} failed to start: {r.stderr[-500:]}")
        for _ in range(100):
            if pid_file.exists() and pid_file.read_text().strip():
                self._pids.append(int(pid_file.read_text().strip()))
                return
            time.sleep(0.1)
        raise SlurmUnavailable(f"{cmd[0]} wrote no pid file")

    def _wait_idle(self, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if all(states.get(n, "").startswith("idle") for n in NODES):
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"nodes not idle after {timeout}s: {out!r}")

    def stop(self) -> None:
        for pid in reversed(self._pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in self._pids:
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                try:  # reap if it is our child; PID 1 here does not reap
                    os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    pass
                time.sleep(0.1)
        self._pids.clear()

    # -- jobs ------------------------------------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}")
        return r

    def sbatch(self, args: list[str], env: dict | None = None, cwd: Path | None = None) -> int:
        out = self.run(["sbatch", "--parsable", *args], env=env or {}, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait(self, job_id: int, timeout: float = 600, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                                "NODE_FAIL", "OUT_OF_MEMORY")) -> dict[str, str]:
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            time.sleep(0.5)
        self.run(["scancel", str(job_id)], check=False)
        raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout}s")
