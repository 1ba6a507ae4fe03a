"""dopsd_kernels ops vs their eager references (Triton interpreter on CPU; compiled Triton on a GPU).

Every op: odd, non-power-of-two shapes; fp32 and fp16/bf16 inputs; the output and the gradient of every
input; fp64 gradcheck on tiny shapes. Half-precision results are judged against an fp64 evaluation of the
same (rounded) inputs: the kernel's error may be at most 2x the eager half-precision error, plus one
half-precision ulp of the result's magnitude (the eager error of an exactly-representable result can be 0).
The GPU tier at the bottom runs real Z-Image / FLUX.2 sizes in bf16 under the same rule.
"""
import os

import torch

if not torch.cuda.is_available():  # must precede the first import of dopsd_kernels (Triton reads it then)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from conftest import run_without_triton  # noqa: E402

import dopsd_kernels as K  # noqa: E402
from dopsd_kernels import reference as R  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
HALF = [torch.bfloat16, torch.float16]
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Odd shapes: 3 samples x 37 tokens x 37 channels -> partial row tiles, 3 backward chunks per sample
# (the interpreter tiles 16 rows), masked columns (block 64).
B, S, D = 3, 37, 37


# ---------------------------------------------------------------------------------------------- helpers
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, scale=1.0, shift=0.0):
    return (torch.randn(tuple(shape), generator=_gen(seed)) * scale + shift).to(DEV)


def _param(kind, seed, scale=0.3):
    """A modulation parameter in one of the layouts the ops accept."""
    if kind is None:
        return None
    shape = {"BD": (B, D), "B1D": (B, 1, D), "D": (D,)}[kind]
    return _randn(*shape, seed=seed, scale=scale)


def _prep(tensors, dtype):
    """Leaf copies in `dtype` that require grad (None stays None)."""
    return [None if t is None else t.detach().to(dtype).requires_grad_(True) for t in tensors]


def _run(fn, inputs, seed=99):
    """Outputs (tuple) and the gradients of every input for fixed random upstream gradients."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads_out = [_randn(*o.shape, seed=seed + i).to(o.dtype) for i, o in enumerate(outs)]
    live = [t for t in inputs if t is not None]
    grads = torch.autograd.grad(outs, live, grads_out, allow_unused=True)
    return [o.detach() for o in outs], list(grads), live


def _uses_kernel(t: torch.Tensor) -> bool:
    return t.grad_fn is not None and "dopsd" in t.grad_fn.name()


def _ulp(dtype):
    return torch.finfo(dtype).eps


def _check_fp32(fn_k, fn_r, inputs, rtol=3e-5):
    xs_k = _prep(inputs, torch.float32)
    xs_r = _prep(inputs, torch.float32)
    outs_k = fn_k(*xs_k)
    first = outs_k[0] if isinstance(outs_k, tuple) else outs_k
    assert _uses_kernel(first), f"the Triton path did not run: {first.grad_fn}"
    ok, gk, live = _run(fn_k, xs_k)
    orf, gr, _ = _run(fn_r, xs_r)
    for a, b in zip(ok + gk, orf + gr):
        assert (a is None) == (b is None)
        if a is None:
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(1.0, b.abs().max().item()))


def _check_half(fn_k, fn_r, inputs, dtype):
    """kernel error <= 2 x eager error + 1 ulp(dtype) * max|truth|, truth = reference in fp64."""
    xs_k, xs_e = _prep(inputs, dtype), _prep(inputs, dtype)
    xs_t = _prep([None if t is None else t.to(dtype) for t in inputs], torch.float64)
    first = fn_k(*xs_k)
    assert _uses_kernel(first[0] if isinstance(first, tuple) else first), "the Triton path did not run"
    ok, gk, _ = _run(fn_k, xs_k)
    oe, ge, _ = _run(fn_r, xs_e)
    ot, gt, _ = _run(fn_r, xs_t)
    for i, (a, e, t) in enumerate(zip(ok + gk, oe + ge, ot + gt)):
        if t is None:
            assert a is None and e is None
            continue
        assert a.dtype == e.dtype, f"item {i}: dtype {a.dtype} != eager {e.dtype}"
        err_k = (a.double() - t).abs().max().item()
        err_e = (e.double() - t).abs().max().item()
        floor = _ulp(dtype) * t.abs().max().item()
        assert err_k <= 2 * err_e + floor, f"item {i}: kernel err {err_k:.3g} vs eager {err_e:.3g} (floor {floor:.3g})"


# ---------------------------------------------------------------------------------------------- setup
def test_interpreter_or_gpu_active():
    if torch.cuda.is_available():
        assert K.backend_name("cuda") == "triton"
    else:
        assert K.INTERPRET, ("dopsd_kernels was imported before TRITON_INTERPRET=1 was set, so these tests would "
                             "only exercise the eager fallback; set it in tests/conftest.py when CUDA is absent")
        assert K.backend_name("cpu") == "triton-interpreter"


def test_no_interpreter_cpu_falls_back_and_kernels_import_nothing_from_dopsd():
    """In a fresh interpreter without TRITON_INTERPRET: CPU tensors get the eager reference."""
    code = (
        "import sys, torch, dopsd_kernels as K, dopsd_kernels.patch\n"
        "assert not any(m == 'dopsd' or m.startswith('dopsd.') for m in sys.modules), 'imports dopsd'\n"
        "assert K.backend_name('cpu') == 'eager' and K.backend_name('cuda') == 'triton'\n"
        "x = torch.randn(2, 3, 8, requires_grad=True); s = torch.randn(2, 8)\n"
        "y = K.rms_norm_modulated(x, torch.ones(8), s)\n"
        "assert 'dopsd' not in y.grad_fn.name()\n"
        "assert torch.equal(y, K.reference.rms_norm_modulated(x, torch.ones(8), s))\n"
        # the repo root is on sys.path here: the folder imported as `kernels` (as transformers' probe does)
        # must not register the ops a second time
        "import kernels\n"
        "assert not hasattr(kernels, 'rms_norm_modulated') and 'kernels.rms_norm' not in sys.modules\n"
        "print('ok')\n")
    res = run_without_triton(code)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_env_switch_turns_kernels_off(monkeypatch):
    x = _randn(B, S, D, seed=1).requires_grad_(True)
    w, s = _randn(D, seed=2, shift=1.0), _param("BD", 3)
    assert _uses_kernel(K.rms_norm_modulated(x, w, s))
    monkeypatch.setenv(K.ENV_SWITCH, "0")
    assert not K.kernels_enabled()
    y = K.rms_norm_modulated(x, w, s)
    assert not _uses_kernel(y)
    assert torch.equal(y, R.rms_norm_modulated(x, w, s))
    assert K.backend_name(DEV) == "eager"


def test_unsupported_layouts_fall_back_to_reference():
    x = _randn(B, S, D, seed=1)
    per_token = _randn(B, S, D, seed=2, scale=0.3)
    y = K.rms_norm_modulated(x, _randn(D, seed=3), per_token)
    torch.testing.assert_close(y, R.rms_norm_modulated(x, _randn(D, seed=3), per_token))
    y = K.layer_norm_modulated(x, per_token, None)
    torch.testing.assert_close(y, R.layer_norm_modulated(x, per_token, None))


# ---------------------------------------------------------------------------------------------- references
def test_references_match_diffusers_bitwise():
    from diffusers.models.normalization import RMSNorm

    for dtype in (torch.float32, torch.bfloat16):
        norm = RMSNorm(D, eps=1e-5).to(DEV, dtype)
        with torch.no_grad():
            norm.weight.add_(_randn(D, seed=5, scale=0.1).to(dtype))
        x = _randn(B, S, D, seed=6).to(dtype)
        assert torch.equal(R.rms_norm(x, norm.weight, 1e-5), norm(x))
        # Z-Image's apply_rotary_emb, transcribed
        q = _randn(B, S, 2, 12, seed=7).to(dtype)
        ang = _randn(B, S, 6, seed=8)
        freqs = torch.polar(torch.ones_like(ang), ang)
        xc = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2))
        expect = torch.view_as_real(xc * freqs.unsqueeze(2)).flatten(3).type_as(q)
        assert torch.equal(R.rope_apply(q, freqs), expect)


# ---------------------------------------------------------------------------------------------- 1. loss
def _loss_inputs(shape=(B, 4, 5, 7)):
    return _randn(*shape, seed=11), _randn(*shape, seed=12), _randn(*shape, seed=13)


@pytest.mark.parametrize("space", ["x0", "v"])
@pytest.mark.parametrize("sigma_kind", ["float", "scalar", "per_sample"])
def test_distill_loss_fp32(space, sigma_kind):
    x, vs, vt = _loss_inputs((B, 3, 11, 13))  # 429 values per sample: 2 blocks in the interpreter
    sigma = {"float": 0.75, "scalar": torch.tensor(0.9, device=DEV),
             "per_sample": torch.tensor([1.0, 0.5, 0.25], device=DEV)}[sigma_kind]

    def k(x, vs):
        return K.distill_loss(x, vs, vt, sigma, space)

    def r(x, vs):
        return R.distill_loss(x, vs, vt, sigma, space)

    _check_fp32(k, r, [x, vs])


def test_distill_loss_matches_trainer_objective_and_sigma_grad():
    from dopsd.objectives import distill_loss as trainer_loss

    x, vs, vt = _loss_inputs()
    for space in ("x0", "v"):
        torch.testing.assert_close(K.distill_loss(x, vs, vt, 0.6, space), trainer_loss(x, vs, vt, 0.6, space))
    sig_k = torch.tensor([1.0, 0.5, 0.25], device=DEV, requires_grad=True)
    sig_r = sig_k.detach().clone().requires_grad_(True)
    vs_k = vs.clone().requires_grad_(True)
    loss_k = K.distill_loss(x, vs_k, vt, sig_k)
    assert _uses_kernel(loss_k)
    (g_k,) = torch.autograd.grad(loss_k, sig_k)
    (g_r,) = torch.autograd.grad(R.distill_loss(x, vs, vt, sig_r), sig_r)
    torch.testing.assert_close(g_k, g_r, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # no student gradient is computed or stored without autograd
        torch.testing.assert_close(K.distill_loss(x, vs, vt, sig_r), R.distill_loss(x, vs, vt, sig_r))
    vt_req = vt.clone().requires_grad_(True)  # the teacher is detached: no gradient reaches it
    K.distill_loss(x, vs_k, vt_req, 0.5).backward()
    assert vt_req.grad is None and vs_k.grad is not None


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("space", ["x0", "v"])
def test_distill_loss_half(dtype, space):
    x, vs, vt = _loss_inputs()
    sigma = torch.tensor([1.0, 0.9, 0.5], device=DEV)
    x32 = x.float()

    def k(vs, vt):
        return K.distill_loss(x32.to(vs.dtype) if vs.dtype == torch.float64 else x32, vs, vt, sigma, space)

    def r(vs, vt):
        return R.distill_loss(x32.to(vs.dtype) if vs.dtype == torch.float64 else x32, vs, vt, sigma, space)

    _check_half(k, r, [vs, vt], dtype)


def test_distill_loss_gradcheck():
    x, vs, vt = (t.double()[:2, :2, :2, :3] for t in _loss_inputs())
    x, vs = x.requires_grad_(True), vs.requires_grad_(True)
    sig = torch.tensor([0.8, 0.3], dtype=torch.float64, device=DEV, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, vs, s: K.distill_loss(x, vs, vt, s, "x0"), (x, vs, sig))
    assert torch.autograd.gradcheck(lambda vs: K.distill_loss(x, vs, vt, 0.5, "v"), (vs,))


# ---------------------------------------------------------------------------------------------- 2. RMSNorm
def _rms_inputs(scale_kind):
    return [_randn(B, S, D, seed=21, scale=2.0), _randn(D, seed=22, scale=0.2, shift=1.0), _param(scale_kind, 23)]


@pytest.mark.parametrize("scale_kind", ["BD", "B1D", "D", None])
def test_rms_norm_modulated_fp32(scale_kind):
    _check_fp32(lambda x, w, s: K.rms_norm_modulated(x, w, s, 1e-5),
                lambda x, w, s: R.rms_norm_modulated(x, w, s, 1e-5), _rms_inputs(scale_kind))


@pytest.mark.parametrize("dtype", HALF)
def test_rms_norm_modulated_half(dtype):
    _check_half(lambda x, w, s: K.rms_norm_modulated(x, w, s, 1e-5),
                lambda x, w, s: R.rms_norm_modulated(x, w, s, 1e-5), _rms_inputs("B1D"), dtype)


def test_rms_norm_per_head_and_mixed_dtypes():
    """The q/k-norm use (4-D, weight only, no scale) and an autocast-like mix (fp32 x, bf16 scale)."""
    q = _randn(2, 7, 3, 10, seed=24)
    w = _randn(10, seed=25, scale=0.2, shift=1.0)
    _check_fp32(lambda q, w: K.rms_norm_modulated(q, w, None, 1e-5),
                lambda q, w: R.rms_norm_modulated(q, w, None, 1e-5), [q, w])
    x, w, s = _rms_inputs("BD")
    y = K.rms_norm_modulated(x, w, s.bfloat16(), 1e-5)
    ref = R.rms_norm_modulated(x, w, s.bfloat16(), 1e-5)
    assert y.dtype == ref.dtype == torch.float32
    # eager rounds 1 + scale to bf16 (the kernel keeps it in fp32): one bf16 rounding apart
    torch.testing.assert_close(y, ref, rtol=2 ** -8, atol=2 ** -8)
    y = K.rms_norm_modulated(x, w.bfloat16(), None, 1e-5)  # a bf16 weight sets the output dtype
    assert y.dtype == R.rms_norm_modulated(x, w.bfloat16(), None, 1e-5).dtype == torch.bfloat16


def _boundary_inputs(gate_kind="BD", next_scale_kind="B1D"):
    return [_randn(B, S, D, seed=31), _randn(B, S, D, seed=32, scale=3.0), _randn(D, seed=33, scale=0.2, shift=1.0),
            _param(gate_kind, 34, scale=1.0), _randn(D, seed=35, scale=0.2, shift=1.0), _param(next_scale_kind, 36)]


@pytest.mark.parametrize("gate_kind,next_scale_kind,has_next",
                         [("BD", "B1D", True), ("B1D", "D", True), ("D", None, True), (None, None, True),
                          ("BD", None, False), (None, None, False)])
def test_gated_rms_norm_residual_fp32(gate_kind, next_scale_kind, has_next):
    def k(x, y, w, g, wn, sn):
        return K.gated_rms_norm_residual(x, y, w, g, wn, sn, eps=1e-5, next_eps=1e-6, has_next=has_next)

    def r(x, y, w, g, wn, sn):
        return R.gated_rms_norm_residual(x, y, w, g, wn, sn, eps=1e-5, next_eps=1e-6, has_next=has_next)

    inputs = _boundary_inputs(gate_kind, next_scale_kind)
    if not has_next:
        inputs[4] = None
    _check_fp32(k, r, inputs)


@pytest.mark.parametrize("dtype", HALF)
def test_gated_rms_norm_residual_half(dtype):
    def k(x, y, w, g, wn, sn):
        return K.gated_rms_norm_residual(x, y, w, g, wn, sn, eps=1e-5, next_eps=1e-5)

    def r(x, y, w, g, wn, sn):
        return R.gated_rms_norm_residual(x, y, w, g, wn, sn, eps=1e-5, next_eps=1e-5)

    _check_half(k, r, _boundary_inputs(), dtype)


def test_gated_rms_norm_residual_only_one_output_used():
    """Backward with a gradient on only x' (h unused) or only h (x' unused)."""
    xs_k, xs_r = _prep(_boundary_inputs(), torch.float32), _prep(_boundary_inputs(), torch.float32)
    for pick in (0, 1):
        out_k = K.gated_rms_norm_residual(*xs_k, eps=1e-5)[pick]
        out_r = R.gated_rms_norm_residual(*xs_r, eps=1e-5)[pick]
        g = _randn(*out_k.shape, seed=5)
        gk = torch.autograd.grad(out_k, xs_k, g, allow_unused=True)
        gr = torch.autograd.grad(out_r, xs_r, g, allow_unused=True)
        for a, b in zip(gk, gr):
            if b is None:
                assert a is None or not a.any()
            else:
                torch.testing.assert_close(a, b, rtol=3e-5, atol=3e-5 * max(1.0, b.abs().max().item()))


# ---------------------------------------------------------------------------------------------- 3. LayerNorm
def _ln_inputs(scale_kind="BD", shift_kind="B1D"):
    return [_randn(B, S, D, seed=41, scale=2.0, shift=0.5), _param(scale_kind, 42), _param(shift_kind, 43, 1.0)]


@pytest.mark.parametrize("scale_kind,shift_kind", [("BD", "B1D"), ("D", "BD"), ("B1D", None), (None, None)])
def test_layer_norm_modulated_fp32(scale_kind, shift_kind):
    _check_fp32(lambda x, s, sh: K.layer_norm_modulated(x, s, sh, 1e-6),
                lambda x, s, sh: R.layer_norm_modulated(x, s, sh, 1e-6), _ln_inputs(scale_kind, shift_kind))


@pytest.mark.parametrize("dtype", HALF)
def test_layer_norm_modulated_half(dtype):
    _check_half(lambda x, s, sh: K.layer_norm_modulated(x, s, sh, 1e-6),
                lambda x, s, sh: R.layer_norm_modulated(x, s, sh, 1e-6), _ln_inputs(), dtype)


def _res_ln_inputs(gate_kind="B1D"):
    return [_randn(B, S, D, seed=51), _randn(B, S, D, seed=52, scale=2.0), _param(gate_kind, 53, 1.0),
            _param("BD", 54), _param("B1D", 55, 1.0)]


@pytest.mark.parametrize("gate_kind,norm", [("B1D", True), ("D", True), (None, True), ("BD", False)])
def test_gated_residual_layer_norm_fp32(gate_kind, norm):
    inputs = _res_ln_inputs(gate_kind)
    if not norm:
        inputs[3] = inputs[4] = None
    _check_fp32(lambda x, y, g, s, sh: K.gated_residual_layer_norm(x, y, g, s, sh, 1e-6, norm),
                lambda x, y, g, s, sh: R.gated_residual_layer_norm(x, y, g, s, sh, 1e-6, norm), inputs)


@pytest.mark.parametrize("dtype", HALF)
def test_gated_residual_layer_norm_half(dtype):
    _check_half(lambda x, y, g, s, sh: K.gated_residual_layer_norm(x, y, g, s, sh, 1e-6),
                lambda x, y, g, s, sh: R.gated_residual_layer_norm(x, y, g, s, sh, 1e-6), _res_ln_inputs(), dtype)


# ---------------------------------------------------------------------------------------------- 4. RoPE
def _freqs(batch, seed, s=S, p=5):
    ang = _randn(*((batch,) if batch else ()), s, p, seed=seed, scale=3.0)
    return torch.polar(torch.ones_like(ang), ang)


def _rope_fns(freqs):
    return (lambda q: K.rope_apply(q, freqs)), (lambda q: R.rope_apply(q, freqs))


@pytest.mark.parametrize("freq_batch", [B, 1, None])
def test_rope_apply_fp32(freq_batch):
    q = _randn(B, S, 3, 10, seed=61)  # 3 heads, head_dim 10 -> 5 (odd) pairs
    _check_fp32(*_rope_fns(_freqs(freq_batch, 62)), [q])


@pytest.mark.parametrize("dtype", HALF)
def test_rope_apply_half(dtype):
    _check_half(*_rope_fns(_freqs(B, 63)), [_randn(B, S, 3, 10, seed=64)], dtype)


@pytest.mark.parametrize("freq_batch", [B, 1])
def test_rope_apply_freqs_grad(freq_batch):
    q = _randn(B, S, 3, 10, seed=65)
    f = _freqs(freq_batch, 66)
    qk, fk = q.clone().requires_grad_(True), f.clone().requires_grad_(True)
    qr, fr = q.clone().requires_grad_(True), f.clone().requires_grad_(True)
    yk, yr = K.rope_apply(qk, fk), R.rope_apply(qr, fr)
    assert _uses_kernel(yk)
    g = _randn(*yk.shape, seed=67)
    for a, b in zip(torch.autograd.grad(yk, (qk, fk), g), torch.autograd.grad(yr, (qr, fr), g)):
        torch.testing.assert_close(torch.view_as_real(a) if a.is_complex() else a,
                                   torch.view_as_real(b) if b.is_complex() else b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- gradcheck
def _tiny(*shape, seed, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=_gen(seed), dtype=torch.float64) * scale + shift).to(DEV).requires_grad_()


def _gradcheck_cases():
    b, s, d = 2, 2, 3
    x, y = _tiny(b, s, d, seed=1), _tiny(b, s, d, seed=2, scale=2.0)
    w, wn = _tiny(d, seed=3, scale=0.3, shift=1.0), _tiny(d, seed=4, scale=0.3, shift=1.0)
    g, sc, sh = _tiny(b, d, seed=5), _tiny(b, 1, d, seed=6, scale=0.3), _tiny(d, seed=7)
    q = _tiny(b, s, 2, 4, seed=8)
    f = torch.polar(torch.ones(b, s, 2, dtype=torch.float64),
                    torch.randn(b, s, 2, generator=_gen(9), dtype=torch.float64)).to(DEV).requires_grad_()
    return {
        "rms_norm_modulated": (lambda x, w, sc: K.rms_norm_modulated(x, w, sc, 1e-5), (x, w, sc)),
        "gated_rms_norm_residual+next": (lambda *a: K.gated_rms_norm_residual(*a, eps=1e-5, next_eps=1e-6),
                                         (x, y, w, g, wn, sc)),
        "gated_rms_norm_residual": (lambda x, y, w, g: K.gated_rms_norm_residual(x, y, w, g, eps=1e-5), (x, y, w, g)),
        "layer_norm_modulated": (lambda x, sc, sh: K.layer_norm_modulated(x, sc, sh, 1e-6), (x, sc, sh)),
        "gated_residual_layer_norm+norm": (lambda *a: K.gated_residual_layer_norm(*a, eps=1e-6), (x, y, g, sc, sh)),
        "gated_residual_layer_norm": (lambda x, y, g: K.gated_residual_layer_norm(x, y, g, norm=False), (x, y, g)),
        "rope_apply": (K.rope_apply, (q, f)),
    }


@pytest.mark.parametrize("name", list(_gradcheck_cases()))
def test_gradcheck_fp64(name):
    fn, args = _gradcheck_cases()[name]
    out = fn(*args)
    assert _uses_kernel(out[0] if isinstance(out, tuple) else out)
    assert torch.autograd.gradcheck(fn, args)


# ---------------------------------------------------------------------------------------------- op registration
def test_opcheck_schema_and_autograd_registration():
    x, w, sc = _randn(2, 3, 8, seed=1), _randn(8, seed=2), _randn(2, 8, seed=3)
    cases = [
        (torch.ops.dopsd.rms_norm_mod_fwd.default, (x, w, sc, 1e-5, 2, torch.float32)),
        (torch.ops.dopsd.gated_rms_norm_residual_fwd.default,
         (x, x + 1, w, sc, w, sc, 1e-5, 1e-5, True, 2, torch.float32, torch.float32)),
        (torch.ops.dopsd.layer_norm_mod_fwd.default, (x, sc, sc, 1e-6, 2, torch.float32)),
        (torch.ops.dopsd.gated_residual_layer_norm_fwd.default,
         (x, x + 1, sc, sc, sc, 1e-6, True, 2, torch.float32, torch.float32)),
        (torch.ops.dopsd.rope_apply_fwd.default, (_randn(2, 3, 2, 8, seed=4), _randn(2, 3, 4, 2, seed=5))),
        (torch.ops.dopsd.distill_loss.default, (x, x + 1, x, torch.ones(2, device=DEV), True, torch.float32)),
    ]
    for op, args in cases:
        args = tuple(a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                     and a.dim() else a for a in args)
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration"))


# ---------------------------------------------------------------------------------------------- GPU tier
# Real sizes in bf16 (run only with CUDA): Z-Image hidden 3840, 4096 image + 168 text tokens, 30 heads of 128;
# FLUX.2-klein hidden 3072, 24 heads, 4096 image + 512 text tokens. Rule: kernel bf16 error vs the fp32
# reference at most 2x the eager bf16 error (+ half a bf16 ulp of the magnitude for exact eager results).
def _gpu_rule(fn_k, fn_r, inputs):
    torch.manual_seed(0)
    xs_k, xs_e = _prep(inputs, torch.bfloat16), _prep(inputs, torch.bfloat16)
    xs_t = _prep([None if t is None else t.bfloat16() for t in inputs], torch.float32)
    ok, gk, _ = _run(fn_k, xs_k)
    oe, ge, _ = _run(fn_r, xs_e)
    ot, gt, _ = _run(fn_r, xs_t)
    for i, (a, e, t) in enumerate(zip(ok + gk, oe + ge, ot + gt)):
        if t is None:
            continue
        err_k = (a.float() - t).abs().max().item()
        err_e = (e.float() - t).abs().max().item()
        floor = 0.5 * _ulp(torch.bfloat16) * t.abs().max().item()
        assert err_k <= 2 * err_e + floor, f"item {i}: kernel err {err_k:.3g} vs eager {err_e:.3g}"


def _big(*shape, seed, scale=1.0, shift=0.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda") * scale + shift


@gpu
@pytest.mark.parametrize("model", ["zimage", "flux2"])
def test_gpu_real_sizes_bf16(model):
    b, tokens, dim = (2, 4096 + 168, 3840) if model == "zimage" else (2, 4096 + 512, 3072)
    x, y = _big(b, tokens, dim, seed=1), _big(b, tokens, dim, seed=2, scale=3.0)
    w, wn = _big(dim, seed=3, scale=0.1, shift=1.0), _big(dim, seed=4, scale=0.1, shift=1.0)
    g, sc, sh = _big(b, dim, seed=5), _big(b, 1, dim, seed=6, scale=0.3), _big(b, 1, dim, seed=7)
    if model == "zimage":
        _gpu_rule(lambda x, w, s: K.rms_norm_modulated(x, w, s, 1e-5),
                  lambda x, w, s: R.rms_norm_modulated(x, w, s, 1e-5), [x, w, sc])
        _gpu_rule(lambda *a: K.gated_rms_norm_residual(*a, eps=1e-5),
                  lambda *a: R.gated_rms_norm_residual(*a, eps=1e-5), [x, y, w, g, wn, sc])
        heads = 30
        q = _big(b, tokens, heads, dim // heads, seed=8)
        ang = _big(b, tokens, dim // heads // 2, seed=9, scale=10.0)
        f = torch.polar(torch.ones_like(ang), ang)
        _gpu_rule(lambda q: K.rope_apply(q, f), lambda q: R.rope_apply(q, f), [q])
        _gpu_rule(lambda q, w: K.rms_norm_modulated(q, w, None, 1e-5),
                  lambda q, w: R.rms_norm_modulated(q, w, None, 1e-5), [q, w[: dim // heads]])
        lat = (b, 16, 128, 128)
    else:
        _gpu_rule(lambda x, s, sh: K.layer_norm_modulated(x, s, sh, 1e-6),
                  lambda x, s, sh: R.layer_norm_modulated(x, s, sh, 1e-6), [x, sc, sh])
        _gpu_rule(lambda *a: K.gated_residual_layer_norm(*a, eps=1e-6),
                  lambda *a: R.gated_residual_layer_norm(*a, eps=1e-6), [x, y, g, sc, sh])
        lat = (b, 128, 64, 64)
    xl, vs, vt = _big(*lat, seed=10), _big(*lat, seed=11), _big(*lat, seed=12)
    sig = torch.tensor([1.0, 0.5], device="cuda")
    _gpu_rule(lambda vs, vt: K.distill_loss(xl, vs, vt, sig), lambda vs, vt: R.distill_loss(xl, vs, vt, sig), [vs, vt])


@gpu
def test_gpu_torch_compile():
    x, w, s = _big(2, 300, 3840, seed=1), _big(3840, seed=2, shift=1.0), _big(2, 3840, seed=3, scale=0.3)
    y = _big(2, 300, 3840, seed=4)

    def f(x, y, w, s):
        h = K.rms_norm_modulated(x, w, s, 1e-5)
        xo, h2 = K.gated_rms_norm_residual(x, h * y, w, s, w, s, eps=1e-5)
        return (xo * h2).sum() + K.layer_norm_modulated(h2, s, s).square().mean()

    args_e = [t.clone().requires_grad_(True) for t in (x, y, w, s)]
    args_c = [t.clone().requires_grad_(True) for t in (x, y, w, s)]
    out_e = f(*args_e)
    out_c = torch.compile(f, fullgraph=True)(*args_c)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-3)
    for a, b in zip(torch.autograd.grad(out_c, args_c), torch.autograd.grad(out_e, args_e)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * b.abs().max().item())
