"""CWD, channel-wise distillation (Shu et al., ICCV 2021), for detection and segmentation.

Each channel of a map is turned into a distribution over its H x W positions (softmax at
temperature T) and the student's is pulled towards the teacher's:

    L = w * T^2 / (N * C) * sum_{n, c} KL( softmax_HW(y_t[n, c] / T) || softmax_HW(y_s[n, c] / T) )

- detection: every FPN level (all five outputs, as mmrazor's ``cwd_fpn_*`` configs record
  ``neck`` and name ``loss_cwd_fpn0`` .. ``loss_cwd_fpn4``), the student's map through a
  1x1 adapter when its channels differ; each level's loss weighted by ``weight``, summed;
- segmentation: the decode heads' logits at their own resolution (mmrazor records
  ``decode_head.conv_seg``); the two maps must have the same size.

Three releases normalise it differently (``variant:``), each its own computation:

- ``mmrazor`` (default): mmrazor ``mmrazor/models/losses/cwd.py``, ``ChannelWiseDivergence``:
  ``log_softmax``; C is the channel count of the compared maps (after the adapter: the
  teacher's);
- ``cirkd``: winycg/CIRKD ``losses/cwd.py``, ``CriterionCWD(norm_type='channel',
  divergence='kl')``: ``KLDivLoss(reduction='sum')`` on the log of the softmax, divided by
  N x the student's own channel count (read before its 1x1 conv);
- ``paddle``: PaddleDetection ``ppdet/slim/distill_loss.py``, ``CWDFeatureLoss(normalize=True)``
  as PP-YOLOE+'s distillation configures it: each map standardised per channel over
  (N, H, W) first (``feature_norm``: mean 0, unbiased std 1, + 1e-6), ``log(1e-5 + p)``,
  divided by N x the student's own channel count.

On maps of equal channels ``mmrazor`` and ``cirkd`` agree (up to the log of a softmax that
underflows); ``paddle`` differs by the standardisation. Defaults: T = 1 and weight 10 per
FPN level (mmrazor ``configs/distill/mmdet/cwd/cwd_fpn_frcnn_r101_frcnn_r50_1x_coco.py``, and
the RetinaNet config built on it); weight 5 on segmentation logits (mmrazor
``configs/distill/mmseg/cwd/cwd_logits_pspnet_r101_d8_pspnet_r18_d8_512x1024_cityscapes_80k.py``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._base import DetBatch, Distiller, ModelInfo, SegBatch, accumulated, adapter

VARIANTS = ("mmrazor", "cirkd", "paddle")


def standardised(x: torch.Tensor) -> torch.Tensor:
    """Paddle's ``feature_norm``: each channel to mean 0 and (unbiased) std 1 over N, H, W."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    flat = (flat - flat.mean(dim=1, keepdim=True)) / (flat.std(dim=1, keepdim=True) + 1e-6)
    return flat.reshape(x.shape[1], x.shape[0], *x.shape[2:]).transpose(0, 1)


def channel_divergence(fs: torch.Tensor, ft: torch.Tensor, temp: float, variant: str = "mmrazor",
                       student_channels: int | None = None) -> torch.Tensor:
    """``T^2 sum KL(softmax_HW(ft / T) || softmax_HW(fs / T)) / (N * C)`` for two N x C x H x W
    maps (the student's already adapted), as ``variant`` releases it; ``student_channels``:
    the student's own channel count, which ``cirkd`` and ``paddle`` divide by."""
    if fs.shape != ft.shape:
        raise ValueError(f"CWD compares maps of the same shape: student {tuple(fs.shape)}, teacher {tuple(ft.shape)}")
    n, c = ft.shape[:2]
    fs, ft = accumulated(fs), accumulated(ft.detach())
    if variant == "paddle":
        fs, ft = standardised(fs), standardised(ft)
    s, t = fs.reshape(n * c, -1) / temp, ft.reshape(n * c, -1) / temp
    if variant == "paddle":
        p_s, p_t = F.softmax(s, dim=1), F.softmax(t, dim=1)
        total = (p_t * (torch.log(1e-5 + p_t) - torch.log(1e-5 + p_s))).sum()
        return total / (n * (student_channels or c))
    log_s, log_t = F.log_softmax(s, dim=1), F.log_softmax(t, dim=1)
    total = (log_t.exp() * (log_t - log_s)).sum() * temp ** 2
    return total / (n * ((student_channels or c) if variant == "cirkd" else c))


class CWD(Distiller):
    """Channel-wise distillation on detection's FPN levels or segmentation's logits."""

    def __init__(self, params: dict[str, Any], student: ModelInfo, teacher: ModelInfo) -> None:
        super().__init__(params, student, teacher)
        if self.task not in ("det", "seg"):
            raise ValueError(f"cwd serves detection and segmentation, not {self.task!r}")
        if params["variant"] not in VARIANTS:
            raise ValueError(f"cwd: variant {params['variant']!r}; valid: {', '.join(VARIANTS)}")
        pairs = list(zip(student.channels, teacher.channels)) if self.task == "det" else []
        self.adapters = nn.ModuleList(adapter(cs, ct) for cs, ct in pairs)

    def forward(self, batch: DetBatch | SegBatch) -> dict[str, torch.Tensor]:
        temp, weight, variant = float(self.params["temp"]), float(self.params["weight"]), self.params["variant"]
        if self.task == "seg":
            loss = channel_divergence(batch.student_head_logits, batch.teacher_head_logits, temp, variant)
            return {"loss_cwd": weight * loss}
        loss = sum(weight * channel_divergence(a(fs), ft, temp, variant, fs.shape[1])
                   for a, fs, ft in zip(self.adapters, batch.student_feats, batch.teacher_feats))
        return {"loss_cwd": loss}
