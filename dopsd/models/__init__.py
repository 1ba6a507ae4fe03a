"""Model backends, one file per family, behind the `Backend` protocol in `base.py`."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import ModelConfig
    from .base import Backend

BACKENDS = ("zimage", "flux2_klein")


def pretrained_loader(cls, path, subfolder: str, dtype):
    """The default transformer loader: diffusers' own `from_pretrained`, safetensors only."""
    return cls.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype, use_safetensors=True)


def load_backend(cfg: "ModelConfig", device: str = "cpu", transformer_loader=None) -> "Backend":
    """`transformer_loader(cls, path, subfolder, dtype) -> module` replaces `from_pretrained` for the trained
    network (the DeepSpeed engine passes one that builds it ZeRO-3-partitioned); backends stay unaware of
    how the network is placed."""
    if cfg.backend == "zimage":
        from .zimage import ZImageBackend

        return ZImageBackend.from_config(cfg, device=device, transformer_loader=transformer_loader)
    if cfg.backend == "flux2_klein":
        from .flux2_klein import Flux2KleinBackend

        return Flux2KleinBackend.from_config(cfg, device=device, transformer_loader=transformer_loader)
    raise ValueError(f"model.backend: unknown backend {cfg.backend!r} (known: {', '.join(BACKENDS)})")


def make_tiny_model(backend: str, out_dir: str, seed: int = 0) -> None:
    if backend == "zimage":
        from .zimage_tiny import make_tiny_zimage

        make_tiny_zimage(out_dir, seed=seed)
        return
    if backend == "flux2_klein":
        from .flux2_tiny import make_tiny_flux2_klein

        make_tiny_flux2_klein(out_dir, seed=seed)
        return
    raise ValueError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
