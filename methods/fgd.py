"""FGD: Focal and Global Distillation for object detection.

Yang, Z. et al. "Focal and Global Knowledge Distillation for Detectors", CVPR 2022
(arXiv:2111.11837); released code github.com/yzd-v/FGD (mmdet 2.x, ``FeatureLoss``).

Per FPN level, with student features mapped to the teacher's channels by a 1x1 adapter:

- Eq. 1-2, binary-weighted masks: ``M_fg`` holds ``1 / (h_box * w_box)`` (box size in
  grid cells) in the cells a GT box covers, the largest value (smallest box) where
  boxes overlap; ``M_bg`` is 1 off every box, divided by the count of such cells.
- Eq. 3-4, attention: ``A_S = HW * softmax_HW(mean_C |F| / T)``,
  ``A_C = C * softmax_C(mean_HW |F| / T)``.
- Eq. 5, focal feature loss weighted by the teacher's attention only:
  ``L_fg = sum M_fg A_S^t A_C^t (F_s - F_t)^2 / N`` and ``L_bg`` with ``M_bg``.
- Eq. 6, attention loss ``L_at = (sum |A_C^s - A_C^t| + sum |A_S^s - A_S^t|) / N``.
- Eq. 8-9, global loss through a GcBlock per side: ``L_glob = sum (R_s(F_s) - R_t(F_t))^2 / N``.
- Eq. 10: ``alpha L_fg + beta L_bg + gamma L_at + lambda L_glob``, summed over levels.

Boxes are scaled to the grid by ``W / img_w`` and ``H / img_h`` with ``img_*`` the
resized image before padding, and a box covers cells ``floor(x1)..ceil(x2)`` inclusive
(clipped to the grid; the cell count used for the weight is not clipped), as in the
released code. The released code builds the masks with a Python loop over boxes; here
they are built for the whole batch at once (same values).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._base import DetBatch, Distiller, ModelInfo, adapter


def focal_masks(boxes: torch.Tensor, valid: torch.Tensor, img_hw: torch.Tensor,
                height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background masks, each N x H x W.

    boxes: N x B x 4 (x1, y1, x2, y2) in image pixels; valid: N x B; img_hw: N x 2.
    """
    sx = (width / img_hw[:, 1]).unsqueeze(1)          # N x 1: grid cells per pixel
    sy = (height / img_hw[:, 0]).unsqueeze(1)
    wmin = torch.floor(boxes[..., 0] * sx)
    wmax = torch.ceil(boxes[..., 2] * sx)
    hmin = torch.floor(boxes[..., 1] * sy)
    hmax = torch.ceil(boxes[..., 3] * sy)
    weight = 1.0 / ((hmax + 1 - hmin) * (wmax + 1 - wmin))                   # N x B
    cols = torch.arange(width, device=boxes.device, dtype=boxes.dtype)
    rows = torch.arange(height, device=boxes.device, dtype=boxes.dtype)
    in_cols = (cols >= wmin[..., None]) & (cols <= wmax[..., None])          # N x B x W
    in_rows = (rows >= hmin[..., None]) & (rows <= hmax[..., None])          # N x B x H
    cover = in_rows[..., :, None] & in_cols[..., None, :] & valid[..., None, None]
    fg = torch.where(cover, weight[..., None, None], weight.new_zeros(()))
    fg = fg.amax(dim=1) if fg.shape[1] else boxes.new_zeros(boxes.shape[0], height, width)
    bg = (fg <= 0).to(fg.dtype)
    bg = bg / bg.sum(dim=(1, 2), keepdim=True).clamp(min=1.0)   # an all-foreground image stays 0
    return fg, bg


def attention(feat: torch.Tensor, temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial (N x H x W) and channel (N x C) attention of a feature map (Eq. 3-4)."""
    n, c, h, w = feat.shape
    value = feat.abs()
    spatial = h * w * F.softmax((value.mean(dim=1) / temp).reshape(n, -1), dim=1).reshape(n, h, w)
    channel = c * F.softmax(value.mean(dim=(2, 3)) / temp, dim=1)
    return spatial, channel


def focal_losses(fs: torch.Tensor, ft: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor,
                 temp: float) -> dict[str, torch.Tensor]:
    """Foreground, background and attention losses of one level (Eq. 5-6), unweighted.

    fs is the student map already in the teacher's channels; ft the teacher's map.
    """
    n = fs.shape[0]
    s_t, c_t = attention(ft, temp)
    s_s, c_s = attention(fs, temp)
    sq = (fs - ft) ** 2 * s_t[:, None] * c_t[:, :, None, None]
    return {
        "fg": (sq * fg[:, None]).sum() / n,
        "bg": (sq * bg[:, None]).sum() / n,
        "att": ((c_s - c_t).abs().sum() + (s_s - s_t).abs().sum()) / n,
    }


class GcBlock(nn.Module):
    """Global context block (Cao et al., GCNet) as FGD uses it (Eq. 8).

    ``R(F) = F + W2(ReLU(LN(W1(sum_j softmax_j(Wk F)_j F_j))))`` with ``Wk``: C->1
    (Kaiming, fan-in), ``W1``: C->C/2, LayerNorm over [C/2, 1, 1], ``W2``: C/2->C
    initialised to zero so training starts from ``R(F) = F``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = max(channels // 2, 1)
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        self.channel_add = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1),
            nn.LayerNorm([hidden, 1, 1]),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )
        nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_mask.bias)
        nn.init.zeros_(self.channel_add[-1].weight)
        nn.init.zeros_(self.channel_add[-1].bias)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        weights = F.softmax(self.conv_mask(x).reshape(n, 1, h * w), dim=2)      # N x 1 x HW
        return torch.bmm(x.reshape(n, c, h * w), weights.transpose(1, 2)).reshape(n, c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.channel_add(self.context(x))


def global_loss(fs: torch.Tensor, ft: torch.Tensor, gc_s: GcBlock, gc_t: GcBlock) -> torch.Tensor:
    """``sum (R_s(F_s) - R_t(F_t))^2 / N`` (Eq. 9), unweighted."""
    return ((gc_s(fs) - gc_t(ft)) ** 2).sum() / fs.shape[0]


class FGD(Distiller):
    """FGD on every tapped FPN level, with one adapter and one GcBlock pair per level."""


    def __init__(self, params: dict[str, Any], student: ModelInfo, teacher: ModelInfo) -> None:
        super().__init__(params, student, teacher)
        if len(student.channels) != len(teacher.channels):
            raise ValueError(f"FGD pairs levels one to one: student taps {len(student.channels)} "
                             f"levels, teacher {len(teacher.channels)}")
        self.adapters = nn.ModuleList(adapter(cs, ct) for cs, ct in zip(student.channels, teacher.channels))
        self.gc_student = nn.ModuleList(GcBlock(ct) for ct in teacher.channels)
        self.gc_teacher = nn.ModuleList(GcBlock(ct) for ct in teacher.channels)

    def forward(self, batch: DetBatch) -> dict[str, torch.Tensor]:
        p = self.params
        totals = {"fg": 0.0, "bg": 0.0, "att": 0.0, "glob": 0.0}
        for i, (fs, ft) in enumerate(zip(batch.student_feats, batch.teacher_feats)):
            fs = self.adapters[i](fs)
            fg, bg = focal_masks(batch.boxes, batch.box_valid, batch.img_hw, ft.shape[2], ft.shape[3])
            for key, value in focal_losses(fs, ft, fg, bg, p["temp"]).items():
                totals[key] = totals[key] + value
            totals["glob"] = totals["glob"] + global_loss(fs, ft, self.gc_student[i], self.gc_teacher[i])
        return {
            "loss_fgd_fg": p["alpha"] * totals["fg"],
            "loss_fgd_bg": p["beta"] * totals["bg"],
            "loss_fgd_att": p["gamma"] * totals["att"],
            "loss_fgd_glob": p["lambda"] * totals["glob"],
        }
