"""The `dopsd` console script as a user runs it."""
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _dopsd(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "dopsd", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=300)


def test_train_then_sample(tiny_model_dir, concept_dir, tmp_path):
    run = tmp_path / "run"
    r = _dopsd("train", "--config", str(REPO / "configs/quickstart.yaml"), "--set", f"model.path={tiny_model_dir}",
               "--set", f"data.path={concept_dir}", "--set", "data.resolution=[32,32]", "--set", "train.steps=2",
               "--set", "validation.seeds=[0]", "--set", "output.save_every=0", "--set", "validation.every=0",
               "--output-dir", str(run))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mean per step" in r.stderr and "teacher" in r.stderr and "optimizer" in r.stderr
    lora = run / "exports/final/pytorch_lora_weights.safetensors"
    assert lora.is_file() and (run / "samples/final.png").is_file()

    out = tmp_path / "s.png"
    r = _dopsd("sample", "--model", str(tiny_model_dir), "--lora", str(lora), "--prompt", "a photo of [V] ball",
               "--prompt", "a red circle", "--seed", "0", "--seed", "1", "--steps", "4", "--resolution", "32", "32",
               "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    img = Image.open(out)
    assert img.height > 2 * 32 and img.width > 2 * 32


def test_bad_config_exits_with_one_clear_message(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: {path: m}\ndata: {path: d}\ntrain: {lr: -1.0}\n")
    r = _dopsd("train", "--config", str(cfg))
    assert r.returncode == 2
    assert "train.lr: must be > 0" in r.stderr and "Traceback" not in r.stderr


def test_python_module_entry_point_accepts_train_arguments(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dopsd.train", "--config", str(tmp_path / "missing.yaml")],
                       capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_help_imports_no_torch_and_no_research_code():
    """`dopsd --help` stays instant: building the parser imports no subcommand's modules (no torch), and the
    library never imports the miniature world (dopsd_world sits beside it)."""
    code = ("import sys, dopsd.cli; dopsd.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'dopsd_world')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", (r.stdout, r.stderr[-2000:])
    r = _dopsd("--help")
    assert r.returncode == 0 and "make-shards" in r.stdout and "make-toy-base" not in r.stdout
    r = _dopsd("make-toy-base", "--out", "x")  # moved: the user is told where
    assert r.returncode == 2 and "dopsd-world make-toy-base" in r.stderr
