"""What every backend built on a diffusers pipeline class does the same way: LoRA files in the diffusers
format (and a ComfyUI copy beside them, `dopsd.export_comfyui`), full weights in the `save_pretrained` layout,
the Triton kernel patch, and model parts that load on first use (`LazyPart`)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


class LazyPart:
    """A backend's model part (transformer, VAE, text encoder), held as a module or as a loader called on first
    use, then kept. A caller loads only what it touches: caching features never loads the DiT, `dopsd export`
    never loads the VAE or the encoders. Assign a module to replace the part, None to drop it."""

    def __set_name__(self, owner, name: str) -> None:
        self.name, self.slot = name, "_" + name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = obj.__dict__.get(self.slot)
        if value is not None and not isinstance(value, nn.Module):
            value = value()  # the loader
            obj.__dict__[self.slot] = value
            log.info("loaded the %s", self.name)
        if value is None:
            raise RuntimeError(f"this {getattr(obj, 'name', '')} backend has no {self.name}")
        return value

    def __set__(self, obj, value) -> None:
        obj.__dict__[self.slot] = value

    def loaded(self, obj) -> bool:
        return isinstance(obj.__dict__.get(self.slot), nn.Module)


class DiffusersIO:
    pipeline_name: str  # the diffusers pipeline class whose LoRA format and loader the files follow
    kernel_patch: str  # the dopsd_kernels.patch function for this family's blocks
    transformer = LazyPart()
    vae = LazyPart()
    text_encoder = LazyPart()

    def loaded_parts(self) -> list[str]:
        """The model parts in memory so far, by name."""
        return [name for name, part in vars(DiffusersIO).items() if isinstance(part, LazyPart) and part.loaded(self)]

    def _pipeline(self):
        import diffusers

        return getattr(diffusers, self.pipeline_name)

    def save_lora(self, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any], out_dir: Path,
                  comfyui: bool = True) -> Path:
        """The diffusers file (returned); with `comfyui`, also the ComfyUI file beside it (`save_comfyui_lora`),
        skipped with a warning when ComfyUI's key map for this family cannot take the LoRA's modules."""
        out_dir.mkdir(parents=True, exist_ok=True)
        # The metadata carries rank and alpha; without it the loader assumes alpha == rank.
        self._pipeline().save_lora_weights(out_dir, transformer_lora_layers=state_dict, safe_serialization=True,
                                           transformer_lora_adapter_metadata=metadata)
        if comfyui and self.comfyui_keys is not None:
            try:
                self.save_comfyui_lora(state_dict, metadata, out_dir)
            except ValueError as e:
                log.warning("no ComfyUI LoRA file written in %s: %s", out_dir, e)
        return out_dir / "pytorch_lora_weights.safetensors"

    @property
    def comfyui_keys(self):
        """How ComfyUI names this family's modules (`dopsd.export_comfyui.ComfyUIKeys`), None if it has no
        mapping; a backend may override it."""
        from ..export_comfyui import KEYS

        return KEYS.get(getattr(self, "name", ""))

    def save_comfyui_lora(self, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any], out_dir: Path) -> Path:
        """The same LoRA as a ComfyUI file (`out_dir/comfyui_lora.safetensors`): keys ComfyUI's key map for this
        family accepts, with `<module>.alpha` tensors so that ComfyUI applies the trained alpha / rank.
        ValueError when the family has no mapping or a module is outside it."""
        from ..export_comfyui import save_comfyui_lora

        keys = self.comfyui_keys
        if keys is None:
            raise ValueError(f"no ComfyUI key mapping for the {getattr(self, 'name', type(self).__name__)} backend")
        return save_comfyui_lora(keys, state_dict, metadata, out_dir)

    def load_lora(self, transformer: nn.Module, path: str | Path, adapter_name: str = "lora") -> None:
        """Load a diffusers-format LoRA (file or folder) exactly as the pipeline's `load_lora_weights` does,
        rank/alpha metadata included."""
        pipe = self._pipeline()
        state, metadata = pipe.lora_state_dict(str(path), return_lora_metadata=True, use_safetensors=True)
        pipe.load_lora_into_transformer(state, transformer, adapter_name=adapter_name, metadata=metadata)

    def read_lora(self, path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The LoRA's transformer tensors as peft names them in the module, and its metadata, read as the
        pipeline's `lora_state_dict` reads them (diffusers, kohya and other formats it converts)."""
        if not Path(path).exists():
            raise FileNotFoundError(f"LoRA {path}: no such file or folder")
        state, metadata = self._pipeline().lora_state_dict(str(path), return_lora_metadata=True, use_safetensors=True)
        prefix = "transformer."
        if any(not k.startswith(prefix) for k in state):
            other = sorted(k for k in state if not k.startswith(prefix))[:3]
            raise ValueError(f"LoRA {path}: tensors outside the transformer ({other}); only DiT LoRAs merge")
        meta = {k[len(prefix):]: v for k, v in (metadata or {}).items() if k.startswith(prefix)}
        return {k[len(prefix):]: v for k, v in state.items()}, meta

    def save_transformer(self, transformer: nn.Module, out_dir: Path,
                         state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """`save_pretrained` layout; with `state_dict` (weights consolidated from ZeRO-3 shards), those tensors."""
        target = out_dir / "transformer"
        if state_dict is None:
            transformer.save_pretrained(target, safe_serialization=True)
            return target
        from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
        from safetensors.torch import save_file

        target.mkdir(parents=True, exist_ok=True)
        transformer.save_config(target)
        save_file({k: v.contiguous() for k, v in state_dict.items()}, target / SAFETENSORS_WEIGHTS_NAME,
                  metadata={"format": "pt"})
        return target

    def apply_kernels(self, transformer: nn.Module) -> int:
        """Swap the Triton kernels into the DiT's blocks (state_dict unchanged); returns modules patched."""
        from dopsd_kernels import patch

        return getattr(patch, self.kernel_patch)(getattr(transformer, "module", transformer))

    def repeated_blocks(self, transformer: nn.Module) -> list[nn.Module]:
        """The modules of the classes the diffusers model lists in `_repeated_blocks` (what its own
        `compile_repeated_blocks` compiles), in module order."""
        model = getattr(transformer, "module", transformer)
        names = set(getattr(model, "_repeated_blocks", None) or ())
        if not names:
            raise ValueError(f"{type(model).__name__} lists no _repeated_blocks: nothing to compile")
        return [m for m in model.modules() if type(m).__name__ in names]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def freeze(module: nn.Module) -> nn.Module:
    """Frozen, in eval mode: encoders and VAEs never train."""
    module.requires_grad_(False)
    return module.eval()


def transformer_factory(cls_name: str, path: Path, dtype: torch.dtype, device: torch.device, loader=None,
                        attention=None):
    """A function building the trained network at its pretrained weights with `loader` (default diffusers'
    from_pretrained; the ZeRO-3 engine passes a sharded one), its attention set to `attention`
    (`dopsd.models.attention.Attention`; None: diffusers' default). Called again for a full fine-tune teacher twin."""
    def build() -> nn.Module:
        import diffusers

        from . import pretrained_loader
        from .attention import apply_to_dit

        model = (loader or pretrained_loader)(getattr(diffusers, cls_name), path, "transformer", dtype).to(device)
        if attention is not None:
            apply_to_dit(model, attention)
        return model

    return build
