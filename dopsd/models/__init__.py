"""Model backends, one file per family, behind the `Backend` protocol in `base.py`."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import ModelConfig
    from .base import Backend

BACKENDS = ("zimage",)


def load_backend(cfg: "ModelConfig", device: str = "cpu") -> "Backend":
    if cfg.backend == "zimage":
        from .zimage import ZImageBackend

        return ZImageBackend.from_config(cfg, device=device)
    raise ValueError(f"model.backend: unknown backend {cfg.backend!r} (known: {', '.join(BACKENDS)})")


def make_tiny_model(backend: str, out_dir: str, seed: int = 0) -> None:
    if backend == "zimage":
        from .zimage_tiny import make_tiny_zimage

        make_tiny_zimage(out_dir, seed=seed)
        return
    raise ValueError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
