"""The base of every model a trial trains: a student, an optional frozen teacher and an
optional distiller, as one mmengine ``BaseModel``.

The teacher is frozen once (``requires_grad=False``) and stays in eval mode whatever
``train()`` is called with, so its BN statistics and dropout never change (unless the
distiller asks for batch statistics: SSLD's ``teacher_mode: train``, its running
statistics still unchanged); the export
(:meth:`student_state_dict`) is the student alone.
"""
from __future__ import annotations

from typing import Any

import time

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
        #: seconds spent in the teacher's forward while training (for the cost columns)
        self.teacher_seconds = 0.0
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            self._time_teacher(teacher)

    def _time_teacher(self, teacher: nn.Module) -> None:
        """Time every call into the teacher's parts (backbone, neck, heads: whichever way a
        distiller calls the teacher, it goes through them) while training."""
        started: list[float] = []

        def sync(module: nn.Module) -> None:
            if torch.cuda.is_available() and next(module.parameters(), torch.empty(0)).is_cuda:
                torch.cuda.synchronize()

        def before(module: nn.Module, args: Any) -> None:
            if self.training:
                sync(module)
                started.append(time.perf_counter())

        def after(module: nn.Module, args: Any, output: Any) -> None:
            if self.training and started:
                sync(module)
                self.teacher_seconds += time.perf_counter() - started.pop()
        parts = list(teacher.children()) or [teacher]
        for part in parts:
            part.register_forward_pre_hook(before)
            part.register_forward_hook(after)

    def train(self, mode: bool = True) -> "TeacherStudentModel":
        super().train(mode)
        if self.teacher is not None:
            batch_stats = mode and self.distiller is not None and self.distiller.teacher_batch_statistics()
            self.teacher.train(batch_stats)
            if batch_stats:       # batch statistics, but its running statistics stay the evaluated teacher's
                for module in self.teacher.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.track_running_stats = False     # (nor its batch counter)
        return self

    def with_distillation(self, own: dict[str, Any], batch: Any) -> dict[str, Any]:
        """The student's own losses, scaled by the distiller's ``student_loss_weight()``
        (1: unchanged), and the distiller's terms for ``batch`` added; a distiller term
        named like one of the student's is an error, never an overwrite."""
        weight = self.distiller.student_loss_weight()
        if weight != 1.0:
            own = {k: (v * weight if "loss" in k else v) for k, v in own.items()}
        extra = self.distiller(batch)
        clash = set(extra) & set(own)
        if clash:
            raise KeyError(f"distiller losses {sorted(clash)} clash with the student's own losses")
        return {**own, **extra}

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The exported checkpoint's weights: the student alone (no teacher, no adapters)."""
        return {k: v.detach().cpu() for k, v in self.student.state_dict().items()}
