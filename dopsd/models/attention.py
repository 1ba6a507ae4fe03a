"""`model.attention`: which attention kernels the DiT and the conditioning encoders run.

    auto | sdpa | flash | flash_varlen | xformers

The DiT goes through diffusers' attention dispatcher (`set_attention_backend`, names of
`diffusers.models.attention_dispatch.AttentionBackendName`); the Qwen3 / Qwen3-VL encoders through
transformers' `attn_implementation`. Both of the DiT's paths use the one backend: the model's own processors,
and the fused dual forward (`zimage_dual.py`, `flux2_dual.py`), which calls `dispatch_attention_fn` with the
processor's `_attention_backend` once per role.

| model.attention | DiT (diffusers)                                  | encoders (transformers) |
|-----------------|--------------------------------------------------|-------------------------|
| sdpa            | native (torch SDPA; diffusers' default)          | sdpa                    |
| flash           | flash (flash-attn 2); flash_varlen on Z-Image    | flash_attention_2       |
| flash_varlen    | flash_varlen (flash-attn 2, lengths from a mask) | flash_attention_2       |
| xformers        | xformers (memory-efficient attention)            | sdpa (transformers has no xformers path) |
| auto            | CUDA: flash if usable, else xformers, else sdpa; any other device: sdpa |

Z-Image pads each sample's caption to the batch's longest and passes a key padding mask whenever the lengths
differ; diffusers' `flash` backend refuses any mask, so on Z-Image `flash` runs as `flash_varlen` (the same
kernel, the lengths read from the mask; with no mask every row is full length). FLUX.2 never passes a mask.
`auto`'s order is a prior (flash-attn 2 before xformers before PyTorch's SDPA), not a measurement:
benchmarks/bench_gpu_step.py measures all three on the device.

A backend asked for and unusable (package missing, no CUDA device, a GPU older than Ampere or DiT weights
not in bf16/fp16 for flash-attn) raises `AttentionUnavailable` from `resolve`, which the backends call before
any weight is loaded. Packed (block-diagonal) varlen attention across the two roles is not used: the fused
forward attends per role, each role's sequence by itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError

CHOICES = ("auto", "sdpa", "flash", "flash_varlen", "xformers")
INSTALL = 'pip install "dopsd[gpu]"'
_PACKAGE = {"flash": "flash-attn", "flash_varlen": "flash-attn", "xformers": "xformers"}  # flash-attn: >= 2.6.3
_ENCODERS = {"sdpa": "sdpa", "flash": "flash_attention_2", "flash_varlen": "flash_attention_2", "xformers": "sdpa"}


class AttentionUnavailable(ConfigError):
    """`model.attention` names a backend that this installation or device cannot run (a ConfigError: the
    command line prints its one message and exits 2)."""


@dataclass(frozen=True)
class Attention:
    choice: str    # the concrete model.attention value (auto resolved): sdpa | flash | flash_varlen | xformers
    dit: str       # diffusers AttentionBackendName value
    encoders: str  # transformers attn_implementation

    @property
    def dit_default(self) -> bool:
        """The DiT keeps diffusers' default backend (then `DIFFUSERS_ATTN_BACKEND` and the `attention_backend`
        context manager still apply)."""
        return self.dit == "native"


SDPA = Attention("sdpa", "native", "sdpa")  # what a backend built without a config runs


def installed(choice: str) -> bool:
    """Whether diffusers can import the package behind `choice` (sdpa: always)."""
    from diffusers.models import attention_dispatch as ad

    if choice in ("flash", "flash_varlen"):
        return bool(ad._CAN_USE_FLASH_ATTN)
    if choice == "xformers":
        return bool(ad._CAN_USE_XFORMERS_ATTN)
    return True


def why_unusable(choice: str, device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> str | None:
    """None when `choice` can run on `device` with DiT weights in `dtype`, else the reason (one sentence)."""
    if choice == "sdpa":
        return None
    if not installed(choice):
        return f"needs the {_PACKAGE[choice]} package, which is not installed here (or too old): {INSTALL}"
    device = torch.device(device)
    if device.type != "cuda":
        return f"runs on CUDA GPUs only (this run is on {device.type}); use sdpa (or auto) there"
    if choice.startswith("flash") and torch.cuda.get_device_capability(device)[0] < 8:
        return "flash-attn 2 needs an Ampere or newer GPU (compute capability >= 8.0); use xformers or sdpa"
    if choice.startswith("flash") and dtype not in (torch.float16, torch.bfloat16):
        # under autocast with float32 weights the q/k norms hand float32 queries to a bf16-only kernel
        return f"takes fp16/bf16 tensors only: set model.dtype bfloat16 (it is {dtype}), or use sdpa / xformers"
    return None


def resolve(name: str, device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
            masked: bool = False) -> Attention:
    """The concrete backends for `model.attention: name` on `device` with DiT weights in `dtype`; `masked`: the
    DiT passes key padding masks (Z-Image), so `flash` takes diffusers' varlen entry. Raises AttentionUnavailable
    (one message: key, value, reason, install hint), or ValueError for a name outside CHOICES."""
    if name not in CHOICES:
        raise ValueError(f"model.attention: {name!r} is not one of {', '.join(CHOICES)}")
    if name == "auto":
        cuda = torch.device(device).type == "cuda"
        name = next((c for c in ("flash", "xformers") if cuda and why_unusable(c, device, dtype) is None), "sdpa")
    reason = why_unusable(name, device, dtype)
    if reason:
        raise AttentionUnavailable(f"model.attention: {name} {reason}")
    dit = {"sdpa": "native", "flash": "flash_varlen" if masked else "flash"}.get(name, name)
    return Attention(name, dit, _ENCODERS[name])


def apply_to_dit(model: torch.nn.Module, attention: Attention) -> None:
    """Set the DiT's attention processors' backend (both the model's forward and the fused forward read it).
    diffusers' `set_attention_backend` also makes it the process-wide default; that is undone, so the choice
    stays on this model (a test's, or the VAE's, attention elsewhere in the process keeps its own). `sdpa`
    returns the processors to diffusers' default."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    previous = _AttentionBackendRegistry._active_backend
    try:
        if not attention.dit_default:
            model.set_attention_backend(attention.dit)
        elif any(getattr(getattr(m, "processor", None), "_attention_backend", None) for m in model.modules()):
            model.reset_attention_backend()
    finally:
        _AttentionBackendRegistry.set_active_backend(previous)
