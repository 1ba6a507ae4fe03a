"""dopsd_kernels.segmented_lora_linear vs its eager reference (Triton interpreter on CPU; compiled on a GPU).

LoRA mode's packed dual forward through one linear: frozen base on every row, the teacher adapter on the
first n_teacher rows, the student adapter on the rest, gradient through the student rows only. Covered:
odd shapes (in 7, out 5, rank 3, 1..9 rows) with either segment empty or both present, multi-tile shapes,
fp32 (tight) and fp16/bf16 (the house half-precision rule of tests/test_kernels.py), bf16 activations with
fp32 adapters (peft's default adapter upcast), every input's gradient, fp64 gradcheck of the student
segment, what autograd saves (nothing that grows with the teacher segment), the reference against peft's
own two-adapter layer, the fallbacks, and a compile of the kernels for sm_90.
"""
import os
import re

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
SCALE = 5.0 / 3.0  # lora_alpha 5, rank 3: not a binary fraction (fp64 kernels must not round it to fp32)
NAMES = ("x", "weight", "bias", "a_t", "b_t", "a_s", "b_s")
ROOT = Path(__file__).resolve().parents[1]

# (rows, teacher rows): 1..9 rows, teacher segment empty, student segment empty, both present
ODD = [(1, 0), (1, 1), (2, 1), (3, 0), (4, 4), (5, 2), (6, 5), (7, 1), (8, 0), (8, 8), (9, 4)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(n, d_in=7, d_out=5, r=3, seed=0, bias=True):
    """fp32 x (n, in), weight (out, in), bias, teacher A (r, in) / B (out, r), student A / B."""
    g = _gen(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(DEV)

    return {"x": rnd(n, d_in), "weight": rnd(d_out, d_in, scale=0.5), "bias": rnd(d_out) if bias else None,
            "a_t": rnd(r, d_in, scale=0.5), "b_t": rnd(d_out, r, scale=0.5),
            "a_s": rnd(r, d_in, scale=0.5), "b_s": rnd(d_out, r, scale=0.5)}


def _leaves(inputs, dtypes, grad):
    """Leaf copies: dtype per name (a dtype for all, or a dict), requires_grad for the names in `grad`."""
    out = {}
    for name, t in inputs.items():
        if t is None:
            out[name] = None
            continue
        dt = dtypes[name] if isinstance(dtypes, dict) else dtypes
        out[name] = t.detach().to(dt).requires_grad_(name in grad)
    return out


def _call(fn, t, n_teacher, scale=SCALE):
    return fn(t["x"], t["weight"], t["bias"], t["a_t"], t["b_t"], t["a_s"], t["b_s"], scale, n_teacher)


def _run(fn, t, n_teacher, seed=99, scale=SCALE):
    """Output and {name: grad} (None where none reached the leaf) for a fixed random upstream gradient."""
    y = _call(fn, t, n_teacher, scale)
    g = torch.randn(y.shape, generator=_gen(seed)).to(DEV, y.dtype)
    live = {n: v for n, v in t.items() if v is not None and v.requires_grad}
    grads = dict.fromkeys(live)
    if live and y.requires_grad:
        grads.update(zip(live, torch.autograd.grad(y, list(live.values()), g, allow_unused=True)))
    return y.detach(), grads


def _uses_kernel(y):
    fn = y.grad_fn
    while fn is not None and fn.name().startswith("View"):
        fn = fn.next_functions[0][0]
    return fn is not None and "dopsd" in fn.name()


STUDENT_GRADS = ("x", "a_s", "b_s")


def _check_fp32(inputs, n_teacher, grad=STUDENT_GRADS + ("a_t", "b_t"), rtol=3e-5):
    tk, tr = _leaves(inputs, torch.float32, grad), _leaves(inputs, torch.float32, grad)
    yk, gk = _run(K.segmented_lora_linear, tk, n_teacher)
    yr, gr = _run(R.segmented_lora_linear, tr, n_teacher)
    assert _uses_kernel(_call(K.segmented_lora_linear, tk, n_teacher)), "the Triton path did not run"
    assert yk.dtype == yr.dtype and yk.shape == yr.shape
    torch.testing.assert_close(yk, yr, rtol=rtol, atol=rtol * max(1.0, yr.abs().max().item()))
    for name in grad:
        a, b = gk[name], gr[name]
        if name in ("a_t", "b_t"):  # the teacher adapter never gets a gradient
            assert a is None and b is None, name
            continue
        assert a is not None and b is not None, name
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(1.0, b.abs().max().item()), msg=name)
    if "x" in grad:  # teacher rows of dx: exactly zero
        assert not gk["x"][:n_teacher].any() and not gr["x"][:n_teacher].any()
    return gk, gr


# ---------------------------------------------------------------------------------------------- fp32
def test_interpreter_or_gpu_active():
    assert K.backend_name(DEV) == ("triton" if DEV == "cuda" else "triton-interpreter")


@pytest.mark.parametrize("n,n_teacher", ODD)
def test_fp32_odd_shapes(n, n_teacher):
    _check_fp32(_inputs(n, seed=n * 10 + n_teacher), n_teacher)


@pytest.mark.parametrize("n_teacher", [0, 19, 40])
def test_fp32_multi_tile(n_teacher):
    """40 rows (the interpreter tiles 16: partial tiles on both sides of the split), in 37 (3 K steps),
    out 21 (2 column tiles), rank 5, 3 row chunks in the weight-gradient reductions; no bias."""
    _check_fp32(_inputs(40, 37, 21, 5, seed=7, bias=False), n_teacher)


@pytest.mark.parametrize("n,n_teacher", [(9, 4), (6, 0), (5, 5)])
def test_base_requiring_grad_gets_the_student_rows_gradient(n, n_teacher):
    """A base that requires grad (not LoRA mode's frozen one) gets dW, dbias from the student rows only."""
    gk, gr = _check_fp32(_inputs(n, seed=3), n_teacher, grad=STUDENT_GRADS + ("weight", "bias"))
    t = _inputs(n, seed=3)
    g = torch.randn(n, 5, generator=_gen(99)).to(DEV)[n_teacher:]
    torch.testing.assert_close(gk["weight"], g.t() @ t["x"][n_teacher:], rtol=3e-5, atol=3e-5)
    torch.testing.assert_close(gk["bias"], g.sum(0), rtol=3e-5, atol=3e-5)


@pytest.mark.parametrize("grad", [("x",), ("a_s",), ("b_s",), ("a_s", "b_s"), ("x", "b_s")])
def test_any_subset_of_student_grads(grad):
    _check_fp32(_inputs(9, seed=4), 4, grad=grad)


def test_frozen_base_and_teacher_get_nothing():
    t = _leaves(_inputs(7, seed=5), torch.float32, ("x", "a_t", "b_t", "a_s", "b_s"))
    y = K.segmented_lora_linear(t["x"], t["weight"], t["bias"], t["a_t"], t["b_t"], t["a_s"], t["b_s"], SCALE, 3)
    y.square().sum().backward()
    assert t["weight"].grad is None and t["bias"].grad is None
    assert t["a_t"].grad is None and t["b_t"].grad is None
    assert t["a_s"].grad is not None and t["b_s"].grad is not None
    assert not t["x"].grad[:3].any() and t["x"].grad[3:].any()


def test_batched_input_counts_samples():
    """x (B, S, in): n_teacher counts samples (the packed batch of the dual forward)."""
    x = torch.randn(5, 3, 7, generator=_gen(6)).to(DEV)
    inputs = dict(_inputs(1, seed=6), x=x)
    tk, tr = _leaves(inputs, torch.float32, STUDENT_GRADS), _leaves(inputs, torch.float32, STUDENT_GRADS)
    yk, gk = _run(K.segmented_lora_linear, tk, 2)
    yr, gr = _run(R.segmented_lora_linear, tr, 2)
    assert yk.shape == (5, 3, 5) and _uses_kernel(_call(K.segmented_lora_linear, tk, 2))
    torch.testing.assert_close(yk, yr, rtol=3e-5, atol=3e-5)
    for name in STUDENT_GRADS:
        torch.testing.assert_close(gk[name], gr[name], rtol=3e-5, atol=3e-5)
    assert not gk["x"][:2].any()


def test_no_grad_and_non_contiguous_input():
    t = _inputs(9, 14, 5, 3, seed=8)
    xs = t["x"][:, ::2]  # (9, 7), column stride 2
    t = dict(t, x=xs, weight=t["weight"][:, :7].contiguous(), a_t=t["a_t"][:, :7], a_s=t["a_s"][:, :7])
    with torch.no_grad():
        yk = _call(K.segmented_lora_linear, t, 4)
    assert not yk.requires_grad
    torch.testing.assert_close(yk, _call(R.segmented_lora_linear, t, 4), rtol=3e-5, atol=3e-5)


# ---------------------------------------------------------------------------------------------- half
def _check_half(inputs, n_teacher, dtypes):
    """kernel error <= 2 x eager error + 1 ulp x max|truth| (truth: the reference in fp64 on the same rounded
    inputs), for the output and every student gradient."""
    grad = STUDENT_GRADS
    tk, te = _leaves(inputs, dtypes, grad), _leaves(inputs, dtypes, grad)
    tt = _leaves({n: None if v is None else v.to(dtypes[n]) for n, v in inputs.items()}, torch.float64, grad)
    yk, gk = _run(K.segmented_lora_linear, tk, n_teacher)
    ye, ge = _run(R.segmented_lora_linear, te, n_teacher)
    yt, gt = _run(R.segmented_lora_linear, tt, n_teacher)
    assert _uses_kernel(_call(K.segmented_lora_linear, tk, n_teacher)), "the Triton path did not run"
    items = [("y", yk, ye, yt, dtypes["x"])] + [(n, gk[n], ge[n], gt[n], dtypes[n]) for n in grad]
    for name, a, e, t, dt in items:
        assert a.dtype == e.dtype == dt, f"{name}: dtype {a.dtype}, eager {e.dtype}"
        err_k = (a.double() - t).abs().max().item()
        err_e = (e.double() - t).abs().max().item()
        floor = torch.finfo(dt).eps * t.abs().max().item()
        assert err_k <= 2 * err_e + floor, f"{name}: kernel err {err_k:.3g} vs eager {err_e:.3g} (floor {floor:.3g})"


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape,n_teacher", [((9, 7, 5, 3), 4), ((40, 37, 21, 5), 19), ((6, 7, 5, 3), 0)])
def test_half(dtype, shape, n_teacher):
    _check_half(_inputs(*shape, seed=11), n_teacher, dict.fromkeys(NAMES, dtype))


def test_bf16_activations_with_fp32_adapters():
    """peft keeps adapters in fp32 by default (autocast_adapter_dtype): the LoRA branch runs in fp32, the
    output stays bf16; the adapters' gradients are fp32."""
    dtypes = dict.fromkeys(NAMES, torch.bfloat16) | dict.fromkeys(("a_t", "b_t", "a_s", "b_s"), torch.float32)
    _check_half(_inputs(40, 37, 21, 5, seed=12), 19, dtypes)


# ---------------------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("n,n_teacher,bias", [(5, 2, True), (3, 0, False)])
def test_gradcheck_fp64_student_segment(n, n_teacher, bias):
    """gradcheck of the student rows' output in x_s, W, bias, A_s, B_s (the teacher rows, fixed, depend on
    x_t and W too, through no gradient by design, so they are left out of the checked function)."""
    t = _inputs(n, 3, 2, 2, seed=13, bias=bias)
    t = {k: None if v is None else v.double() for k, v in t.items()}
    x_t = t["x"][:n_teacher]
    args = [t["x"][n_teacher:], t["weight"], t["bias"], t["a_s"], t["b_s"]]
    args = [a if a is None else a.clone().requires_grad_(True) for a in args]

    def student_rows(x_s, w, b, a_s, b_s):
        return K.segmented_lora_linear(torch.cat([x_t, x_s]), w, b, t["a_t"], t["b_t"], a_s, b_s, SCALE,
                                       n_teacher)[n_teacher:]

    packed = (torch.cat([x_t, args[0]]), *args[1:3], t["a_t"], t["b_t"], *args[3:], SCALE, n_teacher)
    y = K.segmented_lora_linear(*packed)
    assert _uses_kernel(y)
    torch.testing.assert_close(y, R.segmented_lora_linear(*packed), rtol=1e-12, atol=1e-12)
    live = [a for a in args if a is not None]
    idx = [i for i, a in enumerate(args) if a is not None]

    def fn(*live_args):
        full = list(args)
        for i, a in zip(idx, live_args):
            full[i] = a
        return student_rows(*full)

    assert torch.autograd.gradcheck(fn, live)


# ---------------------------------------------------------------------------------------------- saved tensors
def _saved_numel(fn, t, n_teacher):
    sizes = []

    def pack(tensor):  # the storage a saved tensor keeps alive, not its view's size
        sizes.append(tensor.untyped_storage().nbytes() // tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = _call(fn, t, n_teacher)
    return sum(sizes), y


@pytest.mark.parametrize("grad", [STUDENT_GRADS, ("a_s", "b_s"), ("b_s",), ("x",)])
def test_saves_nothing_of_the_teacher_segment(grad):
    n_s, d_in, d_out, r = 4, 7, 5, 3
    params = d_out * d_in + r * d_in + d_out * r  # W, A_s, B_s (references, not copies)
    x_s = n_s * d_in if set(grad) & {"a_s"} else 0  # the student rows of x, for dA_s (or dW)
    xa_s = n_s * r if "b_s" in grad else 0  # x_s A_s^T, for dB_s
    counts = []
    for n_teacher in (0, 3, 11):
        t = _leaves(_inputs(n_teacher + n_s, seed=14), torch.float32, grad + ("a_t", "b_t"))
        count, y = _saved_numel(K.segmented_lora_linear, t, n_teacher)
        assert _uses_kernel(y)
        counts.append(count)
        assert count == params + x_s + xa_s, (n_teacher, count)
        ref_count, _ = _saved_numel(R.segmented_lora_linear, t, n_teacher)
        counts.append(ref_count - count)  # the reference (no_grad teacher) does not grow with it either
    assert counts[0::2] == [counts[0]] * 3 and counts[1::2] == [counts[1]] * 3


def test_nothing_saved_without_grad():
    t = _leaves(_inputs(9, seed=15), torch.float32, ("x", "a_s", "b_s"))
    with torch.no_grad():
        count, y = _saved_numel(K.segmented_lora_linear, t, 4)
    assert count == 0 and y.grad_fn is None
    t = _leaves(_inputs(9, seed=15), torch.float32, ("a_t", "b_t"))  # only the (detached) teacher requires grad
    count, y = _saved_numel(K.segmented_lora_linear, t, 4)
    assert count == 0 and not y.requires_grad


# ---------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("base_dtype,adapter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                      (torch.bfloat16, torch.bfloat16)])
def test_reference_is_peft_per_segment(base_dtype, adapter_dtype):
    """The reference equals peft's own `lora.Linear` with two adapters, run once per segment with that
    segment's adapter active (bitwise), and the hand-written peft form base(x) + B(A x) * scale; its
    student-adapter gradients equal peft's."""
    peft = pytest.importorskip("peft")
    n, n_teacher, d_in, d_out, r, alpha = 9, 4, 7, 5, 3, 5
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out)).to(DEV, base_dtype)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], init_lora_weights=False)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for name in ("student", "teacher"):
            model = peft.inject_adapter_in_model(cfg, model, adapter_name=name)
    layer = model[0]
    layer.requires_grad_(False)
    for name, seed in (("student", 1), ("teacher", 2)):
        for m in (layer.lora_A[name], layer.lora_B[name]):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=_gen(seed + m.weight.shape[0])) * 0.5)
            m.to(adapter_dtype)
    for p in (layer.lora_A["student"].weight, layer.lora_B["student"].weight):
        p.requires_grad_(True)
    scale = layer.scaling["student"]
    assert scale == alpha / r
    x = torch.randn(n, d_in, generator=_gen(3)).to(DEV, base_dtype)

    def run(adapter, rows):
        layer._active_adapter = [adapter]  # routing only, as dopsd.adapters.set_active_adapter does
        return layer(rows)

    with torch.no_grad():
        y_t = run("teacher", x[:n_teacher])
    y_s = run("student", x[n_teacher:])
    W, b = layer.base_layer.weight, layer.base_layer.bias
    args = (x, W, b, layer.lora_A["teacher"].weight, layer.lora_B["teacher"].weight,
            layer.lora_A["student"].weight, layer.lora_B["student"].weight, scale, n_teacher)
    y_ref = R.segmented_lora_linear(*args)
    assert torch.equal(y_ref, torch.cat([y_t, y_s]))
    for adapter, rows in (("teacher", x[:n_teacher]), ("student", x[n_teacher:])):  # the hand form
        a, bb = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        hand = torch.nn.functional.linear(rows, W, b) + ((rows.to(a.dtype) @ a.t()) @ bb.t()) * scale
        seg = y_ref[:n_teacher] if adapter == "teacher" else y_ref[n_teacher:]
        torch.testing.assert_close(seg, hand.to(base_dtype))
    g = torch.randn(y_s.shape, generator=_gen(4)).to(DEV, base_dtype)
    student = [layer.lora_A["student"].weight, layer.lora_B["student"].weight]
    g_peft = torch.autograd.grad(y_s, student, g)
    g_full = torch.cat([torch.zeros(n_teacher, d_out, dtype=base_dtype, device=DEV), g])
    g_ref = torch.autograd.grad(y_ref, student, g_full)
    for a, bb in zip(g_peft, g_ref):
        assert torch.equal(a, bb)


# ---------------------------------------------------------------------------------------------- fallbacks
def test_env_switch_turns_the_kernel_off(monkeypatch):
    t = _leaves(_inputs(9, seed=16), torch.float32, STUDENT_GRADS)
    assert _uses_kernel(_call(K.segmented_lora_linear, t, 4))
    monkeypatch.setenv(K.ENV_SWITCH, "0")
    y = _call(K.segmented_lora_linear, t, 4)
    assert not _uses_kernel(y) and torch.equal(y, _call(R.segmented_lora_linear, t, 4))


def test_unsupported_cases_fall_back_to_reference():
    base = _inputs(9, seed=17)
    cases = [
        dict(base, a_t=base["a_t"].repeat(43, 1), b_t=base["b_t"].repeat(1, 43),  # rank 129 > MAX_RANK
             a_s=base["a_s"].repeat(43, 1), b_s=base["b_s"].repeat(1, 43)),
        dict(base, bias=base["bias"].double()),  # mixed base dtypes (eager promotes or raises as torch does)
        dict(base, x=base["x"][:0]),  # no rows
        dict(base, a_t=base["a_t"].double(), b_t=base["b_t"].double(), a_s=base["a_s"].double(),
             b_s=base["b_s"].double()),  # fp64 adapters on an fp32 base
    ]
    for i, t in enumerate(cases):
        try:
            expect = _call(R.segmented_lora_linear, t, min(4, t["x"].shape[0]))
        except RuntimeError as e:
            with pytest.raises(RuntimeError, match=re.escape(str(e)[:20])):
                _call(K.segmented_lora_linear, t, min(4, t["x"].shape[0]))
            continue
        y = _call(K.segmented_lora_linear, t, min(4, t["x"].shape[0]))
        assert torch.equal(y, expect), i
    t = _leaves(base, torch.float32, STUDENT_GRADS)
    with torch.autocast(DEV, dtype=torch.bfloat16):  # autocast: eager, cast like F.linear under autocast
        y = _call(K.segmented_lora_linear, t, 4)
        expect = _call(R.segmented_lora_linear, t, 4)
    assert not _uses_kernel(y) and y.dtype == expect.dtype and torch.equal(y, expect)


def test_bad_arguments_raise_clear_errors():
    t = _inputs(9, seed=18)
    with pytest.raises(ValueError, match="n_teacher"):
        _call(K.segmented_lora_linear, t, 10)
    with pytest.raises(ValueError, match="n_teacher"):
        _call(R.segmented_lora_linear, t, -1)
    with pytest.raises(ValueError, match="b_student"):
        _call(K.segmented_lora_linear, dict(t, b_s=t["b_s"][:, :2]), 4)
    with pytest.raises(ValueError, match="weight"):
        _call(K.segmented_lora_linear, dict(t, x=t["x"][:, :6]), 4)


def test_cpu_without_interpreter_runs_the_reference():
    code = (
        "import torch, dopsd_kernels as K\n"
        "x = torch.randn(9, 7, requires_grad=True); w = torch.randn(5, 7); b = torch.randn(5)\n"
        "ad = [torch.randn(3, 7), torch.randn(5, 3), torch.randn(3, 7, requires_grad=True),"
        " torch.randn(5, 3, requires_grad=True)]\n"
        "y = K.segmented_lora_linear(x, w, b, *ad, 0.5, 4)\n"
        "assert 'dopsd' not in y.grad_fn.name(), y.grad_fn\n"
        "assert torch.equal(y, K.reference.segmented_lora_linear(x, w, b, *ad, 0.5, 4))\n"
        "y.sum().backward(); assert not x.grad[:4].any() and ad[0].grad is None and ad[2].grad is not None\n"
        "print('ok')\n")
    res = run_without_triton(code)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- registration
def test_opcheck_schema_and_autograd_registration():
    t = _inputs(9, seed=19)
    args = (t["x"].requires_grad_(True), t["weight"], t["bias"], t["a_t"], t["b_t"], t["a_s"].requires_grad_(True),
            t["b_s"].requires_grad_(True), SCALE, 4)
    torch.library.opcheck(torch.ops.dopsd.segmented_lora_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration"))


COMPILE = r'''
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile as tcompile
from dopsd_kernels import segmented_lora as M

INTS = {"split", "n_rows", "K", "R", "NOUT", "rows_per_prog", "sxm", "sxk", "sar", "sak", "sym", "sbn", "sbr",
        "svm", "svk"}

def build(fn, ptrs, constexprs):
    sig = {n: "constexpr" if n in constexprs else "fp32" if n.startswith("alpha") else "i32" if n in INTS
           else "*" + ptrs[n] for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return tcompile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]

for xd, acc, dot in (("bf16", tl.float32, tl.bfloat16), ("fp64", tl.float64, tl.float64)):
    a = "fp64" if acc == tl.float64 else "fp32"
    c = dict(ACC=acc, DOT=dot, BLOCK_M=64, BLOCK_R=64)
    ptx = [build(M._shrink_kernel, dict(X=xd, A0=xd, A1=xd, OUT0=a, OUT1=a), dict(c, BLOCK_K=64)),
           build(M._expand_kernel, dict(Y=xd, T0=a, T1=a, B0=xd, B1=xd), dict(c, BLOCK_N=64)),
           build(M._reduce_kernel, dict(U=a, V=xd, PART=a), dict(c, BLOCK_K=64))]
    assert all("mma" in p for p in ptx), xd  # tensor-core (wgmma / mma) dots, bf16 and fp64 alike
print("compiled")
'''


def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter runs Python semantics; this catches what only the compiler sees (the per-segment
    pointer selection, dtypes of the dots, loops with runtime bounds)."""
    pytest.importorskip("triton")
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", COMPILE], env=env, capture_output=True, text=True, timeout=600,
                         cwd=ROOT)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-4000:]


# ---------------------------------------------------------------------------------------------- GPU tier
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rank", [16, 64])
def test_gpu_real_sizes_bf16(rank):
    """Z-Image-like: 2 + 2 samples of 4096 + 168 tokens, hidden 3840 -> 3840, bf16; same rule as the half tests."""
    n = 4 * (4096 + 168)
    _check_half(_inputs(n, 3840, 3840, rank, seed=20), n // 2, dict.fromkeys(NAMES, torch.bfloat16))
