"""SIGTERM / SIGUSR1 to a training process: finish the step, write a complete checkpoint, exit 99; Ctrl-C
(SIGINT) likewise, with exit 130 and one line instead of a traceback; resuming continues the run exactly."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from dopsd import checkpoint as ckpt
from dopsd.preemption import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE


def _losses(run):
    out = {}
    for line in (run / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


STEPS = 10


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    """The uninterrupted run every signal's stopped-and-resumed run must equal: (its data, its losses)."""
    from conftest import _tiny_config
    from dopsd.data.synthetic import write_concept_folder
    from dopsd.trainer import Trainer

    tmp = tmp_path_factory.mktemp("straight")
    data = write_concept_folder(tmp / "data", count=3, size=32, seed=1)
    Trainer(_tiny_config(tiny_model_dir, data, tmp / "run", f"train.steps={STEPS}", "validation.prompts=[]")).fit()
    return data, _losses(tmp / "run")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_signal_stops_with_checkpoint_and_resume_is_exact(make_config, tmp_path, sig, straight):
    data, straight_losses = straight
    steps = STEPS
    cfg = make_config(f"train.steps={steps}", "validation.prompts=[]", data_dir=data, out_dir=tmp_path / "stopped")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "dopsd.train", "--config", str(path), "--resume", "latest"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "stopped/log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and _losses(tmp_path / "stopped")):
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert proc.returncode == INTERRUPTED_EXIT_CODE, err[-2000:]
        assert "dopsd: interrupted by Ctrl-C after step" in err and "--resume latest" in err
        assert "Traceback" not in err and "KeyboardInterrupt" not in err
    else:
        assert proc.returncode == PREEMPTED_EXIT_CODE, err[-2000:]
        assert f"stopped by {signal.Signals(sig).name}" in err
    latest = ckpt.find_latest(tmp_path / "stopped/checkpoints")
    stopped_at = max(_losses(tmp_path / "stopped"))
    assert latest is not None and latest.name == f"step_{stopped_at:08d}" and stopped_at < steps

    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _losses(tmp_path / "stopped") == straight_losses


def test_second_ctrl_c_stops_at_once():
    from dopsd.preemption import StopSignals

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the suite runs in a background job
    stop = StopSignals(watch_launcher=False)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.requested == "SIGINT"  # the first only asks: the step finishes and a checkpoint is written
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before
