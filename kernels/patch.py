"""Swap the fused ops into diffusers' Z-Image and FLUX.2 transformers, in place and reversibly.

    from dopsd_kernels.patch import patch_zimage, unpatch
    patch_zimage(transformer)      # any nn.Module containing Z-Image blocks (also under PEFT/LoRA, DeepSpeed)
    ...
    unpatch(transformer)

Only `forward` methods (instance attributes) and attention processors (plain objects) change: no module,
parameter or buffer is added, removed or renamed, so `state_dict` keys, shapes and values, LoRA adapters,
checkpoints and ZeRO-3 partitioning are untouched. Deep copies (EMA teachers) keep the patch.

What runs fused (each op dispatches by itself: Triton on CUDA, the interpreter under TRITON_INTERPRET=1,
the eager reference otherwise or with DOPSD_KERNELS=0):
  Z-Image `ZImageTransformerBlock`: attention_norm1 * (1 + scale_msa) -> rms_norm_modulated;
      x + tanh(gate_msa) * attention_norm2(attn) and ffn_norm1(x) * (1 + scale_mlp) -> one
      gated_rms_norm_residual; x + tanh(gate_mlp) * ffn_norm2(ffn) -> gated_rms_norm_residual;
      the unmodulated context-refiner blocks the same without gates/scales.
  Z-Image attention (`ZSingleStreamAttnProcessor`): q/k RMSNorm -> rms_norm_modulated, RoPE -> rope_apply.
  Z-Image `FinalLayer`: norm_final(x) * (1 + scale) -> layer_norm_modulated.
  FLUX.2 `Flux2TransformerBlock`: norm1 / norm1_context modulation -> layer_norm_modulated; gated residual +
      norm2 / norm2_context modulation -> gated_residual_layer_norm; the MLP residual -> the same, unfused.
  FLUX.2 `Flux2SingleTransformerBlock`: modulated norm and gated residual; `norm_out` -> layer_norm_modulated.
Per-token modulation (Z-Image omni `noise_mask`, FLUX.2 reference-image KV-cache blends) and unexpected
module variants run the original forward.
"""
import sys
import types

import torch
from torch import nn

from .layer_norm import layer_norm_modulated
from .layer_norm_residual import gated_residual_layer_norm
from .rms_norm import rms_norm_modulated
from .rms_norm_residual import gated_rms_norm_residual
from .rope import rope_apply

_ORIG = "_dopsd_orig_forward"
_HAD_INSTANCE = "_dopsd_had_instance_forward"
_ORIG_PROC = "_dopsd_orig_processor"


# ------------------------------------------------------------------------------------------ helpers
def _patch_forward(module: nn.Module, fn) -> bool:
    if _ORIG in module.__dict__:
        return False
    module.__dict__[_HAD_INSTANCE] = "forward" in module.__dict__
    module.__dict__[_ORIG] = module.forward
    module.forward = types.MethodType(fn, module)
    return True


def _unpatch_forward(module: nn.Module) -> bool:
    if _ORIG not in module.__dict__:
        return False
    orig = module.__dict__.pop(_ORIG)
    had = module.__dict__.pop(_HAD_INSTANCE, False)
    if had:
        module.forward = orig
    else:
        module.__dict__.pop("forward", None)
    return True


_EXTERNAL = "_dopsd_external_params"


def register_external(module: nn.Module, params) -> None:
    """Tell DeepSpeed ZeRO-3 that `module`'s forward now reads these (sub-module) parameters directly.

    The fused forward reads e.g. `attention_norm1.weight` without calling the norm module, so ZeRO-3's
    per-module hooks would not gather it (unless it is persistent, as small tensors are by default). Done
    only when DeepSpeed is already imported or the parameters are already ZeRO-3 parameters.
    """
    params = [p for p in params if isinstance(p, nn.Parameter)]
    if not params or ("deepspeed" not in sys.modules and not any(hasattr(p, "ds_id") for p in params)):
        return
    try:
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter
    except Exception:  # pragma: no cover - deepspeed missing or broken
        return
    for p in params:
        register_external_parameter(module, p)
    module.__dict__.setdefault(_EXTERNAL, []).extend(params)


def _unregister_external(module: nn.Module) -> None:
    params = module.__dict__.pop(_EXTERNAL, [])
    if not params:
        return
    from deepspeed.runtime.zero.partition_parameters import unregister_external_parameter
    for p in params:
        try:
            unregister_external_parameter(module, p)
        except RuntimeError:
            pass


def _orig(module: nn.Module):
    return module.__dict__[_ORIG]


def _is_rms(norm, rms_cls) -> bool:
    return type(norm) is rms_cls and getattr(norm, "bias", None) is None


def _is_plain_ln(norm) -> bool:
    return isinstance(norm, nn.LayerNorm) and norm.weight is None and norm.bias is None \
        and len(norm.normalized_shape) == 1


def _per_sample(mod: torch.Tensor) -> bool:
    """A modulation tensor with one row per sample: (B, k*D) or (B, 1, k*D)."""
    return mod.dim() == 2 or (mod.dim() == 3 and mod.shape[1] == 1)


def _head_norm(norm, t: torch.Tensor, rms_cls) -> torch.Tensor:
    if norm is None:
        return t
    if _is_rms(norm, rms_cls) and norm.weight is not None:
        return rms_norm_modulated(t, norm.weight, None, norm.eps)
    return norm(t)


# ------------------------------------------------------------------------------------------ Z-Image
def _zimage_classes():
    from diffusers.models.normalization import RMSNorm
    from diffusers.models.transformers.transformer_z_image import (FinalLayer, ZImageTransformerBlock,
                                                                   ZSingleStreamAttnProcessor)
    return RMSNorm, FinalLayer, ZImageTransformerBlock, ZSingleStreamAttnProcessor


def _make_zimage_processor_cls():
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    RMSNorm, _, _, ZSingleStreamAttnProcessor = _zimage_classes()

    class KernelZSingleStreamAttnProcessor(ZSingleStreamAttnProcessor):
        """ZSingleStreamAttnProcessor with the q/k RMSNorm and the RoPE apply on dopsd_kernels ops."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
            query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
            key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
            value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
            query = _head_norm(attn.norm_q, query, RMSNorm)
            key = _head_norm(attn.norm_k, key, RMSNorm)
            if freqs_cis is not None:
                query = rope_apply(query, freqs_cis)
                key = rope_apply(key, freqs_cis)
            dtype = query.dtype
            key = key.to(dtype)
            if attention_mask is not None and attention_mask.ndim == 2:
                attention_mask = attention_mask[:, None, None, :]
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend, parallel_config=self._parallel_config)
            out = out.flatten(2, 3).to(dtype)
            out = attn.to_out[0](out)
            if len(attn.to_out) > 1:
                out = attn.to_out[1](out)
            return out

    return KernelZSingleStreamAttnProcessor


_ZPROC_CLS = None


def _zimage_processor_cls():
    global _ZPROC_CLS
    if _ZPROC_CLS is None:
        _ZPROC_CLS = _make_zimage_processor_cls()
    return _ZPROC_CLS


def _zimage_block_ok(block, rms_cls) -> bool:
    norms = (block.attention_norm1, block.attention_norm2, block.ffn_norm1, block.ffn_norm2)
    return all(_is_rms(n, rms_cls) for n in norms)


def _zimage_block_forward(self, x, attn_mask, freqs_cis, adaln_input=None, noise_mask=None, adaln_noisy=None,
                          adaln_clean=None):
    if noise_mask is not None or (self.modulation and adaln_input is None):
        return _orig(self)(x, attn_mask, freqs_cis, adaln_input, noise_mask, adaln_noisy, adaln_clean)
    if self.modulation:
        mod = self.adaLN_modulation(adaln_input)
        if mod.dim() != 2:
            return _orig(self)(x, attn_mask, freqs_cis, adaln_input, noise_mask, adaln_noisy, adaln_clean)
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod.chunk(4, dim=1)
    else:
        scale_msa = gate_msa = scale_mlp = gate_mlp = None
    n1, n2, f1, f2 = self.attention_norm1, self.attention_norm2, self.ffn_norm1, self.ffn_norm2
    h = rms_norm_modulated(x, n1.weight, scale_msa, n1.eps)
    attn_out = self.attention(h, attention_mask=attn_mask, freqs_cis=freqs_cis)
    x, h = gated_rms_norm_residual(x, attn_out, n2.weight, gate_msa, f1.weight, scale_mlp, eps=n2.eps,
                                   next_eps=f1.eps, has_next=True)
    return gated_rms_norm_residual(x, self.feed_forward(h), f2.weight, gate_mlp, eps=f2.eps, has_next=False)


def _zimage_final_forward(self, x, c=None, noise_mask=None, c_noisy=None, c_clean=None):
    if noise_mask is not None or c is None or not _is_plain_ln(self.norm_final):
        return _orig(self)(x, c, noise_mask, c_noisy, c_clean)
    scale = self.adaLN_modulation(c)
    return self.linear(layer_norm_modulated(x, scale, None, self.norm_final.eps))


def patch_zimage(transformer: nn.Module) -> int:
    """Patch every Z-Image block, attention processor and final layer inside `transformer`.

    Idempotent. Returns the number of modules patched by this call.
    """
    RMSNorm, FinalLayer, ZImageTransformerBlock, ZSingleStreamAttnProcessor = _zimage_classes()
    proc_cls = _zimage_processor_cls()
    count = 0
    for module in transformer.modules():
        if isinstance(module, ZImageTransformerBlock) and _zimage_block_ok(module, RMSNorm):
            if _patch_forward(module, _zimage_block_forward):
                count += 1
                register_external(module, [n.weight for n in (module.attention_norm1, module.attention_norm2,
                                                               module.ffn_norm1, module.ffn_norm2)])
            attn = module.attention
            proc = getattr(attn, "processor", None)
            if type(proc) is ZSingleStreamAttnProcessor and _ORIG_PROC not in attn.__dict__:
                new = proc_cls()
                new.__dict__.update(proc.__dict__)  # keeps an attention backend / parallel config already set
                attn.__dict__[_ORIG_PROC] = proc
                attn.set_processor(new)
                register_external(attn, [getattr(n, "weight", None) for n in (attn.norm_q, attn.norm_k)
                                          if n is not None])
                count += 1
        elif isinstance(module, FinalLayer):
            count += _patch_forward(module, _zimage_final_forward)
    return count


# ------------------------------------------------------------------------------------------ FLUX.2
def _flux2_classes():
    from diffusers.models.normalization import AdaLayerNormContinuous
    from diffusers.models.transformers.transformer_flux2 import (Flux2Modulation, Flux2SingleTransformerBlock,
                                                                 Flux2TransformerBlock)
    return AdaLayerNormContinuous, Flux2Modulation, Flux2SingleTransformerBlock, Flux2TransformerBlock


def _flux2_block_forward(self, hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt,
                         image_rotary_emb=None, joint_attention_kwargs=None):
    if not (_per_sample(temb_mod_img) and _per_sample(temb_mod_txt)):
        return _orig(self)(hidden_states, encoder_hidden_states, temb_mod_img, temb_mod_txt, image_rotary_emb,
                           joint_attention_kwargs)
    _, Flux2Modulation, _, _ = _flux2_classes()
    joint_attention_kwargs = joint_attention_kwargs or {}
    (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = Flux2Modulation.split(temb_mod_img, 2)
    (c_shift_msa, c_scale_msa, c_gate_msa), (c_shift_mlp, c_scale_mlp, c_gate_mlp) = Flux2Modulation.split(
        temb_mod_txt, 2)
    norm_h = layer_norm_modulated(hidden_states, scale_msa, shift_msa, self.norm1.eps)
    norm_e = layer_norm_modulated(encoder_hidden_states, c_scale_msa, c_shift_msa, self.norm1_context.eps)
    attn_output, context_attn_output = self.attn(hidden_states=norm_h, encoder_hidden_states=norm_e,
                                                 image_rotary_emb=image_rotary_emb, **joint_attention_kwargs)
    hidden_states, norm_h = gated_residual_layer_norm(hidden_states, attn_output, gate_msa, scale_mlp, shift_mlp,
                                                      self.norm2.eps)
    hidden_states = gated_residual_layer_norm(hidden_states, self.ff(norm_h), gate_mlp, norm=False)
    encoder_hidden_states, norm_e = gated_residual_layer_norm(encoder_hidden_states, context_attn_output,
                                                              c_gate_msa, c_scale_mlp, c_shift_mlp,
                                                              self.norm2_context.eps)
    encoder_hidden_states = gated_residual_layer_norm(encoder_hidden_states, self.ff_context(norm_e), c_gate_mlp,
                                                      norm=False)
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
    return encoder_hidden_states, hidden_states


def _flux2_single_forward(self, hidden_states, encoder_hidden_states, temb_mod, image_rotary_emb=None,
                          joint_attention_kwargs=None, split_hidden_states=False, text_seq_len=None):
    if not _per_sample(temb_mod):
        return _orig(self)(hidden_states, encoder_hidden_states, temb_mod, image_rotary_emb, joint_attention_kwargs,
                           split_hidden_states, text_seq_len)
    _, Flux2Modulation, _, _ = _flux2_classes()
    if encoder_hidden_states is not None:
        text_seq_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    mod_shift, mod_scale, mod_gate = Flux2Modulation.split(temb_mod, 1)[0]
    norm_hidden_states = layer_norm_modulated(hidden_states, mod_scale, mod_shift, self.norm.eps)
    attn_output = self.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                            **(joint_attention_kwargs or {}))
    hidden_states = gated_residual_layer_norm(hidden_states, attn_output, mod_gate, norm=False)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    if split_hidden_states:
        return hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
    return hidden_states


def _ada_ln_continuous_forward(self, x, conditioning_embedding):
    emb = self.linear(self.silu(conditioning_embedding).to(x.dtype))
    scale, shift = torch.chunk(emb, 2, dim=1)
    return layer_norm_modulated(x, scale, shift, self.norm.eps)


def patch_flux2(transformer: nn.Module) -> int:
    """Patch every FLUX.2 double/single block and the output AdaLayerNormContinuous inside `transformer`."""
    AdaLayerNormContinuous, _, Flux2SingleTransformerBlock, Flux2TransformerBlock = _flux2_classes()
    count = 0
    for module in transformer.modules():
        if isinstance(module, Flux2TransformerBlock):
            if all(_is_plain_ln(n) for n in (module.norm1, module.norm1_context, module.norm2, module.norm2_context)):
                count += _patch_forward(module, _flux2_block_forward)
        elif isinstance(module, Flux2SingleTransformerBlock):
            if _is_plain_ln(module.norm):
                count += _patch_forward(module, _flux2_single_forward)
    norm_out = getattr(transformer, "norm_out", None)
    if type(norm_out) is AdaLayerNormContinuous and _is_plain_ln(norm_out.norm):
        count += _patch_forward(norm_out, _ada_ln_continuous_forward)
    return count


# ------------------------------------------------------------------------------------------ common
def unpatch(transformer: nn.Module) -> int:
    """Undo `patch_zimage` / `patch_flux2` on every submodule; returns the number of modules restored."""
    count = 0
    for module in transformer.modules():
        count += _unpatch_forward(module)
        _unregister_external(module)
        proc = module.__dict__.pop(_ORIG_PROC, None)
        if proc is not None:
            current = getattr(module, "processor", None)
            for name in ("_attention_backend", "_parallel_config"):  # keep a backend chosen after patching
                if current is not None and name in current.__dict__:
                    setattr(proc, name, current.__dict__[name])
            module.set_processor(proc)
            count += 1
    return count


def is_patched(transformer: nn.Module) -> bool:
    return any(_ORIG in m.__dict__ or _ORIG_PROC in m.__dict__ for m in transformer.modules())
