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

from .adapters import STUDENT, TEACHER, paired_adapter_params, set_active_adapter

class EmaTeacher:
    """teacher <- decay * teacher + (1 - decay) * student after every optimizer step.

    The average is kept in float32 whatever the weights' dtype: with decay 0.9999 a bf16 teacher would
    round every update away. Under ZeRO-3 it acts on each rank's own partitions (`local`).
    """

    def __init__(self, model: nn.Module, student_params: list[torch.Tensor], teacher_params: list[torch.Tensor],
                 decay: float, lora: bool):
        self.model = model
        self.decay = decay
        self.lora = lora
        self._student = student_params
        self._teacher = teacher_params
        self._local = lambda p: p.data
        self._shadow: list[torch.Tensor] | None = None
        with torch.no_grad():
            for s, t in zip(self._student, self._teacher):
                if getattr(t, "ds_tensor", None) is None:  # a sharded twin was built from the same weights
                    t.data.copy_(s.data)
        for p in self._teacher:
            p.requires_grad_(False)

    @classmethod
    def for_lora(cls, model: nn.Module, decay: float) -> "EmaTeacher":
        students, teachers = paired_adapter_params(model)
        return cls(model, students, teachers, decay, lora=True)

    @classmethod
    def for_full(cls, student: nn.Module, decay: float, teacher: nn.Module | None = None) -> "EmaTeacher":
        """`teacher`: a frozen twin already placed by the engine (ZeRO-3); default a deep copy."""
        teacher = copy.deepcopy(student) if teacher is None else teacher
        t_module = getattr(teacher, "module", teacher)
        teacher.eval()  # (a DeepSpeed engine's eval() returns None, so not chained)
        return cls(teacher, list(student.parameters()), list(t_module.parameters()), decay, lora=False)

    def use_local_view(self, local) -> None:
        """How to reach this rank's part of a parameter (the engine's `local`)."""
        self._local = local
        self._shadow = None

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

    def _shadows(self) -> list[torch.Tensor]:
        if self._shadow is None:
            locals_ = [self._local(t) for t in self._teacher]
            self._shadow = [t if t.dtype == torch.float32 else t.float() for t in locals_]
        return self._shadow

    @torch.no_grad()
    def update(self) -> None:
        if self.decay >= 1.0:
            return
        shadows = self._shadows()
        torch._foreach_mul_(shadows, self.decay)
        torch._foreach_add_(shadows, [self._local(s).float() for s in self._student], alpha=1.0 - self.decay)
        self._write_back()

    def _write_back(self) -> None:
        for t, shadow in zip(self._teacher, self._shadows()):
            local = self._local(t)
            if local.data_ptr() != shadow.data_ptr():
                local.copy_(shadow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): t.detach().clone() for i, t in enumerate(self._shadows())}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        shadows = self._shadows()
        if len(state) != len(shadows):
            raise ValueError(f"teacher state has {len(state)} tensors, expected {len(shadows)}")
        for i, shadow in enumerate(shadows):
            shadow.copy_(state[str(i)])
        self._write_back()
