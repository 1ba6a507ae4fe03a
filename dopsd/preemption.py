"""Stop requests: SIGUSR1 (Slurm's warning before the time limit, `--signal=B:USR1@N`), SIGTERM (scancel,
preemption), SIGINT (Ctrl-C), and the `deepspeed` command itself going away. The handler only records the
request; the trainer finishes the current step, all ranks agree to stop, a complete checkpoint is written,
and the process exits: with PREEMPTED_EXIT_CODE (99) so that a launcher requeues the job (which resumes from
`latest`), or after Ctrl-C with INTERRUPTED_EXIT_CODE (130, the shell's code for SIGINT) and no requeue. A
second Ctrl-C stops at once, without a checkpoint (the last complete one stays the resume point).

The `deepspeed` command (its runner) starts one launcher process per node, which starts the ranks. SIGTERM
to the runner kills it alone; the launcher and the ranks would train on unsupervised. So a rank whose parent
is DeepSpeed's launcher watches the runner, and a runner that is gone counts as a stop request."""
from __future__ import annotations

import os
import signal
import threading

PREEMPTED_EXIT_CODE = 99
INTERRUPTED_EXIT_CODE = 130
RUNNER_GONE = "the deepspeed runner exited"


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


class Interrupted(Exception):
    """Stopped at once (a second Ctrl-C): no checkpoint of this moment; `latest` is the resume point."""

    def __init__(self, step: int, latest=None):
        where = f"the last complete checkpoint is {latest}" if latest else "no complete checkpoint was written yet"
        super().__init__(f"interrupted during step {step + 1}; nothing saved of it, {where}")
        self.step, self.latest = step, latest


class StopSignals:
    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM, signal.SIGINT), watch_launcher: bool = True,
                 poll_s: float = 1.0):
        self.requested: str | None = None
        self._previous = {}
        self._done = threading.Event()
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be installed from the main thread (e.g. not inside some test runners)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        runner = deepspeed_runner_pid() if watch_launcher else None
        if runner is not None:
            threading.Thread(target=self._watch, args=(os.getppid(), runner, poll_s), daemon=True,
                             name="dopsd-runner-watch").start()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.requested == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.requested is None or signum == signal.SIGINT:
            self.requested = name

    def _watch(self, launcher: int, runner: int, poll_s: float) -> None:
        while not self._done.wait(poll_s):
            if parent_of(launcher) != runner:  # the runner died: the launcher was re-parented (or is gone)
                if self.requested is None:
                    self.requested = RUNNER_GONE
                return

    def restore(self) -> None:
        self._done.set()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def parent_of(pid: int) -> int | None:
    """The parent pid of a process from /proc (None if it is gone or /proc is not there)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def deepspeed_runner_pid() -> int | None:
    """The pid of the `deepspeed` runner when this process was started by DeepSpeed's launcher under it."""
    launcher = os.getppid()
    try:
        with open(f"/proc/{launcher}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
    except OSError:
        return None
    if b"deepspeed.launcher.launch" not in cmdline:
        return None
    runner = parent_of(launcher)
    return runner if runner not in (None, 0, 1) else None
