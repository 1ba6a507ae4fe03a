"""Shared plumbing for the Triton ops: optional Triton import, dispatch rules, launch sizes, dtype rules.

Dispatch (decided per call, by `use_triton`):
  * `DOPSD_KERNELS=0` (or false/off/no)             -> eager reference, always;
  * all tensors on CUDA and Triton importable        -> compiled Triton kernels;
  * `TRITON_INTERPRET=1` when this package was imported and tensors on CPU
                                                     -> the same kernels in Triton's interpreter (tests);
  * otherwise (CPU without the interpreter, MPS, no Triton) -> eager reference.

Triton reads `TRITON_INTERPRET` when a kernel is *defined*, so the interpreter flag is captured once, at
import time, and must be set before `dopsd_kernels` is imported.
"""
import math
import os
import types

import torch

try:  # Triton is an optional extra (`pip install dopsd[kernels]`); everything falls back without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

    def _jit(fn=None, **_):
        return fn if fn is not None else (lambda f: f)

    triton = types.SimpleNamespace(jit=_jit, cdiv=lambda a, b: (a + b - 1) // b,
                                   next_power_of_2=lambda n: 1 << max(0, int(n) - 1).bit_length())
    tl = types.SimpleNamespace(constexpr=object, float32=None, float64=None)

def _interpret_flag() -> bool:
    try:  # Triton's own reading of TRITON_INTERPRET, the one its @jit consults
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


INTERPRET = HAS_TRITON and _interpret_flag()


def device_fn(fn):
    """Decorator for helpers called from kernels: `triton.jit` when compiled; plain Python in the interpreter,
    where every call of a jit helper re-patches triton.language (~1 ms per call; the kernels run inside the
    caller's patch scope either way, so the code executed is the same)."""
    return fn if INTERPRET or not HAS_TRITON else triton.jit(fn)


ENV_SWITCH = "DOPSD_KERNELS"
_OFF = ("0", "false", "off", "no", "none")


def kernels_enabled() -> bool:
    """False when the environment switch `DOPSD_KERNELS` turns the kernels off (read at every call)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in _OFF


def use_triton(*tensors) -> bool:
    """True when the Triton implementation should run for these tensors (see the module docstring)."""
    if not HAS_TRITON or not kernels_enabled():
        return False
    devices = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
    if not devices:
        return False
    if devices == {"cuda"}:
        return True
    return INTERPRET and devices == {"cpu"}


def backend_name(device: torch.device | str = "cuda") -> str:
    """Which implementation a tensor on `device` gets: 'triton', 'triton-interpreter' or 'eager'."""
    dev = torch.device(device)
    if not HAS_TRITON or not kernels_enabled():
        return "eager"
    if dev.type == "cuda":
        return "triton"
    return "triton-interpreter" if INTERPRET and dev.type == "cpu" else "eager"


# ----------------------------------------------------------------------------------------------- sizes
def acc_dtype(*tensors):
    """Accumulator dtype for a kernel: fp64 when any floating input is fp64 (gradcheck), else fp32."""
    if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tensors):
        return tl.float64
    return tl.float32


def acc_torch_dtype(*tensors) -> torch.dtype:
    if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def block_size(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def rows_per_tile(block_d: int) -> int:
    """Rows per program tile: ~4K elements on a GPU (1 row at D >= 2K), bigger tiles in the interpreter,
    whose cost is per program instance and per op rather than per element."""
    if INTERPRET:
        return max(1, min(64, 16384 // block_d))
    return max(1, min(64, 4096 // block_d))


def num_warps_for(block: int) -> int:
    if INTERPRET:
        return 1
    if block <= 512:
        return 2
    if block <= 1024:
        return 4
    if block <= 4096:
        return 8
    return 16


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def split_rows(rows_per_sample: int, batch: int, device: torch.device, tile: int) -> tuple[int, int]:
    """(chunks per sample, rows per program) for a backward pass; rows per program is a multiple of `tile`."""
    chunks = row_chunks(rows_per_sample, batch, device)
    per_prog = triton.cdiv(triton.cdiv(max(1, rows_per_sample), chunks), tile) * tile
    return triton.cdiv(max(1, rows_per_sample), per_prog), per_prog


def row_chunks(rows_per_sample: int, batch: int, device: torch.device) -> int:
    """How many programs share one sample's rows in a backward pass that reduces over rows.

    Each program accumulates its parameter-gradient partial sums in registers and writes one partial row;
    the partials are summed afterwards (deterministic, no atomics). On a GPU aim at ~4 programs per SM;
    in the interpreter a few chunks (each program costs ~1 ms there) still exercise the multi-chunk path.
    """
    rows_per_sample = max(1, rows_per_sample)
    if device.type == "cuda":
        target = 4 * _sm_count(device)
        return max(1, min(rows_per_sample, math.ceil(target / max(1, batch))))
    return max(1, min(rows_per_sample, 3))


# ----------------------------------------------------------------------------------------------- dtypes
_HALF = (torch.float16, torch.bfloat16)


def rms_out_dtype(x_dtype: torch.dtype, w_dtype: torch.dtype | None) -> torch.dtype:
    """Output dtype of diffusers' RMSNorm: x * rsqrt(fp32 var) is >= fp32, cast to a half weight's dtype."""
    if w_dtype is None:
        return x_dtype
    if w_dtype in _HALF:
        return w_dtype
    return torch.promote_types(torch.promote_types(x_dtype, torch.float32), w_dtype)


def layer_norm_out_dtype(x: torch.Tensor) -> torch.dtype:
    """Output dtype of F.layer_norm on x, autocast included (CUDA autocast runs layer_norm in fp32, CPU
    autocast does not): asked of layer_norm itself on an empty tensor, which launches nothing."""
    d = x.shape[-1]
    return torch.nn.functional.layer_norm(x.new_empty((0, d)), (d,)).dtype


def promote(*dtypes) -> torch.dtype:
    out = None
    for d in dtypes:
        if d is None:
            continue
        out = d if out is None else torch.promote_types(out, d)
    return out


def per_sample_rows(p: torch.Tensor | None, batch: int, dim: int):
    """A modulation parameter broadcastable to (batch, 1, dim) as a contiguous (rows, dim) tensor.

    Returns (tensor, row_stride) with row_stride 0 when one row is shared by every sample, or None when
    the parameter has another layout (e.g. per-token modulation), which the caller sends to the reference.
    """
    if p is None:
        return None, 0
    if p.shape[-1] != dim:
        return None
    n = p.numel()
    if n == dim:
        return p.reshape(1, dim).contiguous(), 0
    if n == batch * dim and p.shape[0] == batch and all(s == 1 for s in p.shape[1:-1]):
        return p.reshape(batch, dim).contiguous(), dim
    return None


def param_layout_ok(p: torch.Tensor | None, x: torch.Tensor) -> bool:
    """True when `p` is None or broadcasts to x as one row per sample (or one row for all)."""
    if p is None:
        return True
    if x.dim() < 2:
        return False
    return per_sample_rows(p, x.shape[0], x.shape[-1]) is not None and p.dim() <= x.dim()
