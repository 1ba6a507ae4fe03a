"""model.offload_encoders: an encoder in CPU memory, on the accelerator only during its calls."""
from __future__ import annotations

import pytest
import torch

from dopsd.models.offload import offload_between_calls, place_encoder


def _encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()


def test_on_a_cpu_run_offloading_changes_nothing():
    enc = _encoder()
    x = torch.randn(3, 8)
    ref = enc(x)
    placed = place_encoder(enc, torch.device("cpu"), offload=True)
    assert placed is enc and not getattr(enc, "_dopsd_offloaded", False)  # no hooks: nothing to move
    assert torch.equal(placed(x), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: on a CPU-only machine there is no offload")
def test_offloaded_encoder_lives_on_the_cpu_and_computes_on_the_gpu():
    enc = _encoder()
    x = torch.randn(3, 8)
    ref = enc.to("cuda")(x.cuda())
    enc = offload_between_calls(_encoder(), torch.device("cuda"))
    assert all(p.device.type == "cpu" for p in enc.parameters())
    before = torch.cuda.memory_allocated()
    out = enc(x.cuda())
    assert out.device.type == "cuda" and torch.allclose(out, ref)
    assert all(p.device.type == "cpu" for p in enc.parameters())  # back in host memory after the call
    assert torch.cuda.memory_allocated() - before <= out.numel() * out.element_size() + 512
