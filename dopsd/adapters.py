"""LoRA adapters in one place: adding them, routing forwards through one of them, and reading, writing and
describing the student's.

LoRA mode puts two peft adapters of the same shape on one frozen DiT: `student` (trained) and, for D-OPSD,
`teacher` (an EMA of the student, no grad; dopsd/teacher.py keeps it). What leaves a run is the student
adapter alone, in the diffusers format (`backend.save_lora`); the trainer and `dopsd export` both go through
`student_lora` for it.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

STUDENT = "student"
TEACHER = "teacher"


def add_lora_adapters(transformer: nn.Module, rank: int, alpha: float, targets: list[str], init: str,
                      with_teacher: bool) -> None:
    """The student adapter (trained) and, for D-OPSD, a teacher adapter of the same shape (no grad)."""
    from peft import LoraConfig

    init_weights = "gaussian" if init == "gaussian" else False
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=init_weights)
    transformer.requires_grad_(False)
    transformer.add_adapter(config, adapter_name=STUDENT)
    if with_teacher:
        with warnings.catch_warnings():  # peft warns on any second adapter; two are the design here
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            transformer.add_adapter(config, adapter_name=TEACHER)
    for name, p in transformer.named_parameters():
        p.requires_grad_(is_student(name))
    set_active_adapter(transformer, STUDENT)


def is_student(name: str) -> bool:
    return f".{STUDENT}." in name


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Route every LoRA layer through adapter `name`.

    peft's own `set_adapter` also flips requires_grad (it makes the active adapter trainable); switching to
    the teacher for a no-grad forward must not touch the student's trainable flags, whose gradient hooks an
    engine such as DeepSpeed registered, so only the routing is changed here.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module._active_adapter = [name]


def student_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if is_student(n)}


def paired_adapter_params(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The student's LoRA tensors and their teacher twins, in the same order."""
    params = dict(model.named_parameters())
    students, teachers = [], []
    for name, p in params.items():
        if not is_student(name):
            continue
        tname = name.replace(f".{STUDENT}.", f".{TEACHER}.")
        if tname not in params:
            raise RuntimeError(f"LoRA parameter {name} has no teacher twin {tname}")
        students.append(p)
        teachers.append(params[tname])
    if not students:
        raise RuntimeError("no student LoRA parameters found: was the adapter added?")
    return students, teachers


def load_student_values(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy trained student values (named as the module names its parameters) into the adapter."""
    params = student_params(model)
    missing = params.keys() - state.keys()
    if missing:
        raise ValueError(f"{source}: no trained values for {sorted(missing)[:3]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


def student_lora(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) of the student adapter as diffusers' LoRA files hold them: peft's state-dict
    names without the adapter name, detached CPU copies; rank/alpha metadata with sorted target modules (a
    set in peft: sorted so that the same run writes the same file). Under ZeRO-3 call it where the student's
    parameters are gathered."""
    from peft.utils import get_peft_model_state_dict

    state = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model, adapter_name=STUDENT).items()}
    meta = model.peft_config[STUDENT].to_dict()
    meta["target_modules"] = sorted(meta["target_modules"])
    return state, meta


def merge_lora(transformer: nn.Module, state: dict[str, torch.Tensor], metadata: dict[str, Any], source: str,
               editable=None) -> int:
    """Add a LoRA's update W += scale * B @ A into the transformer's own weights (continual tuning: the next run
    trains on top of the merged model); returns the modules changed. `state`: `<module>.lora_A.weight` /
    `<module>.lora_B.weight` (`backend.read_lora`); scale = alpha / rank (alpha / sqrt(rank) with rslora), as
    peft applies it. `editable(params)`: a context in which the parameters are whole and writable (ZeRO-3:
    gathered, rank 0's values kept); None: they already are."""
    from contextlib import nullcontext

    if metadata.get("use_dora"):
        raise ValueError(f"{source}: a DoRA adapter does not merge as W + BA")
    modules = dict(transformer.named_modules())
    rank_pattern, alpha_pattern = metadata.get("rank_pattern") or {}, metadata.get("alpha_pattern") or {}
    if rank_pattern or alpha_pattern:
        raise ValueError(f"{source}: per-module rank/alpha patterns are not supported for merging")
    changed = 0
    for name, (a, b) in lora_factors(state, source).items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{source}: {name} is not a linear layer of this transformer")
        weight = module.weight
        a, b = a.float(), b.float()
        rank = a.shape[0]
        alpha = float(metadata.get("lora_alpha", rank))
        scale = alpha / (rank ** 0.5 if metadata.get("use_rslora") else rank)
        with (editable([weight]) if editable is not None else nullcontext()):
            if tuple(b.shape[:1]) + tuple(a.shape[1:]) != tuple(weight.shape):
                raise ValueError(f"{source}: {name}: B @ A is {(b.shape[0], a.shape[1])}, the weight "
                                 f"{tuple(weight.shape)}")
            with torch.no_grad():
                weight.add_((scale * (b @ a)).to(weight.device, weight.dtype))
        changed += 1
    if not changed:
        raise ValueError(f"{source}: no LoRA tensors")
    return changed


def lora_factors(state: dict[str, torch.Tensor], source: str, note: str = "") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module: (A, B)}, sorted by module, from `<module>.lora_A.weight` / `<module>.lora_B.weight` tensors;
    ValueError naming `source` for anything else, a missing factor, or factors of no linear LoRA."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        for role in ("lora_A", "lora_B"):
            suffix = f".{role}.weight"
            if name.endswith(suffix):
                parts.setdefault(name[:-len(suffix)], {})[role] = tensor
                break
        else:
            raise ValueError(f"{source}: {name!r} is not a plain LoRA factor (lora_A/lora_B weight){note}")
    out = {}
    for module, p in sorted(parts.items()):
        if set(p) != {"lora_A", "lora_B"}:
            raise ValueError(f"{source}: {module} lacks {({'lora_A', 'lora_B'} - set(p)).pop()}")
        a, b = p["lora_A"], p["lora_B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{source}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                             "are not the factors of one linear LoRA")
        out[module] = (a, b)
    return out

