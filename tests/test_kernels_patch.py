"""dopsd_kernels.patch on the real diffusers classes: tiny Z-Image and FLUX.2 transformers, patched vs unpatched.

Same outputs and parameter gradients within tolerance, state_dict unchanged, reversible, exact with the
kernels switched off (the eager references replicate diffusers op by op).
"""
import os

import torch

if not torch.cuda.is_available():  # must precede the first import of dopsd_kernels (Triton reads it then)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402

import pytest  # noqa: E402

import dopsd_kernels  # noqa: E402
from dopsd_kernels.patch import is_patched, patch_flux2, patch_zimage, unpatch  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ---------------------------------------------------------------------------------------------- helpers
def _perturb(model, seed):
    """Random norm weights and adaLN/modulation layers, so every scale, shift and gate matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
            if "norm" in name and p.dim() == 1:
                p.add_(0.2 * noise)
            elif "adaLN" in name or "modulation" in name or "norm_out" in name:
                p.copy_(0.1 * noise)
            elif "pad_token" in name:
                p.copy_(noise)


def _kernel_ops(tensors) -> set[str]:
    """Names of the dopsd ops in the autograd graph behind `tensors`."""
    seen, names, stack = set(), set(), [t.grad_fn for t in tensors if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if "dopsd" in fn.name():
            names.add(fn.name().split("dopsd_")[1].split("_default")[0])
        stack.extend(f for f, _ in fn.next_functions)
    return names


def _outputs_and_grads(model, call):
    model.zero_grad(set_to_none=True)
    outs = call(model)
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).view_as(o)).sum() for o in outs)
    ops = _kernel_ops(outs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach().clone() for o in outs], grads, ops


def _assert_close(a, b, rtol):
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(1e-3, b.abs().max().item()))


def _compare(ref, got, rtol):
    (o_ref, g_ref, _), (o_got, g_got, _) = ref, got
    for a, b in zip(o_got, o_ref):
        _assert_close(a, b, rtol)
    assert set(g_got) == set(g_ref)
    for name in g_ref:
        _assert_close(g_got[name], g_ref[name], rtol)


def _state_signature(model):
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- Z-Image
def _tiny_zimage():
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[16, 8, 8], axes_lens=[256, 64, 64]).to(DEV)
    _perturb(model, 1)
    return model


def _zimage_call():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(16, 1, 8, 8, generator=g).to(DEV), torch.randn(16, 1, 6, 10, generator=g).to(DEV)]
    caps = [torch.randn(5, 32, generator=g).to(DEV), torch.randn(9, 32, generator=g).to(DEV)]
    t = torch.tensor([0.3, 0.8], device=DEV)

    def call(model):
        return model(xs, t, caps, return_dict=False)[0]

    return call


ZIMAGE_OPS = {"rms_norm_mod_fwd", "gated_rms_norm_residual_fwd", "rope_apply_fwd", "layer_norm_mod_fwd"}


def test_zimage_patched_matches_unpatched():
    model, call = _tiny_zimage(), _zimage_call()
    sig, values = _state_signature(model), {k: v.clone() for k, v in model.state_dict().items()}
    ref = _outputs_and_grads(model, call)
    assert not ref[2]

    # 3 main/refiner blocks x (forward + processor) ... : every block, processor and the final layer
    n_blocks = len(model.layers) + len(model.noise_refiner) + len(model.context_refiner)
    assert patch_zimage(model) == 2 * n_blocks + len(model.all_final_layer)
    assert patch_zimage(model) == 0  # idempotent
    assert is_patched(model)
    assert _state_signature(model) == sig
    assert all(torch.equal(v, values[k]) for k, v in model.state_dict().items())

    got = _outputs_and_grads(model, call)
    assert got[2] == ZIMAGE_OPS, got[2]
    _compare(ref, got, rtol=2e-5)

    assert unpatch(model) == 2 * n_blocks + len(model.all_final_layer)
    assert not is_patched(model)
    again = _outputs_and_grads(model, call)
    assert not again[2]
    assert all(torch.equal(a, b) for a, b in zip(again[0], ref[0]))


def test_zimage_patch_is_exact_with_kernels_off(monkeypatch):
    """With DOPSD_KERNELS=0 the patched forward runs the references, which replicate diffusers bit for bit."""
    model, call = _tiny_zimage(), _zimage_call()
    ref = _outputs_and_grads(model, call)
    patch_zimage(model)
    monkeypatch.setenv(dopsd_kernels.ENV_SWITCH, "0")
    got = _outputs_and_grads(model, call)
    assert not got[2]
    assert all(torch.equal(a, b) for a, b in zip(got[0], ref[0]))
    assert all(torch.equal(got[1][n], ref[1][n]) for n in ref[1])


def test_zimage_patch_with_lora_deepcopy_and_gradient_checkpointing():
    """The trainer's setting: a PEFT LoRA adapter on attention, FFN and adaLN; an EMA copy; checkpointing."""
    from peft import LoraConfig

    model, call = _tiny_zimage(), _zimage_call()
    targets = (r".*(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.w[123]"
               r"|(layers|noise_refiner)\.\d+\.adaLN_modulation\.0)")
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator(device=p.device).manual_seed(len(name)))
    sig = _state_signature(model)
    ref = _outputs_and_grads(model, call)
    assert any("lora_A" in n for n in ref[1])
    patch_zimage(model)
    assert _state_signature(model) == sig
    clone = copy.deepcopy(model)  # what an EMA teacher of a full fine-tune does
    assert is_patched(clone)
    block = clone.layers[0]
    assert block.forward.__self__ is block and block._dopsd_orig_forward.__self__ is block
    clone.enable_gradient_checkpointing()
    clone.train()
    got = _outputs_and_grads(clone, call)
    assert got[2] == ZIMAGE_OPS
    _compare(ref, got, rtol=2e-5)


def test_zimage_patch_under_bf16_autocast():
    """Mixed precision (train.mixed_precision=bf16): patched error vs fp32 at most 2x the unpatched error."""
    model, call = _tiny_zimage(), _zimage_call()
    truth, _, _ = _outputs_and_grads(model, call)

    def autocast_call(m):
        with torch.autocast(DEV, dtype=torch.bfloat16):
            return call(m)

    eager, _, _ = _outputs_and_grads(model, autocast_call)
    patch_zimage(model)
    got, _, ops = _outputs_and_grads(model, autocast_call)
    assert ops == ZIMAGE_OPS
    for g, e, t in zip(got, eager, truth):
        assert g.dtype == e.dtype
        err_k = ((g.float() - t).norm() / t.norm()).item()
        err_e = ((e.float() - t).norm() / t.norm()).item()
        assert err_k <= 2 * err_e + 1e-3, (err_k, err_e)


# ---------------------------------------------------------------------------------------------- FLUX.2
def _tiny_flux2():
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    model = Flux2Transformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                    timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
                                    guidance_embeds=False).to(DEV)
    _perturb(model, 3)
    return model


def _flux2_call():
    g = torch.Generator().manual_seed(4)
    h, w, txt = 5, 7, 6
    hidden = torch.randn(2, h * w, 4, generator=g).to(DEV)
    enc = torch.randn(2, txt, 16, generator=g).to(DEV)
    axes = (torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(), torch.zeros(1))
    img_ids = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 4).to(DEV)
    txt_ids = torch.zeros(txt, 4, device=DEV)
    txt_ids[:, 3] = torch.arange(txt, device=DEV)
    t = torch.tensor([0.25, 0.9], device=DEV)

    def call(model):
        return [model(hidden_states=hidden, encoder_hidden_states=enc, timestep=t, img_ids=img_ids,
                      txt_ids=txt_ids, return_dict=False)[0]]

    return call


def test_flux2_patched_matches_unpatched(monkeypatch):
    model, call = _tiny_flux2(), _flux2_call()
    sig = _state_signature(model)
    ref = _outputs_and_grads(model, call)
    n = len(model.transformer_blocks) + len(model.single_transformer_blocks) + 1
    assert patch_flux2(model) == n
    assert _state_signature(model) == sig
    got = _outputs_and_grads(model, call)
    assert got[2] == {"layer_norm_mod_fwd", "gated_residual_layer_norm_fwd"}, got[2]
    _compare(ref, got, rtol=2e-5)

    monkeypatch.setenv(dopsd_kernels.ENV_SWITCH, "0")  # references: bit-identical to diffusers
    off = _outputs_and_grads(model, call)
    assert all(torch.equal(a, b) for a, b in zip(off[0], ref[0]))
    assert unpatch(model) == n and not is_patched(model)


# ---------------------------------------------------------------------------------------------- GPU tier
@gpu
def test_gpu_zimage_patched_bf16():
    """A mid-size Z-Image (head_dim 128, 1024 image tokens) in bf16: patched error <= 2x unpatched error."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=768, n_layers=2, n_refiner_layers=1,
        n_heads=6, n_kv_heads=6, norm_eps=1e-5, qk_norm=True, cap_feat_dim=256, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512]).to("cuda")
    _perturb(model, 1)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(16, 1, 64, 64, generator=g).cuda() for _ in range(2)]
    caps = [torch.randn(77, 256, generator=g).cuda(), torch.randn(100, 256, generator=g).cuda()]
    t = torch.tensor([0.3, 0.8], device="cuda")

    def call(m):
        return m(xs if m.dtype == torch.float32 else [x.to(m.dtype) for x in xs], t,
                 caps if m.dtype == torch.float32 else [c.to(m.dtype) for c in caps], return_dict=False)[0]

    truth, g_truth, _ = _outputs_and_grads(model, call)
    model_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    eager, g_eager, _ = _outputs_and_grads(model_bf16, call)
    patch_zimage(model_bf16)
    got, g_got, ops = _outputs_and_grads(model_bf16, call)
    assert ops == ZIMAGE_OPS

    def rel(a, b):  # parameters with an all-zero gradient (x_pad_token: no padding here) compare exactly
        return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()

    for a, e, tr in zip(got, eager, truth):
        assert rel(a, tr) <= 2 * rel(e, tr) + 1e-3
    for name in g_truth:
        assert rel(g_got[name], g_truth[name]) <= 2 * rel(g_eager[name], g_truth[name]) + 1e-3, name
