"""`dopsd export CHECKPOINT_DIR OUT_DIR [--format diffusers|comfyui|both]`: deployable weights from a checkpoint,
offline, in one process.

Works on checkpoints of either engine: DeepSpeed ZeRO shards are consolidated with DeepSpeed's own
`zero_to_fp32` reader; torch-engine checkpoints hold the trained tensors directly. The result is the
student LoRA in the diffusers format (LoRA runs) or the transformer in the `save_pretrained` layout; for LoRA
runs `comfyui` writes the ComfyUI file instead (`dopsd.export_comfyui`), `both` writes the two.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .config import load_config

log = logging.getLogger(__name__)


def trained_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    engine_dir = checkpoint / "engine"
    if (engine_dir / "trainable.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(engine_dir / "trainable.safetensors")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="engine")


FORMATS = ("diffusers", "comfyui", "both")


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, fmt: str = "diffusers") -> Path:
    """The exported file or folder (`fmt` both: the diffusers file; `export_files` lists all)."""
    return export_files(checkpoint, out_dir, fmt)[0]


def export_files(checkpoint: str | Path, out_dir: str | Path, fmt: str = "diffusers") -> list[Path]:
    from .adapters import add_lora_adapters, load_student_values, student_lora
    from .models import load_backend

    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}")
    checkpoint, out = Path(checkpoint), Path(out_dir)
    if not ckpt.is_complete(checkpoint):
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint (no {ckpt.MARKER} marker)")
    cfg = load_config(checkpoint / "config.yaml")
    if cfg.train.mode != "lora" and fmt != "diffusers":
        raise ValueError(f"--format {fmt}: the ComfyUI export is for LoRA runs; {checkpoint} is a full fine-tune "
                         "(export it with --format diffusers: the transformer in the save_pretrained layout)")
    backend = load_backend(cfg.model, device="cpu")
    module = backend.transformer
    state = trained_state(checkpoint)
    if cfg.train.mode == "lora":
        add_lora_adapters(module, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets or backend.lora_targets,
                          cfg.lora.init, with_teacher=False)
        load_student_values(module, state, str(checkpoint))
        lora, meta = student_lora(module)
        paths = []
        if fmt in ("diffusers", "both"):
            paths.append(backend.save_lora(lora, meta, out, comfyui=False))
        if fmt in ("comfyui", "both"):
            paths.append(backend.save_comfyui_lora(lora, meta, out))
    else:
        own = module.state_dict()
        unknown = state.keys() - own.keys()
        if unknown:
            raise ValueError(f"{checkpoint}: tensors that the model does not have, e.g. {sorted(unknown)[:3]}")
        own.update({k: v.to(own[k].dtype) for k, v in state.items()})
        module.load_state_dict(own)
        paths = [backend.save_transformer(module, out)]
    for path in paths:
        log.info("exported %s -> %s", checkpoint, path)
    return paths
