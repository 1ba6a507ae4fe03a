"""Weights only as safetensors, no remote code, no pickle loading."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("dopsd", "kernels", "benchmarks", "launchers") for p in (REPO / d).rglob("*.py")]


def test_sources_exist():
    assert len(SOURCES) > 5


def test_no_remote_code_and_no_unsafe_torch_load():
    for path in SOURCES:
        text = path.read_text()
        assert not re.search(r"trust_remote_code\s*=\s*True", text), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "pickle.load" not in text, path
