"""Feature-imitation baseline: MSE between FPN levels, student through an adapter.

The plain baseline of the detection tables (FitNets-style hint learning, Romero et al.
ICLR 2015, applied to every FPN level): ``L = sum_levels mean((a(F_s) - F_t)^2)``, with
``a`` a 1x1 conv when the channel counts differ. No mask, no attention: the reference
that focal, instance and global methods must beat.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._base import DetBatch, Distiller, ModelInfo, adapter


def imitation_loss(fs: list[torch.Tensor], ft: list[torch.Tensor]) -> torch.Tensor:
    """Sum over levels of the mean squared difference (student already adapted)."""
    return sum(((s - t) ** 2).mean() for s, t in zip(fs, ft))


class FeatureMSE(Distiller):
    """MSE feature imitation on every tapped FPN level."""


    def __init__(self, params: dict[str, Any], student: ModelInfo, teacher: ModelInfo) -> None:
        super().__init__(params, student, teacher)
        self.adapters = nn.ModuleList(adapter(cs, ct) for cs, ct in zip(student.channels, teacher.channels))

    def forward(self, batch: DetBatch) -> dict[str, torch.Tensor]:
        adapted = [a(f) for a, f in zip(self.adapters, batch.student_feats)]
        return {"loss_feat_mse": self.params["weight"] * imitation_loss(adapted, batch.teacher_feats)}
