"""FLUX.2-klein's fused teacher/student forward (`train.dual_forward: fused`, see dual.py).

`_stream` is `Flux2Transformer2DModel.forward` (diffusers 0.42) for one role, written as a stream: the double
blocks (`Flux2TransformerBlock` with `Flux2AttnProcessor`), the single blocks (`Flux2SingleTransformerBlock`
with `Flux2ParallelSelfAttnProcessor`), norm_out and proj_out are re-stated with every linear yielded; the
position embedding, RoPE, norms and attention are the model's own parameter-free pieces. Each role has its own
sequence: [text, noisy latents, references] with the student's references, or with the teacher's (the
student's, then the target image), so the two lengths differ. What depends on the timestep alone (the time
embedding, the three shared modulations and norm_out's) is computed once for both roles when they share it.
With gradient checkpointing each block is one checkpointed unit, as in the model. The KV-cache modes and
guidance are not used by training, so not here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dual import Checkpointed, Linear, fused_call, lockstep, shared_once
from .flux2_klein import KleinContext, image_ids, pack, unpack


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope) -> torch.Tensor:
    """RoPE and attention of both FLUX.2 processors, (B, S, heads, head_dim) -> (B, S, heads * head_dim)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.embeddings import apply_rotary_emb

    q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    out = dispatch_attention_fn(q, k, v, backend=getattr(attn.processor, "_attention_backend", None))
    return out.flatten(2, 3).to(q.dtype)


def _heads(attn: nn.Module, *ts: torch.Tensor):
    return (t.unflatten(-1, (-1, attn.head_dim)) for t in ts)


def _joint_attention(attn: nn.Module, h: torch.Tensor, e: torch.Tensor, rope):
    """Flux2AttnProcessor.__call__ (separate projections) as a stream: (image out, text out)."""
    if getattr(attn, "fused_projections", False):
        raise NotImplementedError("fused forward: FLUX.2 attention with fused QKV projections")
    q, k, v, eq, ek, ev = yield [Linear(attn.to_q, h), Linear(attn.to_k, h), Linear(attn.to_v, h),
                                 Linear(attn.add_q_proj, e), Linear(attn.add_k_proj, e), Linear(attn.add_v_proj, e)]
    q, k, v, eq, ek, ev = _heads(attn, q, k, v, eq, ek, ev)
    out = _attend(attn, torch.cat([attn.norm_added_q(eq), attn.norm_q(q)], dim=1),
                  torch.cat([attn.norm_added_k(ek), attn.norm_k(k)], dim=1), torch.cat([ev, v], dim=1), rope)
    out_e, out_h = out.split_with_sizes([e.shape[1], h.shape[1]], dim=1)
    out_e, out_h = yield [Linear(attn.to_add_out, out_e), Linear(attn.to_out[0], out_h)]
    return attn.to_out[1](out_h), out_e


def _feed_forward(ff: nn.Module, x: torch.Tensor):
    """Flux2FeedForward.forward as a stream."""
    out = yield Linear(ff.linear_out, ff.act_fn((yield Linear(ff.linear_in, x))))
    return out


def _double_block(blk: nn.Module, h, e, mod_img, mod_txt, rope):
    """Flux2TransformerBlock.forward as a stream: (image stream, text stream)."""
    from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

    (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = Flux2Modulation.split(mod_img, 2)
    (c_shift_msa, c_scale_msa, c_gate_msa), (c_shift_mlp, c_scale_mlp, c_gate_mlp) = Flux2Modulation.split(
        mod_txt, 2)
    attn_h, attn_e = yield from _joint_attention(blk.attn, (1 + scale_msa) * blk.norm1(h) + shift_msa,
                                                 (1 + c_scale_msa) * blk.norm1_context(e) + c_shift_msa, rope)
    h = h + gate_msa * attn_h
    h = h + gate_mlp * (yield from _feed_forward(blk.ff, blk.norm2(h) * (1 + scale_mlp) + shift_mlp))
    e = e + c_gate_msa * attn_e
    e = e + c_gate_mlp * (yield from _feed_forward(blk.ff_context,
                                                   blk.norm2_context(e) * (1 + c_scale_mlp) + c_shift_mlp))
    return h, e.clip(-65504, 65504) if e.dtype == torch.float16 else e


def _single_block(blk: nn.Module, x, mod, rope):
    """Flux2SingleTransformerBlock.forward (text already joined) with Flux2ParallelSelfAttnProcessor, a stream."""
    from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

    shift, scale, gate = Flux2Modulation.split(mod, 1)[0]
    attn = blk.attn
    proj = yield Linear(attn.to_qkv_mlp_proj, (1 + scale) * blk.norm(x) + shift)
    qkv, mlp = proj.split([3 * attn.inner_dim, proj.shape[-1] - 3 * attn.inner_dim], dim=-1)
    q, k, v = _heads(attn, *qkv.chunk(3, dim=-1))
    out = _attend(attn, attn.norm_q(q), attn.norm_k(k), v, rope)
    x = x + gate * (yield Linear(attn.to_out, torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1)))
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def _block(fn, checkpoint: bool, *args):
    """One block; with gradient checkpointing one checkpointed unit, as in the model."""
    if checkpoint:
        return (yield Checkpointed(fn, args))
    return (yield from fn(*args))


def _stream(tr: nn.Module, tokens: torch.Tensor, embeds: torch.Tensor, ids: torch.Tensor, act: torch.Tensor,
            n_out: int, checkpoint: bool):
    """One role's forward: tokens [noisy, references], text embeddings, the position ids of [text, tokens] and
    act = silu(time embedding). Returns the model's output for the first `n_out` (noisy) tokens."""
    n_txt = embeds.shape[1]
    # `act` is one tensor object for both roles when they share the time embedding: a shared frozen
    # modulation linear then runs once (dual._shared_call)
    mod_img, mod_txt, mod_single = yield [Linear(tr.double_stream_modulation_img.linear, act),
                                          Linear(tr.double_stream_modulation_txt.linear, act),
                                          Linear(tr.single_stream_modulation.linear, act)]
    h, e = yield [Linear(tr.x_embedder, tokens), Linear(tr.context_embedder, embeds)]
    rope = tr.pos_embed(ids)  # per row: the same as the model's text and image halves concatenated
    for blk in tr.transformer_blocks:
        h, e = yield from _block(_double_block, checkpoint, blk, h, e, mod_img, mod_txt, rope)
    x = torch.cat([e, h], dim=1)
    for blk in tr.single_transformer_blocks:
        x = yield from _block(_single_block, checkpoint, blk, x, mod_single, rope)
    # norm_out and proj_out are per token: only the predicted tokens go through them
    x = x[:, n_txt:n_txt + n_out]
    scale, shift = (yield Linear(tr.norm_out.linear, act.to(x.dtype))).chunk(2, dim=1)
    out = yield Linear(tr.proj_out, tr.norm_out.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :])
    return out


def _inputs(ctx: KleinContext, x: torch.Tensor, dtype: torch.dtype):
    """(tokens, text embeddings, ids of [text, tokens]) of one role, as `Flux2KleinBackend.velocity` builds them."""
    batch, _, height, width = x.shape
    tokens, ids = pack(x.to(dtype)), image_ids(height, width, device=x.device)
    if ctx.ref_tokens is not None:
        tokens = torch.cat([tokens, ctx.ref_tokens.to(tokens).expand(batch, -1, -1)], dim=1)
        ids = torch.cat([ids, ctx.ref_ids.to(x.device)])
    return tokens, ctx.prompt_embeds.to(dtype).expand(batch, -1, -1), torch.cat([ctx.text_ids.to(x.device), ids])


def _time_act(tr: nn.Module, sig: torch.Tensor) -> torch.Tensor:
    """silu(time embedding): the input of every modulation linear (guidance=None, as the backend calls it)."""
    return F.silu(tr.time_guidance_embed(sig.to(tr.dtype) * 1000, None))


def dual_velocity(backend, teacher_model: nn.Module, student_model: nn.Module, x: torch.Tensor,
                  sigma: float | torch.Tensor, c_teacher: KleinContext,
                  c_student: KleinContext) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_teacher, v_student) at state x, as `backend.velocity` computes them one at a time."""
    batch, _, height, width = x.shape
    sig = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(batch)

    def body(tr_t: nn.Module, tr_s: nn.Module):
        act_s = _time_act(tr_s, sig)
        with torch.no_grad():
            act_t = act_s if shared_once(tr_t.time_guidance_embed, tr_s.time_guidance_embed) else _time_act(tr_t, sig)
            inputs_t = _inputs(c_teacher, x, tr_t.dtype)
        ckpt = bool(tr_s.gradient_checkpointing) and torch.is_grad_enabled()  # as the model decides it
        out_t, out_s = lockstep(_stream(tr_t, *inputs_t, act_t, height * width, ckpt),
                                _stream(tr_s, *_inputs(c_student, x, tr_s.dtype), act_s, height * width, ckpt))
        return unpack(out_t, height, width), unpack(out_s, height, width)

    return fused_call(teacher_model, student_model, body, x)
