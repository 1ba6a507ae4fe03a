"""Stop requests from the cluster: SIGUSR1 (Slurm's warning before the time limit, `--signal=B:USR1@N`)
and SIGTERM (scancel, preemption). The handler only records the request; the trainer finishes the current
step, all ranks agree to stop, a complete checkpoint is written, and the process exits with
PREEMPTED_EXIT_CODE so that the launcher requeues the job (which resumes from `latest`)."""
from __future__ import annotations

import os
import signal
import threading

PREEMPTED_EXIT_CODE = 99


def preempted_exit(step: int) -> int:
    """Record the stop for a launcher and return the exit code to use.

    Slurm's `srun --kill-on-bad-exit` kills the other ranks as soon as one exits non-zero, so the Slurm
    launcher asks for exit code 0 (DOPSD_PREEMPT_EXIT_CODE) and reads DOPSD_STATUS_FILE instead."""
    status = os.environ.get("DOPSD_STATUS_FILE")
    if status:
        with open(status, "w") as f:
            f.write(f"preempted {step}\n")
    return int(os.environ.get("DOPSD_PREEMPT_EXIT_CODE", PREEMPTED_EXIT_CODE))


class Preempted(Exception):
    def __init__(self, step: int, signal_name: str, checkpoint: str):
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {checkpoint}")
        self.step, self.signal_name, self.checkpoint = step, signal_name, checkpoint


class StopSignals:
    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.requested: str | None = None
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be installed from the main thread (e.g. not inside some test runners)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
