"""dopsd_kernels: Triton kernels for the D-OPSD training step, each beside its eager reference.

Installed as the package `dopsd_kernels` (source folder `kernels/`). Imports nothing from `dopsd`.

Ops (forward and backward, registered with `torch.library.triton_op` + `register_autograd`, so they work
under autograd and `torch.compile`):
    distill_loss               D-OPSD loss, x0 / v space, per-sample sigma, student gradient in the forward pass
    rms_norm_modulated         Z-Image `RMSNorm(x) * (1 + scale)`
    gated_rms_norm_residual    Z-Image block boundary `x + tanh(gate) * RMSNorm(y)` [+ next modulated RMSNorm]
    layer_norm_modulated       FLUX.2 `LayerNorm(x) * (1 + scale) + shift`
    gated_residual_layer_norm  FLUX.2 `x + gate * y` [+ next modulated LayerNorm]
    rope_apply                 Z-Image 3-axis RoPE, complex-multiplication form
    segmented_lora_linear      LoRA mode's packed dual forward: one frozen base linear, teacher / student
                               adapters on their own rows, gradient through the student rows only
`dopsd_kernels.reference` holds the eager versions; `dopsd_kernels.patch` swaps the ops into diffusers models.

Dispatch per call: CUDA tensors -> compiled Triton; `TRITON_INTERPRET=1` set before this package is imported
and CPU tensors -> Triton's interpreter; anything else -> the eager reference. `DOPSD_KERNELS=0` forces the
reference everywhere.
"""


def _load_shadowed(name: str) -> None:
    """This folder was imported as top-level `kernels` (the repo root is on sys.path, e.g. `python -m pytest`
    from the root, and transformers/diffusers probe `import kernels` for the Hub kernels package).

    Never register the ops a second time under that name (two registrations of one op name leave dangling
    operator handles: crashes). Load the real `kernels` package in our place if it is installed elsewhere on
    sys.path; otherwise stay an empty module, as this folder was before it held code.
    """
    import importlib.machinery
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


if __name__ != "dopsd_kernels":
    _load_shadowed(__name__)
else:
    from . import reference  # noqa: F401
    from ._common import ENV_SWITCH, HAS_TRITON, INTERPRET, backend_name, kernels_enabled, use_triton  # noqa: F401
    from .distill import distill_loss  # noqa: F401
    from .layer_norm import layer_norm_modulated  # noqa: F401
    from .layer_norm_residual import gated_residual_layer_norm  # noqa: F401
    from .rms_norm import rms_norm_modulated  # noqa: F401
    from .rms_norm_residual import gated_rms_norm_residual  # noqa: F401
    from .rope import rope_apply  # noqa: F401
    from .segmented_lora import segmented_lora_linear  # noqa: F401

    __all__ = [
        "reference", "distill_loss", "rms_norm_modulated", "gated_rms_norm_residual", "layer_norm_modulated",
        "gated_residual_layer_norm", "rope_apply", "segmented_lora_linear", "use_triton", "kernels_enabled",
        "backend_name", "HAS_TRITON", "INTERPRET", "ENV_SWITCH",
    ]
