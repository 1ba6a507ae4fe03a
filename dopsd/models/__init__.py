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


# What each backend reads from model.path, checked before any weight is loaded (a typo then costs a second,
# not the load of a 6B model that fails at its last part).
REQUIRED_PARTS = {"zimage": ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
                  "flux2_klein": ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")}


def check_model_paths(cfg: "ModelConfig", teacher_encoder: bool) -> None:
    """Raise FileNotFoundError naming the key when a directory the run will read is missing. `teacher_encoder`:
    the run will build teacher features live through Z-Image's Qwen3-VL route."""
    from pathlib import Path

    path = Path(cfg.path)
    if not path.is_dir():
        raise FileNotFoundError(f"model.path: {path} is not a directory")
    missing = [part for part in REQUIRED_PARTS.get(cfg.backend, ()) if not (path / part).is_dir()]
    if missing:
        raise FileNotFoundError(f"model.path: {path} is not a {cfg.backend} model directory in the diffusers "
                                f"layout (missing {', '.join(p + '/' for p in missing)})")
    for i, lora in enumerate(cfg.merge_loras):
        if not Path(lora).exists():
            raise FileNotFoundError(f"model.merge_loras[{i}]: {lora} does not exist (a LoRA file or a run's "
                                    f"exports/<name> folder)")
    if teacher_encoder and cfg.backend == "zimage" and (cfg.teacher_context or "vlm") == "vlm":
        vlm = Path(cfg.teacher_encoder_path) if cfg.teacher_encoder_path else path / "teacher_encoder"
        if not (vlm / "config.json").is_file():
            raise FileNotFoundError(f"model.teacher_encoder_path: {vlm} is not a Qwen3-VL directory (no config.json); "
                                    f"the teacher's VLM route needs one (e.g. Qwen/Qwen3-VL-4B-Instruct)")


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
