"""DiT FLOPs of a D-OPSD step: counted by `torch.utils.flop_counter.FlopCounterMode`, and the analytic count of
Z-Image's forward that checks it (tests/test_bench_gpu_step.py; bench_gpu_step.py reports both).

Conventions are FlopCounterMode's: a matmul of (m, k) x (k, n) is 2mkn (a bias add and every elementwise op,
norms, RoPE, softmax, are not counted). Attention is counted as PyTorch's math SDPA computes it (QK^T and PV,
4 N^2 d per sample and forward), which `count_flops` forces so that the count is the same on every device and
for every attention kernel: the fused kernels' own FLOP formulas also count their backward's recomputation.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable

ADALN_MAX, T_FREQ, T_MID, SEQ_MULTI_OF = 256, 256, 1024, 32  # diffusers' transformer_z_image constants


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(FLOPs, result) of `fn()`: every matmul it runs, forward and backward, with attention as math SDPA."""
    from diffusers.models.attention_dispatch import attention_backend
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with ExitStack() as stack:
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        stack.enter_context(attention_backend("_native_math"))  # processors left at the default take it
        stack.enter_context(counter)
        result = fn()
    return counter.get_total_flops(), result


def _padded(n: int) -> int:
    return n + (-n) % SEQ_MULTI_OF


def zimage_forward_flops(config: dict, image_tokens: int, caption_tokens: int, batch: int = 1,
                         lora_rank: int = 0) -> int:
    """One `ZImageTransformer2DModel` forward (basic sequence, no mask: every sample has `image_tokens` patches,
    i.e. (h / 2) (w / 2) of its latent, and `caption_tokens` caption features), with one active LoRA adapter of
    `lora_rank` on the recipe's targets (attention q, k, v, out and the three FFN linears) of every block.
    Each sequence is padded to a multiple of 32, as the model pads it; the pad tokens are computed like any."""
    d, c = config["dim"], config["in_channels"]
    patch = config["all_patch_size"][0] ** 2 * config["all_f_patch_size"][0] * c
    ffn, adaln = int(d / 3 * 8), min(d, ADALN_MAX)
    nx, nc = _padded(image_tokens), _padded(caption_tokens)

    def mm(rows: int, k: int, n: int) -> int:
        return 2 * batch * rows * k * n

    def lora(rows: int, k: int, n: int) -> int:
        return mm(rows, k, n) + (mm(rows, k, lora_rank) + mm(rows, lora_rank, n) if lora_rank else 0)

    def block(n: int, modulated: bool) -> int:
        attn = 4 * lora(n, d, d) + 4 * batch * n * n * d   # q, k, v, out; QK^T and PV over all heads
        ff = 2 * lora(n, d, ffn) + lora(n, ffn, d)         # w1, w3, w2
        return attn + ff + (mm(1, adaln, 4 * d) if modulated else 0)

    embed = mm(nx, patch, d) + mm(nc, config["cap_feat_dim"], d) + mm(1, T_FREQ, T_MID) + mm(1, T_MID, adaln)
    refiners = config["n_refiner_layers"] * (block(nx, True) + block(nc, False))
    final = mm(1, adaln, d) + mm(nx + nc, d, patch)  # the final layer runs on the whole unified sequence
    return embed + refiners + config["n_layers"] * block(nx + nc, True) + final
