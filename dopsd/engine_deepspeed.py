"""DeepSpeed ZeRO-2/3 engine: same surface as `TorchEngine` (see engine.py), plus sharded model building.

Choices, and why:
- a client `torch.optim.AdamW`: no C++ optimizer build (CPU tests) and the same update rule as one process;
- `managed_gradient_accumulation: false`: D-OPSD backpropagates each roll-out step as it is computed; with
  it, `backward()` only accumulates and `step()` is the one reduction + update per training step;
- forwards go through the engine object (`model`), whose forward advances ZeRO's micro-step counter so that
  a second backward in the same step accumulates into, instead of overwriting, the gradient partitions;
- no ZeRO-3 parameter prefetch for objectives that alternate LoRA adapters between forwards (see below).
"""
from __future__ import annotations

import copy
import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .optim import build_lr_scheduler, build_optimizer

ENGINE_TAG = "engine"

# No prefetch for objectives whose teacher and student predictions are separate forwards of one LoRA DiT through
# different adapters (`Objective.alternating_adapters`: teacher forward, then student forward + backward, at
# every roll-out state). ZeRO-3 prefetches
# along the module trace it recorded since the previous forward of the wrapped module began (DeepSpeed
# 0.19.8: runtime/zero/parameter_offload.py:306 calls `reset_step` at every such forward). Here that trace
# is always the teacher forward, and the student forward leaves it at the first LoRA layer: peft calls
# `lora_dropout.student` where the trace says `lora_dropout.teacher` (`trace_prologue`,
# partitioned_param_coordinator.py:213-219). By then the coordinator has issued all-gathers for the rest of
# the trace (up to stage3_prefetch_bucket_size elements per module entered, :451-485); the invalidation
# drops them unused (`_invalidate_trace` -> `_clean_inflight_param_registry`, :189-200) and the student
# gathers them again on demand: 1.5-2 models per student forward instead of one. The teacher forward only
# records (no prefetch) and the backward runs on the invalidated trace (no prefetch), so a prefetch bucket of
# 0 removes the wasted gathers and nothing else. A fused forward that calls both adapters in one pass keeps
# one trace and should keep prefetching (its flag is False). benchmarks/zero_gathers.py measures all this.


def build_ds_config(cfg, with_optimizer: bool = True) -> dict[str, Any]:
    """The DeepSpeed JSON (`engine.deepspeed_config`, or ZeRO stage from `engine.zero_stage`) with every
    value that the run config owns filled in; a conflicting explicit value is an error, not a surprise."""
    if cfg.engine.deepspeed_config:
        path = Path(cfg.engine.deepspeed_config)
        if not path.is_file():
            raise FileNotFoundError(f"engine.deepspeed_config: {path} does not exist")
        ds = json.loads(path.read_text())
    else:
        ds = {"zero_optimization": {"stage": cfg.engine.zero_stage}}
    owned = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.train.grad_clip,
    }
    for key, value in owned.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise ValueError(f"engine.deepspeed_config: {key}={ds[key]} conflicts with the run config ({value}); "
                             f"set it to \"auto\" or remove it")
        ds[key] = value
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x world
    ds["bf16"] = {"enabled": cfg.train.mixed_precision == "bf16"}
    if ds.get("fp16", {}).get("enabled"):
        raise ValueError("engine.deepspeed_config: fp16 is not supported; use train.mixed_precision=bf16")
    ds.pop("fp16", None)
    ds["managed_gradient_accumulation"] = False
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    zero = ds.setdefault("zero_optimization", {})
    if cfg.engine.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if zero.get("offload_optimizer"):
        ds["zero_force_ds_cpu_optimizer"] = False  # keep the client AdamW
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    from .objectives import OBJECTIVES

    alternating = cfg.train.mode == "lora" and OBJECTIVES[cfg.train.objective].alternating_adapters and \
        cfg.train.dual_forward == "separate"
    if int(zero.get("stage", 0)) >= 3 and alternating:
        zero["stage3_prefetch_bucket_size"] = 0  # whatever the JSON says: it could only re-gather (see above)
    if not with_optimizer:
        zero.pop("offload_optimizer", None)
        ds.pop("gradient_clipping", None)
    return ds


def gathered_for_edit(params):
    """ZeRO-3 parameters whole inside the context; what rank 0 writes into them is kept on every shard."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def zero3_transformer_loader(ds_config: dict):
    """Build a diffusers model partitioned from its first tensor on, and stream its safetensors in.

    `from_pretrained` inside `zero.Init` fails on meta tensors, and outside it puts the whole model on every
    rank. Here each parameter is created partitioned, then filled on rank 0 inside GatheredParameters, one
    tensor at a time: no rank ever holds more than its shard plus one tensor.
    """
    def load(cls, path: Path, subfolder: str, dtype: torch.dtype) -> nn.Module:
        import deepspeed
        import torch.distributed as dist
        from safetensors import safe_open

        # No dtype argument: DeepSpeed 0.19 ignores it on accelerators without fp16 (it picks bf16); from the
        # config it takes bf16 when bf16 is enabled and float32 otherwise, the dtype the engine will use.
        del dtype
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = cls.from_config(cls.load_config(path, subfolder=subfolder))
        params = dict(model.named_parameters())
        is_main = not dist.is_initialized() or dist.get_rank() == 0
        seen = set()
        for file in sorted((Path(path) / subfolder).glob("*.safetensors")):
            with safe_open(str(file), "pt") as tensors:  # every rank walks the same keys: gathers are collective
                for key in tensors.keys():
                    if key not in params:
                        raise ValueError(f"{file}: unexpected tensor {key}")
                    param = params[key]
                    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                        if is_main:
                            param.data.copy_(tensors.get_tensor(key).to(param.dtype))
                    seen.add(key)
        missing = params.keys() - seen
        if missing:
            raise ValueError(f"{path}/{subfolder}: no weights for {sorted(missing)[:5]}")
        return model

    return load


class DeepSpeedEngine:
    def __init__(self, module: nn.Module, cfg, ds_config: dict | None = None):
        import deepspeed

        t = cfg.train
        self.cfg = cfg
        self.ds_config = ds_config if ds_config is not None else build_ds_config(cfg)
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        self.named_params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        if not self.named_params:
            raise ValueError("no trainable parameters")
        optimizer = build_optimizer(list(self.named_params.values()), t)
        # DeepSpeed steps a client scheduler in engine.step() and keeps its state in its checkpoints
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, model_parameters=list(self.named_params.values()),
            lr_scheduler=build_lr_scheduler(optimizer, t), config=self.ds_config)
        self.module = self.model.module

    def zero_grad(self) -> None:
        self.model.zero_grad()

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)

    def step(self) -> tuple[float, bool]:
        self.model.step()
        norm = self.model.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        if not math.isfinite(norm):
            # ZeRO checks overflow only for fp16: a non-finite gradient has been applied. Stop before
            # anything is saved from these weights; the last complete checkpoint stays the resume point.
            raise FloatingPointError(f"non-finite gradient norm ({norm}) under DeepSpeed; resume from the last "
                                     f"checkpoint with a lower train.lr")
        return norm, True

    def skip_step(self) -> None:
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # --- checkpoint (collective) ---
    def save(self, checkpoint: Path) -> None:
        self.model.save_checkpoint(str(checkpoint), tag=ENGINE_TAG, save_latest=False)

    def load(self, checkpoint: Path) -> None:
        path, _ = self.model.load_checkpoint(str(checkpoint), tag=ENGINE_TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed engine state in {checkpoint}")

    # --- placement ---
    def gathered(self, params):
        if self.zero_stage < 3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)

    @staticmethod
    def local(param: torch.Tensor) -> torch.Tensor:
        shard = getattr(param, "ds_tensor", None)  # ZeRO-3: this rank's flat partition
        return shard if shard is not None else param.data

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Whole module weights on rank 0 (None elsewhere); gathered layer by layer under ZeRO-3."""
        import torch.distributed as dist

        if self.zero_stage >= 3:
            state = self.model._zero3_consolidated_16bit_state_dict()
        else:
            state = {k: v.detach().cpu() for k, v in self.module.state_dict().items()}
        return state if dist.get_rank() == 0 else None

    def wrap_frozen(self, module: nn.Module) -> nn.Module:
        """Under ZeRO-3 a frozen twin of the model is sharded the same way (its own engine, no optimizer)."""
        if self.zero_stage < 3:
            return module
        import deepspeed

        config = copy.deepcopy(build_ds_config(self.cfg, with_optimizer=False))
        engine, *_ = deepspeed.initialize(model=module.requires_grad_(False), config=config)
        return engine
