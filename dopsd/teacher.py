"""The teacher: the same network in privileged context, with weights that trail the student by EMA.

LoRA mode: one DiT holds two peft adapters, `student` (trained) and `teacher` (EMA of the student, no grad).
Full fine-tune mode: the teacher is a separate copy of the transformer (EMA or frozen).
decay = 1.0 freezes the teacher at its initial weights.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

STUDENT = "student"
TEACHER = "teacher"


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


def _paired_adapter_params(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = dict(model.named_parameters())
    students, teachers = [], []
    for name, p in params.items():
        if f".{STUDENT}." not in name:
            continue
        tname = name.replace(f".{STUDENT}.", f".{TEACHER}.")
        if tname not in params:
            raise RuntimeError(f"LoRA parameter {name} has no teacher twin {tname}")
        students.append(p)
        teachers.append(params[tname])
    if not students:
        raise RuntimeError("no student LoRA parameters found: was the adapter added?")
    return students, teachers


class EmaTeacher:
    """teacher <- decay * teacher + (1 - decay) * student after every optimizer step."""

    def __init__(self, model: nn.Module, student_params: list[torch.Tensor], teacher_params: list[torch.Tensor],
                 decay: float, lora: bool):
        self.model = model
        self.decay = decay
        self.lora = lora
        self._student = student_params
        self._teacher = teacher_params
        with torch.no_grad():
            torch._foreach_copy_(self._teacher, self._student)
        for p in self._teacher:
            p.requires_grad_(False)

    @classmethod
    def for_lora(cls, model: nn.Module, decay: float) -> "EmaTeacher":
        students, teachers = _paired_adapter_params(model)
        return cls(model, students, teachers, decay, lora=True)

    @classmethod
    def for_full(cls, student: nn.Module, decay: float) -> "EmaTeacher":
        teacher = copy.deepcopy(student).eval()
        s_params = [p for p in student.parameters()]
        t_params = [p for p in teacher.parameters()]
        return cls(teacher, s_params, t_params, decay, lora=False)

    @contextmanager
    def active(self) -> Iterator[nn.Module]:
        """Yield the module to call for a teacher prediction (always under no_grad)."""
        if not self.lora:
            with torch.no_grad():
                yield self.model
            return
        set_active_adapter(self.model, TEACHER)
        try:
            with torch.no_grad():
                yield self.model
        finally:
            # Restore before anything else runs: gradient checkpointing recomputes the student's forward
            # during backward with whichever adapter is active then.
            set_active_adapter(self.model, STUDENT)

    @torch.no_grad()
    def update(self) -> None:
        if self.decay >= 1.0:
            return
        torch._foreach_mul_(self._teacher, self.decay)
        torch._foreach_add_(self._teacher, self._student, alpha=1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): t.detach().clone() for i, t in enumerate(self._teacher)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, t in enumerate(self._teacher):
                t.copy_(state[str(i)])
