"""Throw-away distillers, registered from inside ``tests/`` by ``conftest.py`` (no file
outside ``tests/`` is edited): they show that the registry-looping tests of every task
pick up a new method and that a trial of it runs through the Runner, as a newcomer's
method would (``docs/extending.md``).

- :class:`ChannelKD` (``tmp_cwd``, detection and segmentation): a channel-wise
  distillation in the manner of CWD (Shu et al., ICCV 2021): each channel's activation
  map, softmax-normalised over its positions at temperature T, is matched to the
  teacher's by ``T^2 KL``, averaged over channels, after a 1x1 adapter sized by the
  :class:`~methods._base.ModelInfo` channels. On detection it taps every FPN level it is
  handed; on segmentation the decode head's last input feature and its logits at its own
  resolution. It learns which task it serves from ``self.task``.
- :class:`LogitMSE` (``tmp_logit_mse``, classification): cross-entropy on the labelled
  images plus the mean squared difference of the logits.

Both are small on purpose: they test the harness's contract, not a paper.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from methods._base import ClsBatch, DetBatch, Distiller, ModelInfo, SegBatch, adapter


def channel_kd(fs: torch.Tensor, ft: torch.Tensor, temp: float) -> torch.Tensor:
    """``T^2 KL(softmax_HW(ft / T) || softmax_HW(fs / T))``, averaged over N x C channels."""
    n, c = ft.shape[:2]
    log_s = F.log_softmax(fs.reshape(n, c, -1) / temp, dim=2)
    log_t = F.log_softmax(ft.reshape(n, c, -1) / temp, dim=2)
    return temp ** 2 * (log_t.exp() * (log_t - log_s)).sum(2).mean()


class ChannelKD(Distiller):
    """Channel-wise KD on detection's FPN levels or segmentation's decode-head inputs."""

    def __init__(self, params: dict[str, Any], student: ModelInfo, teacher: ModelInfo) -> None:
        super().__init__(params, student, teacher)
        if self.task not in ("det", "seg"):
            raise ValueError(f"tmp_cwd serves det and seg, not {self.task!r}")
        # segmentation: the last level the decode head receives; detection: every level
        pairs = list(zip(student.channels, teacher.channels))
        self.adapters = nn.ModuleList(adapter(cs, ct) for cs, ct in (pairs[-1:] if self.task == "seg" else pairs))

    def forward(self, batch: DetBatch | SegBatch) -> dict[str, torch.Tensor]:
        temp, weight = float(self.params["temp"]), float(self.params["weight"])
        if self.task == "det":
            loss = sum(channel_kd(a(fs), ft, temp)
                       for a, fs, ft in zip(self.adapters, batch.student_feats, batch.teacher_feats))
            return {"loss_tmp_cwd": weight * loss}
        feat = channel_kd(self.adapters[0](batch.student_feats[-1]), batch.teacher_feats[-1], temp)
        logits = channel_kd(batch.student_head_logits, batch.teacher_head_logits, temp)
        return {"loss_tmp_cwd_feat": weight * feat, "loss_tmp_cwd_logits": weight * logits}


class LogitMSE(Distiller):
    """CE on labelled images + weight * mean squared logit difference."""

    def forward(self, batch: ClsBatch) -> dict[str, torch.Tensor]:
        labelled = batch.labels >= 0
        ce = F.cross_entropy(batch.student_logits[labelled], batch.labels[labelled]) if labelled.any() \
            else batch.student_logits.sum() * 0.0
        mse = ((batch.student_logits - batch.teacher_logits) ** 2).mean()
        return {"loss_ce": ce, "loss_tmp_logit_mse": float(self.params["weight"]) * mse}


def register() -> None:
    """Register both in the harness's catalog (once per process), as a plugin would."""
    from harness import catalog
    if "tmp_cwd" in catalog.METHODS:
        return
    catalog.METHODS.register("tmp_cwd", target="tests.throwaway:ChannelKD", tasks=("det", "seg"),
                             params={"temp": 4.0, "weight": 1.0}, positive=("temp",), needs_same_levels=True,
                             doc="test-only: channel-wise KD (CWD-style) on detection and segmentation")
    catalog.METHODS.register("tmp_logit_mse", target="tests.throwaway:LogitMSE", tasks=("cls",),
                             params={"weight": 1.0}, doc="test-only: CE + logit MSE for classification")
