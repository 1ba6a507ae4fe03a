"""`model.compile`: regional `torch.compile` of the DiT's repeated blocks.

Each block the backend lists (`Backend.repeated_blocks`: Z-Image's noise_refiner, context_refiner and layers;
FLUX.2's double and single blocks) is compiled in place with `nn.Module.compile`, so the model's own forward
calls the compiled block through the block's `__call__` (its hooks included). One compiled graph serves every
block of a class (same code, the weights are inputs), so compile time is that of a block or two, not of the model.
The trainer calls it after the adapters, the kernels and gradient checkpointing, so it compiles the blocks as
they run:

- LoRA (peft): the injected `lora.Linear` layers are part of the block and are traced with it; switching the
  active adapter (teacher / student roles) changes a Python attribute dynamo guards on, so each role gets its
  own graph (compiled once each, then reused).
- dopsd_kernels (`model.kernels`): the patched ops are `torch.library` ops, which dynamo keeps as single
  nodes of the graph (compiled around, not through; `tests/test_kernels.py::test_gpu_torch_compile` compiles
  them with fullgraph=True on CUDA). CUDA only: on CPU the kernels run in Triton's interpreter, which
  inductor cannot compile, so kernels + compile is neither run nor tested on CPU.
- gradient checkpointing: diffusers checkpoints each block (`torch.utils.checkpoint`, non-reentrant) around the
  block's call, so the compiled block is what is checkpointed and recomputed in the backward.
- the fused dual forward (`train.dual_forward: fused`, the default) does NOT use compiled blocks: it restates the
  blocks' forward as generators that yield every linear (zimage_dual.py, flux2_dual.py) and never calls a block.
  The config refuses `model.compile` with the fused D-OPSD step (dopsd/config.py); the separate path, SFT and
  sampling call the blocks and get them compiled.
- DeepSpeed ZeRO-3: the blocks are compiled before DeepSpeed wraps the module. DeepSpeed (0.19) registers its
  parameter fetch / release hooks on every sub-module and marks them `torch.compiler.disable`, so dynamo breaks
  the graph at each sub-module (each linear of a block): the run stays correct but little is fused. DeepSpeed's
  own route is `engine.compile()` (the whole module, with DeepCompile's "z3" pass doing the gathers inside the
  graph), which dopsd does not call; a warning says so. Neither is run by the tests. ZeRO-2 (unsharded parameters)
  compiles as on one GPU.
"""
from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)


def compile_blocks(model_backend, transformer: nn.Module, **compile_kwargs) -> int:
    """Compile each of `model_backend`'s repeated blocks of `transformer` in place (`torch.compile` keyword
    arguments, `backend=` included, pass through); returns the number compiled."""
    import torch._dynamo

    blocks = model_backend.repeated_blocks(transformer)
    # One block class meets several guard sets in a run (teacher / student adapter, grad on / off, a refiner
    # with or without modulation, a few sequence lengths); past dynamo's default of 8 graphs per code object it
    # would fall back to eager without failing, so the limit is raised.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if any(hasattr(p, "ds_id") for b in blocks[:1] for p in b.parameters()):
        log.warning("model.compile under ZeRO-3: DeepSpeed's per-module parameter hooks break each compiled block's "
                    "graph at every sub-module; expect little speed-up (see dopsd/models/compile.py)")
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def uncompile_blocks(backend, transformer: nn.Module) -> int:
    """Undo `compile_blocks` (the blocks run eagerly again); returns the number of blocks that were compiled."""
    blocks = [b for b in backend.repeated_blocks(transformer) if getattr(b, "_compiled_call_impl", None) is not None]
    for block in blocks:
        block._compiled_call_impl = None
    return len(blocks)
