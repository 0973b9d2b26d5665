"""What the harness hands a distiller, and the base class every distiller derives from."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence


@dataclass
class ModelInfo:
    """Static facts about one side (student or teacher) that size a distiller's parts."""

    arch: str
    family: str
    channels: list[int]          # channels of each tapped feature level
    strides: list[int]           # stride of each tapped level, in input pixels
    head_layout: dict[str, Any] = field(default_factory=dict)   # what fixes the dense head's predictions


@dataclass
class DetBatch:
    """One detection training batch as a distiller sees it.

    ``boxes`` is N x B x 4 (x1, y1, x2, y2) in resized-image pixels, padded to the
    largest box count B of the batch with ``box_valid`` marking the real ones, so
    losses can be computed for the whole batch without a loop over images or boxes.
    ``img_hw`` is N x 2: each image's (h, w) after resizing, before padding.
    """

    student_feats: list[torch.Tensor]
    teacher_feats: list[torch.Tensor]
    boxes: torch.Tensor
    box_valid: torch.Tensor
    labels: torch.Tensor
    img_hw: torch.Tensor
    data_samples: list[Any] = field(default_factory=list)
    student_head: Any = None      # harness.tasks.det.dense.HeadOutputs, for distillers that set needs_head_outputs
    teacher_head: Any = None
    rois: "RoIBatch | None" = None  # two-stage positive RoIs, for distillers that set needs_rois

    @classmethod
    def from_data_samples(cls, student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor],
                          data_samples: list[Any]) -> "DetBatch":
        device = student_feats[0].device
        gts = [ds.gt_instances for ds in data_samples]
        box_list = [(g.bboxes.tensor if hasattr(g.bboxes, "tensor") else g.bboxes).to(device).float() for g in gts]
        if not any(len(b) for b in box_list):      # keep one (invalid) slot so shapes stay N x B
            box_list[0] = torch.zeros(1, 4, device=device)
        boxes = pad_sequence(box_list, batch_first=True)
        labels = pad_sequence([g.labels.to(device) for g in gts], batch_first=True, padding_value=-1)
        valid = pad_sequence([torch.ones(len(g.labels), dtype=torch.bool, device=device) for g in gts],
                             batch_first=True)
        if labels.shape[1] < boxes.shape[1]:
            labels = torch.full(boxes.shape[:2], -1, dtype=torch.long, device=device)
            valid = torch.zeros(boxes.shape[:2], dtype=torch.bool, device=device)
        img_hw = torch.tensor([ds.img_shape[:2] for ds in data_samples], dtype=torch.float32, device=device)
        return cls(student_feats, teacher_feats, boxes, valid, labels, img_hw, data_samples)


@dataclass
class RoIBatch:
    """A two-stage student's positive sampled RoIs, padded per image like the GT boxes:
    boxes N x R x 4, valid N x R, labels N x R; and for the valid ones (in that order)
    the student's RoI-head class logits and the teacher's RoI head run on the same RoIs."""

    boxes: torch.Tensor
    valid: torch.Tensor
    labels: torch.Tensor
    student_logits: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None


class Distiller(nn.Module):
    """Base class: a distiller owns its trainable parts and turns a batch into losses.

    Subclasses set ``task`` and implement :meth:`forward`, returning a dict whose keys
    start with ``loss_`` (each already multiplied by its weight); the harness adds them
    to the student's own losses. ``epoch`` and ``max_epochs`` are kept current by the
    harness for methods whose weights change over training.
    """

    task: str = ""
    needs_head_outputs: bool = False   # True: the batch carries both models' dense-head outputs
    needs_rois: bool = False           # True: a two-stage batch carries the positive RoIs (RoIBatch)

    def __init__(self, params: dict[str, Any], student: ModelInfo, teacher: ModelInfo) -> None:
        super().__init__()
        self.params = dict(params)
        self.student_info, self.teacher_info = student, teacher
        self.epoch, self.max_epochs = 0, 1

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def adapter(c_in: int, c_out: int, kernel_size: int = 1) -> nn.Module:
    """A conv mapping student channels to teacher channels; identity when they agree."""
    if c_in == c_out and kernel_size == 1:
        return nn.Identity()
    return nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2)
