"""Z-Image's fused teacher/student forward (`train.dual_forward: fused`, see dual.py).

`_stream` is `ZImageTransformer2DModel.forward` (diffusers 0.42) for one role, written as a stream: the
sequence building, padding, RoPE and unpatchify are the model's own methods; the blocks are re-stated here
with every linear yielded. The student runs the basic sequence ([image, caption]); the teacher the basic one
with its longer VLM caption, or the omni sequence with the clean reference image (`teacher_context:
reference`). The timestep embedding (noisy, and clean for the omni sequence) is computed once for both roles
when they share the embedder. SigLIP features and ControlNet residuals are not used by training, so not here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dual import Checkpointed, Linear, fused_call, lockstep, shared_once

PATCH, F_PATCH = 2, 1
KEY = f"{PATCH}-{F_PATCH}"


def _rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    from dopsd_kernels.reference import rope_apply  # the eager twin of the processor's apply_rotary_emb

    return rope_apply(x, freqs_cis)


def _attention(attn: nn.Module, h: torch.Tensor, mask: torch.Tensor | None, freqs: torch.Tensor):
    """ZSingleStreamAttnProcessor.__call__ with the projections yielded."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    q, k, v = yield [Linear(attn.to_q, h), Linear(attn.to_k, h), Linear(attn.to_v, h)]
    q, k, v = (t.unflatten(-1, (attn.heads, -1)) for t in (q, k, v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if freqs is not None:
        q, k = _rope(q, freqs), _rope(k, freqs)
    if mask is not None and mask.ndim == 2:
        mask = mask[:, None, None, :]
    out = dispatch_attention_fn(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                backend=getattr(attn.processor, "_attention_backend", None))
    out = out.flatten(2, 3).to(q.dtype)
    out = yield Linear(attn.to_out[0], out)
    return out


def _modulation(block_mod: nn.Module, adaln_input, noise_mask, t_noisy, t_clean, seq_len: int):
    """(scale_msa, gate_msa, scale_mlp, gate_mlp) of a modulated block; per token in the omni sequence."""
    from diffusers.models.transformers.transformer_z_image import select_per_token

    if noise_mask is None:
        mod = yield Linear(block_mod, adaln_input)
        scale_msa, gate_msa, scale_mlp, gate_mlp = mod.unsqueeze(1).chunk(4, dim=2)
        return 1.0 + scale_msa, gate_msa.tanh(), 1.0 + scale_mlp, gate_mlp.tanh()
    both = yield Linear(block_mod, torch.cat([t_noisy, t_clean]))  # one call for the noisy and clean rows
    noisy, clean = both.chunk(2, dim=0)
    s_msa_n, g_msa_n, s_mlp_n, g_mlp_n = noisy.chunk(4, dim=1)
    s_msa_c, g_msa_c, s_mlp_c, g_mlp_c = clean.chunk(4, dim=1)
    pick = lambda n, c: select_per_token(n, c, noise_mask, seq_len)  # noqa: E731
    return (pick(1.0 + s_msa_n, 1.0 + s_msa_c), pick(g_msa_n.tanh(), g_msa_c.tanh()),
            pick(1.0 + s_mlp_n, 1.0 + s_mlp_c), pick(g_mlp_n.tanh(), g_mlp_c.tanh()))


def _block(blk: nn.Module, x, mask, freqs, adaln_input=None, noise_mask=None, t_noisy=None, t_clean=None):
    """ZImageTransformerBlock.forward as a stream."""
    if blk.modulation:
        scale_msa, gate_msa, scale_mlp, gate_mlp = yield from _modulation(
            blk.adaLN_modulation[0], adaln_input, noise_mask, t_noisy, t_clean, x.shape[1])
        attn_out = yield from _attention(blk.attention, blk.attention_norm1(x) * scale_msa, mask, freqs)
        x = x + gate_msa * blk.attention_norm2(attn_out)
        ff = yield from _feed_forward(blk.feed_forward, blk.ffn_norm1(x) * scale_mlp)
        return x + gate_mlp * blk.ffn_norm2(ff)
    attn_out = yield from _attention(blk.attention, blk.attention_norm1(x), mask, freqs)
    x = x + blk.attention_norm2(attn_out)
    ff = yield from _feed_forward(blk.feed_forward, blk.ffn_norm1(x))
    return x + blk.ffn_norm2(ff)


def _blocks(layers: nn.ModuleList, x, checkpoint: bool, *args):
    """A run of blocks; with gradient checkpointing each block is one checkpointed unit, as in the model."""
    for layer in layers:
        if checkpoint:
            x = yield Checkpointed(_block, (layer, x, *args))
        else:
            x = yield from _block(layer, x, *args)
    return x


def _feed_forward(ff: nn.Module, h: torch.Tensor):
    h1, h3 = yield [Linear(ff.w1, h), Linear(ff.w3, h)]
    out = yield Linear(ff.w2, F.silu(h1) * h3)
    return out


def _final(layer: nn.Module, x, adaln_input, noise_mask, t_noisy, t_clean):
    """FinalLayer.forward as a stream."""
    from diffusers.models.transformers.transformer_z_image import select_per_token

    linear = layer.adaLN_modulation[1]  # after the SiLU at [0]
    if noise_mask is None:
        scale = (1.0 + (yield Linear(linear, F.silu(adaln_input)))).unsqueeze(1)
    else:
        both = yield Linear(linear, F.silu(torch.cat([t_noisy, t_clean])))
        noisy, clean = both.chunk(2, dim=0)
        scale = select_per_token(1.0 + noisy, 1.0 + clean, noise_mask, x.shape[1])
    out = yield Linear(layer.linear, layer.norm_final(x) * scale)
    return out


def _stream(tr: nn.Module, x: list, cap_feats: list, t_noisy: torch.Tensor, t_clean: torch.Tensor | None,
            image_noise_mask: list | None, checkpoint: bool):
    """One role's forward: flat lists (basic) or nested ones with `image_noise_mask` (omni, t_clean given).
    Returns the model output per sample, as the model's forward."""
    omni = image_noise_mask is not None
    device = x[0][-1].device if omni else x[0].device
    adaln_input = None if omni else t_noisy
    if omni:
        (x, cap_feats, _sig, x_size, x_pos_ids, cap_pos_ids, _sig_pos, x_pad_mask, cap_pad_mask, _sig_pad,
         x_pos_offsets, x_noise_mask, cap_noise_mask, _sig_noise) = tr.patchify_and_embed_omni(
            x, cap_feats, [None] * len(x), PATCH, F_PATCH, image_noise_mask)
    else:
        x, cap_feats, x_size, x_pos_ids, cap_pos_ids, x_pad_mask, cap_pad_mask = tr.patchify_and_embed(
            x, cap_feats, PATCH, F_PATCH)
        x_pos_offsets = x_noise_mask = cap_noise_mask = None

    x_seqlens = [len(xi) for xi in x]
    x = yield Linear(tr.all_x_embedder[KEY], torch.cat(x, dim=0))
    x, x_freqs, x_mask, _, x_noise = tr._prepare_sequence(list(x.split(x_seqlens, dim=0)), x_pos_ids, x_pad_mask,
                                                         tr.x_pad_token, x_noise_mask, device)
    x = yield from _blocks(tr.noise_refiner, x, checkpoint, x_mask, x_freqs, adaln_input, x_noise, t_noisy, t_clean)

    cap_seqlens = [len(ci) for ci in cap_feats]
    cap = yield Linear(tr.cap_embedder[1], tr.cap_embedder[0](torch.cat(cap_feats, dim=0)))
    cap, cap_freqs, cap_mask, _, _ = tr._prepare_sequence(list(cap.split(cap_seqlens, dim=0)), cap_pos_ids,
                                                          cap_pad_mask, tr.cap_pad_token, None, device)
    cap = yield from _blocks(tr.context_refiner, cap, checkpoint, cap_mask, cap_freqs)

    unified, freqs, mask, noise = tr._build_unified_sequence(
        x, x_freqs, x_seqlens, x_noise_mask, cap, cap_freqs, cap_seqlens, cap_noise_mask, None, None, None, None,
        omni, device)
    unified = yield from _blocks(tr.layers, unified, checkpoint, mask, freqs, adaln_input, noise, t_noisy, t_clean)
    unified = yield from _final(tr.all_final_layer[KEY], unified, adaln_input, noise, t_noisy, t_clean)
    return tr.unpatchify(list(unified.unbind(dim=0)), x_size, PATCH, F_PATCH, x_pos_offsets)


def _embed_timesteps(tr: nn.Module, t: torch.Tensor, clean: bool, like: torch.Tensor):
    """(noisy, clean or None) timestep embeddings; one embedder call for both rows."""
    ts = torch.cat([t, torch.ones_like(t)]) if clean else t
    emb = tr.t_embedder(ts * tr.t_scale).type_as(like)
    return emb.chunk(2, dim=0) if clean else (emb, None)


def dual_velocity(backend, teacher_model: nn.Module, student_model: nn.Module, x: torch.Tensor,
                  sigma: float | torch.Tensor, c_teacher, c_student) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_teacher, v_student) at state x, as `backend.velocity` computes them one at a time."""
    from .zimage import ReferenceContext

    batch = x.shape[0]
    sig = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(batch)
    reference = isinstance(c_teacher, ReferenceContext)
    if isinstance(c_student, ReferenceContext):
        raise ValueError("fused forward: the student's context is text features, not a reference context")

    def body(tr_t: nn.Module, tr_s: nn.Module):
        dtype = tr_s.dtype
        latents = list(x.to(dtype).unsqueeze(2).unbind(0))
        t = 1.0 - sig
        if shared_once(tr_t.t_embedder, tr_s.t_embedder):  # the same frozen embedder: one call for both roles
            noisy_s, clean_t = _embed_timesteps(tr_s, t, reference, latents[0])
            noisy_t = noisy_s
        else:
            noisy_s, _ = _embed_timesteps(tr_s, t, False, latents[0])
            with torch.no_grad():
                noisy_t, clean_t = _embed_timesteps(tr_t, t, reference, latents[0])
        ckpt = bool(tr_s.gradient_checkpointing) and torch.is_grad_enabled()  # as the model decides it
        s = _stream(tr_s, latents, [c.to(dtype) for c in c_student], noisy_s, None, None, ckpt)
        if reference:
            refs = c_teacher.latents.to(dtype).unsqueeze(2).unbind(0)
            te = _stream(tr_t, [[r, z] for r, z in zip(refs, latents)], [[c[:1].to(dtype), c.to(dtype)]
                                                                          for c in c_teacher.text],
                         noisy_t, clean_t, [[0, 1]] * batch, ckpt)
        else:
            te = _stream(tr_t, latents, [c.to(dtype) for c in c_teacher], noisy_t, None, None, ckpt)
        out_t, out_s = lockstep(te, s)
        return -torch.stack(out_t).squeeze(2), -torch.stack(out_s).squeeze(2)

    return fused_call(teacher_model, student_model, body, x)
