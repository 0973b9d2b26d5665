"""The model one trial trains: a student, a frozen teacher and a distiller's parts.

:class:`DistillationModel` is an mmengine ``BaseModel``, so the stock ``Runner``,
optimiser wrappers and evaluation loops drive it unchanged:

- ``loss`` runs the student's own ``loss`` (its neck output is captured by a forward
  hook, so the features the distiller sees are exactly the ones the student's head
  used), the teacher on the identical preprocessed batch without autograd, and adds the
  distiller's ``loss_*`` terms to the student's;
- ``predict`` is the student's, so evaluation measures the student alone;
- the teacher stays in eval mode with ``requires_grad=False`` whatever ``train()`` is
  called with, and ``init_weights`` never touches it;
- :meth:`student_state_dict` is the export: the student alone, loadable into a plain
  detector built from the same config.
"""
from __future__ import annotations

from typing import Any

import torch
from mmengine.model import BaseModel
from torch import nn

from methods._base import DetBatch, Distiller

from .dense import dense_head, head_outputs


class DistillationModel(BaseModel):
    """Student + frozen teacher + distiller (any of the last two may be absent)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None,
                 distiller: Distiller | None = None, num_levels: int | None = None) -> None:
        super().__init__(data_preprocessor=student.data_preprocessor)
        self.student = student
        self.distiller = distiller
        self.num_levels = num_levels
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        self._captured: dict[str, Any] = {}
        self._needs_head = bool(getattr(distiller, "needs_head_outputs", False))
        if distiller is not None:
            if teacher is None:
                raise ValueError("a distiller needs a teacher")
            student.neck.register_forward_hook(self._capture("feats"))
            if self._needs_head:
                dense_head(student).register_forward_hook(self._capture("head"))

    def _capture(self, key: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._captured[key] = output
        return hook

    def train(self, mode: bool = True) -> "DistillationModel":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()          # frozen: BN statistics and dropout never change
        return self

    def init_weights(self) -> None:
        """Initialise the student only; the teacher keeps its loaded weights and the
        distiller's parts were initialised when built."""
        self.student.init_weights()

    def forward(self, inputs: torch.Tensor, data_samples: Any = None, mode: str = "tensor") -> Any:
        if mode == "loss":
            return self.loss(inputs, data_samples)
        if mode == "predict":
            return self.student.predict(inputs, data_samples)
        if mode == "tensor":
            return self.student._forward(inputs, data_samples)
        raise ValueError(f"invalid mode '{mode}': expected loss, predict or tensor")

    def loss(self, inputs: torch.Tensor, data_samples: Any) -> dict[str, torch.Tensor]:
        self._captured = {}
        losses = self.student.loss(inputs, data_samples)
        if self.distiller is None:
            return losses
        captured, self._captured = self._captured, {}
        with torch.no_grad():
            teacher_all = self.teacher.extract_feat(inputs)
            teacher_raw = dense_head(self.teacher)(teacher_all) if self._needs_head else None
        student_feats, teacher_feats = list(captured["feats"]), list(teacher_all)
        k = self.num_levels or len(student_feats)
        batch = DetBatch.from_data_samples(student_feats[:k], teacher_feats[:k], data_samples)
        if self._needs_head:
            batch.student_head = head_outputs(self.student, captured["head"])
            batch.teacher_head = head_outputs(self.teacher, teacher_raw)
        extra = self.distiller(batch)
        clash = set(extra) & set(losses)
        if clash:
            raise KeyError(f"distiller losses {sorted(clash)} clash with the student's own losses")
        losses.update(extra)
        return losses

    def student_state_dict(self) -> dict[str, torch.Tensor]:
        """The exported checkpoint's weights: the student alone (no teacher, no adapters)."""
        return {k: v.detach().cpu() for k, v in self.student.state_dict().items()}
