"""Shared fixtures: one tiny Z-Image checkpoint per test session, written and loaded by the real code."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# Triton's interpreter must be chosen before anything imports triton (diffusers and deepspeed may, while
# test modules are collected); without a GPU the kernel tests run in it.
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from dopsd.models import make_tiny_model

    out = tmp_path_factory.mktemp("models") / "tiny-zimage"
    make_tiny_model("zimage", str(out), seed=0)
    return out


@pytest.fixture
def concept_dir(tmp_path) -> Path:
    from dopsd.data.synthetic import write_concept_folder

    return write_concept_folder(tmp_path / "data", count=3, size=32, seed=1)


@pytest.fixture(scope="session")
def backend(tiny_model_dir):
    from dopsd.config import ModelConfig
    from dopsd.models import load_backend

    cfg = ModelConfig(path=str(tiny_model_dir), teacher_min_pixels=32 * 32, teacher_max_pixels=64 * 64)
    return load_backend(cfg, device="cpu")


@pytest.fixture
def make_config(tiny_model_dir, concept_dir, tmp_path):
    """Factory of configs for 3-step CPU runs on the tiny checkpoint; `--set`-style overrides."""

    def make(*overrides: str, data_dir: Path | None = None, out_dir: Path | None = None):
        return _tiny_config(tiny_model_dir, data_dir or concept_dir, out_dir or tmp_path / "run", *overrides)

    return make


def _tiny_config(model_dir: Path, data_dir: Path, out_dir: Path, *overrides: str):
    from dopsd.config import from_dict

    data = {
        "model": {"path": str(model_dir), "teacher_min_pixels": 1024, "teacher_max_pixels": 4096},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "rollout_steps": 4, "ema_decay": 0.9},
        "data": {"path": str(data_dir), "resolution": [32, 32]},
        "validation": {"prompts": ["a photo of [V] ball"], "seeds": [0, 1]},
        "output": {"dir": str(out_dir), "progress_bar": False},
    }
    return from_dict(data, list(overrides))


def run_without_triton(code: str, cwd: Path = REPO):
    """Run `code` in a fresh CPU-only interpreter without TRITON_INTERPRET (kernels must fall back to eager);
    the completed process."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.fixture
def gpu_tiles(monkeypatch):
    """The segmented LoRA kernel's GPU tile sizes in the interpreter too: whole-model tests run it on shapes
    far larger than its unit tests' and need 16x fewer interpreted programs (the unit tests keep the
    interpreter's 16s, so that small shapes span several tiles)."""
    from dopsd_kernels import segmented_lora

    monkeypatch.setattr(segmented_lora, "TILES", (64, 64, 64))

