"""The base of every model a trial trains: a student, an optional frozen teacher and an
optional distiller, as one mmengine ``BaseModel``.

The teacher is frozen once (``requires_grad=False``) and stays in eval mode whatever
``train()`` is called with, so its BN statistics and dropout never change; the export
(:meth:`student_state_dict`) is the student alone.
"""
from __future__ import annotations

from typing import Any

import torch
from mmengine.model import BaseModel
from torch import nn


class TeacherStudentModel(BaseModel):
    """Student + frozen teacher + distiller; subclasses implement ``forward``."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, distiller: Any,
                 data_preprocessor: nn.Module) -> None:
        super().__init__(data_preprocessor=data_preprocessor)
        if distiller is not None and teacher is None:
            raise ValueError("a distiller needs a teacher")
        self.student, self.teacher, self.distiller = student, teacher, distiller
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "TeacherStudentModel":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The exported checkpoint's weights: the student alone (no teacher, no adapters)."""
        return {k: v.detach().cpu() for k, v in self.student.state_dict().items()}
