"""A dopsd LoRA as a ComfyUI LoRA file: the tensors of the diffusers export under names ComfyUI's own key maps
resolve, plus one `<module>.alpha` tensor per module so that ComfyUI applies it at the trained strength.

Why a second file: ComfyUI scales `lora_up @ lora_down` by `alpha / rank`, with alpha read from a
`<module>.alpha` tensor and rank = `lora_down.shape[0]`, and by 1.0 when that tensor is absent
(Comfy-Org/ComfyUI comfy/weight_adapter/lora.py, `LoRAAdapter.calculate_weight`). peft (and so dopsd and
diffusers) scale by `lora_alpha / r`, which the diffusers file carries only in its JSON header: ComfyUI would
apply the recipe's rank 64 / alpha 128 LoRA at half strength.

Key names (Comfy-Org/ComfyUI comfy/lora.py, `model_lora_keys_unet`), one format per family, each the diffusers
module name behind a prefix that family's branch maps:
- zimage: `diffusion_model.<diffusers name>`, accepted by the `comfy.model_base.Lumina2` branch (Z-Image loads as
  Lumina2), which maps the names of comfy/utils.py `z_image_to_diffusers`. ComfyUI's NextDiT keeps q/k/v fused in
  `attention.qkv`; that map loads `attention.to_q/to_k/to_v` into row slices of it, (qkv, (0, i * dim, dim)).
- flux2_klein: `transformer.<diffusers name>`, accepted by the `comfy.model_base.Flux` branch (`Flux2`
  subclasses it), which maps the names of comfy/utils.py `flux_to_diffusers`: `attn.to_q/to_k/to_v` and
  `attn.add_{q,k,v}_proj` into row slices of `img_attn.qkv` / `txt_attn.qkv` (hidden_size rows each),
  `ff.linear_in/linear_out` to `img_mlp.0/2`, `ff_context.*` to `txt_mlp.*`, single blocks'
  `attn.to_qkv_mlp_proj` / `attn.to_out` to `linear1` / `linear2`.
Tensor names are `<key>.lora_up.weight` (B), `<key>.lora_down.weight` (A), `<key>.alpha` (ComfyUI's "regular"
LoRA names, `LoRAAdapter.load`); comfy/lora_convert.py `convert_lora`, which runs first, leaves such names as they
are. A module outside the family's map would be dropped by ComfyUI with a "lora key not loaded" warning; the
export refuses it instead.

No torch import at module level: the tables are plain data.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FILE_NAME = "comfyui_lora.safetensors"  # written beside pytorch_lora_weights.safetensors


@dataclass(frozen=True)
class ComfyUIKeys:
    """Which diffusers module names ComfyUI's key map resolves for one model family, and under what prefix."""
    family: str
    prefix: str
    accepted: str  # regex (full match) over diffusers module names the family's map resolves
    sliced: str  # the subset ComfyUI loads into a row slice of a fused weight, one model width high

    def key(self, module: str) -> str:
        return self.prefix + module

    def accepts(self, module: str) -> bool:
        return re.fullmatch(self.accepted, module) is not None

    def is_sliced(self, module: str) -> bool:
        return re.fullmatch(self.sliced, module) is not None


# comfy/utils.py z_image_to_diffusers: per block (layers.N; noise_refiner.N and context_refiner.N with N < 2, the
# map's default refiner depth, which is Z-Image's), attention q/k/v (sliced), to_out.0 (-> attention.out),
# feed_forward.w1/w2/w3, adaLN_modulation.0; and the embedders / final layer under their diffusers names.
ZIMAGE = ComfyUIKeys(
    family="Z-Image (ComfyUI Lumina2)",
    prefix="diffusion_model.",
    accepted=(r"(layers\.\d+|noise_refiner\.[01]|context_refiner\.[01])\."
              r"(attention\.to_[qkv]|attention\.to_out\.0|feed_forward\.w[123]|adaLN_modulation\.0)"
              r"|all_final_layer\.2-1\.(linear|adaLN_modulation\.1)|all_x_embedder\.2-1|cap_embedder\.1"
              r"|t_embedder\.mlp\.[02]"),
    sliced=r".*\.attention\.to_[qkv]",
)

# comfy/utils.py flux_to_diffusers, the names FLUX.2's diffusers model has (its modulation and time embedders are
# named differently from FLUX.1's and are not in that map; the final norm_out is re-ordered there, not mapped).
FLUX2_KLEIN = ComfyUIKeys(
    family="FLUX.2 (ComfyUI Flux2)",
    prefix="transformer.",
    accepted=(r"transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)"
              r"|ff\.linear_(in|out)|ff_context\.linear_(in|out))"
              r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
              r"|x_embedder|context_embedder|proj_out"),
    sliced=r"transformer_blocks\.\d+\.attn\.(to_[qkv]|add_[qkv]_proj)",
)

KEYS = {"zimage": ZIMAGE, "flux2_klein": FLUX2_KLEIN}  # by backend name


def lora_modules(state: dict[str, "torch.Tensor"]) -> dict[str, tuple["torch.Tensor", "torch.Tensor"]]:
    """{module: (A, B)} from a peft LoRA state dict (`<module>.lora_A.weight` / `<module>.lora_B.weight`, the
    keys `get_peft_model_state_dict` returns and the diffusers file holds behind `transformer.`)."""
    from .adapters import lora_factors

    return lora_factors(state, "ComfyUI export", note="; DoRA magnitudes and LoRA biases have no ComfyUI 'lora' "
                                                      "equivalent here")


def comfyui_alpha(metadata: dict[str, Any], rank: int) -> float:
    """The `alpha` tensor value that makes ComfyUI's alpha / rank equal peft's scaling for `metadata` (the
    LoraConfig as a dict): lora_alpha, or lora_alpha * sqrt(r) under rsLoRA (peft scales by alpha / sqrt(r))."""
    if metadata.get("rank_pattern") or metadata.get("alpha_pattern"):
        raise ValueError("ComfyUI export: per-module rank_pattern / alpha_pattern is not supported")
    if metadata.get("use_dora"):
        raise ValueError("ComfyUI export: DoRA adapters are not supported")
    r, alpha = int(metadata["r"]), float(metadata["lora_alpha"])
    if rank != r:
        raise ValueError(f"ComfyUI export: a LoRA factor of rank {rank} in an adapter of r = {r}")
    scale = alpha / math.sqrt(r) if metadata.get("use_rslora") else alpha / r
    return scale * rank


def to_comfyui(keys: ComfyUIKeys, state: dict[str, "torch.Tensor"],
               metadata: dict[str, Any]) -> dict[str, "torch.Tensor"]:
    """The ComfyUI LoRA state: for each module, `<key>.lora_up.weight` = B, `<key>.lora_down.weight` = A (the very
    tensors, dtype kept) and `<key>.alpha` (float32 scalar) such that alpha / rank is peft's scaling."""
    import torch

    modules = lora_modules(state)
    if not modules:
        raise ValueError("ComfyUI export: the LoRA state is empty")
    unmapped = [m for m in modules if not keys.accepts(m)]
    if unmapped:
        raise ValueError(f"ComfyUI export: {len(unmapped)} LoRA module(s) that ComfyUI's {keys.family} key map "
                         f"does not resolve (it would drop them), e.g. {unmapped[:3]}")
    out = {}
    for module, (a, b) in modules.items():
        if keys.is_sliced(module) and b.shape[0] != a.shape[1]:
            # ComfyUI slices the fused qkv weight in blocks of the model width: q/k/v must be that wide.
            raise ValueError(f"ComfyUI export: {module} maps {a.shape[1]} -> {b.shape[0]} features; ComfyUI loads "
                             f"it into a {a.shape[1]}-row slice of a fused qkv weight")
        key = keys.key(module)
        out[f"{key}.lora_up.weight"] = b.detach().contiguous()
        out[f"{key}.lora_down.weight"] = a.detach().contiguous()
        out[f"{key}.alpha"] = torch.tensor(comfyui_alpha(metadata, a.shape[0]), dtype=torch.float32)
    return out


def save_comfyui_lora(keys: ComfyUIKeys, state: dict[str, "torch.Tensor"], metadata: dict[str, Any],
                      path: str | Path) -> Path:
    """Write `to_comfyui(...)` as safetensors at `path` (a file, or a folder that gets FILE_NAME)."""
    from safetensors.torch import save_file

    tensors = to_comfyui(keys, state, metadata)
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    # One metadata entry: safetensors writes the metadata map in no fixed order, so more would make the bytes of
    # the same export differ from run to run. Rank and alpha are in the tensors.
    save_file(tensors, path, metadata={"format": "pt"})
    return path
