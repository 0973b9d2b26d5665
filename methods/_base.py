"""The contract between the harness and a distiller: what each task hands it, and the
base class every distiller derives from.

A distiller is built once per trial as ``cls(params, student, teacher)``: ``params`` are
the catalog's defaults with the suite's overrides applied (already validated), and
``student`` / ``teacher`` are :class:`ModelInfo` of the two sides (the channels and
strides of what it taps, the task it serves). It is then called once per training step
with the task's batch and returns a dict of weighted loss terms, each key starting with
``loss_``, which the harness adds to the student's own losses.

What each task hands :meth:`Distiller.forward`:

- detection: :class:`DetBatch` (the student's and teacher's FPN levels, the GT boxes
  padded per image; the dense heads' outputs with ``needs_head_outputs``; the positive
  RoIs of a two-stage student with ``needs_rois``);
- segmentation: :class:`SegBatch` (both models' logits at the input size and at the
  decode head's own resolution, the decode head's input features, the label map);
- classification: :class:`ClsBatch` (both models' logits and the labels, -1 for
  unlabelled images).

Every hook any task calls is declared on :class:`Distiller` with its default, so a
distiller overrides only what it uses. This module imports torch only: nothing of the
harness, so a distiller is testable on plain tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence


@dataclass
class ModelInfo:
    """Static facts about one side (student or teacher) that size a distiller's parts.

    ``channels`` and ``strides`` describe the feature maps the distiller is handed, level
    by level: the FPN levels it taps (detection) or the decode head's input features
    (segmentation); classification hands none. ``task`` is the task the distiller
    serves in this trial (``det``, ``seg`` or ``cls``): a method registered for several
    tasks reads it here (or as :attr:`Distiller.task`)."""

    arch: str
    family: str
    channels: list[int]          # channels of each tapped feature level
    strides: list[int]           # stride of each tapped level, in input pixels
    head_layout: dict[str, Any] = field(default_factory=dict)   # what fixes the dense head's predictions
    task: str = ""               # the task served: det, seg or cls
    num_classes: int = 0         # the dataset's class count (the logits' channels)


@dataclass
class HeadOutputs:
    """One model's dense predictions for a batch (detection, with ``needs_head_outputs``):
    for every prediction (anchor or point) of a one-stage head, or of a two-stage
    detector's RPN, class logits ``cls`` N x P x C, raw regressions ``reg`` N x P x R, the
    ``priors`` P x 4 (anchors) or P x 2 (points), decoded ``boxes`` N x P x 4 in input
    pixels, and the positive IoU threshold of the detector's own assigner. Levels are
    concatenated in mmdet's order (level, then row, column, anchor), so prediction p of
    the teacher and of the student correspond when the two heads share a prior layout."""

    cls: torch.Tensor
    reg: torch.Tensor
    priors: torch.Tensor
    boxes: torch.Tensor
    points_only: bool
    pos_iou: float
    low_quality: bool = True      # the assigner's low-quality matches (each box's best priors)
    min_pos_iou: float = 0.0


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
    student_head: "HeadOutputs | None" = None    # for distillers that set needs_head_outputs
    teacher_head: "HeadOutputs | None" = None
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


@dataclass
class SegBatch:
    """One segmentation training batch as a distiller sees it.

    - ``student_logits`` / ``teacher_logits``: B x C x H x W, upsampled (bilinear) to the
      input size: what the pixel-level methods (pixel KD, ICSD) compare;
    - ``labels``: B x H x W train ids at the input size, 255 = ignore;
    - ``student_head_logits`` / ``teacher_head_logits``: the decode heads' outputs at
      their own resolution (B x C x h x w, before any upsampling);
    - ``student_feats`` / ``teacher_feats``: the feature maps each decode head received
      (the backbone's outputs, or the neck's where there is one), level by level as
      :class:`ModelInfo` describes them: what feature and channel distillers tap.

    The teacher's tensors carry no gradient.
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    labels: torch.Tensor
    student_head_logits: torch.Tensor | None = None
    teacher_head_logits: torch.Tensor | None = None
    student_feats: list[torch.Tensor] = field(default_factory=list)
    teacher_feats: list[torch.Tensor] = field(default_factory=list)


@dataclass
class ClsBatch:
    """One classification training batch: both models' logits (B x classes) and the
    labels (B; -1 for an image of the unlabeled folder). The teacher's carry no gradient."""

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    labels: torch.Tensor


class Distiller(nn.Module):
    """Base class: a distiller owns its trainable parts and turns a batch into losses.

    Subclasses implement :meth:`forward` (the batch of their task, see the module's
    docstring), returning a dict whose keys start with ``loss_``, each already
    multiplied by its weight; the harness adds them to the student's own losses and
    trains the distiller's parameters (adapters, ...) with the student. The tasks a
    method serves are declared in ``harness.catalog`` (``tasks=``); which one it serves
    in a trial is :attr:`task`. Every other hook has a default here:

    - ``epoch`` / ``max_epochs``: kept current by the harness before every training
      epoch (0-based epoch), for methods whose weights change over training;
    - :meth:`student_loss_weight`: the factor on the student's own losses (detection,
      segmentation; a classification distiller returns every loss itself);
    - :meth:`before_epoch`: a step before every training epoch (detection);
    - ``needs_head_outputs`` / ``needs_rois``: what a detection batch must carry.
    """

    #: detection: the batch carries both models' dense-head outputs (``DetBatch.student_head``)
    needs_head_outputs: bool = False
    #: detection: a two-stage student's batch carries its positive RoIs (``DetBatch.rois``)
    needs_rois: bool = False

    def __init__(self, params: dict[str, Any], student: ModelInfo, teacher: ModelInfo) -> None:
        super().__init__()
        self.params = dict(params)
        self.student_info, self.teacher_info = student, teacher
        self.epoch, self.max_epochs = 0, 1

    @property
    def task(self) -> str:
        """The task this distiller serves in this trial (``det``, ``seg`` or ``cls``), from
        the :class:`ModelInfo` it was built with; empty when built without one (tests)."""
        return getattr(self.student_info, "task", "") or ""

    def student_loss_weight(self) -> float:
        """The factor the harness multiplies the student's own losses with at this step
        (ICSD's adaptive weighting fades the cross-entropy in); default 1: unchanged.
        Called by detection and segmentation before each step."""
        return 1.0

    def teacher_batch_statistics(self) -> bool:
        """Whether the teacher runs in train mode while the student trains (its BN layers
        normalise by the batch's statistics, as PaddleClas' SSLD does); its stored
        running statistics are never changed. Default False: the teacher in eval mode,
        the teacher that was evaluated."""
        return False

    def before_epoch(self, batches: Iterator[Any]) -> None:
        """Called before every training epoch (detection) with an iterator of
        :class:`DetBatch` over the training data, both models' features computed lazily
        with the student in eval mode (GKP's prototype generation). Default: nothing,
        and nothing is computed (the iterator is never advanced)."""
        return None

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward(batch) -> dict of loss_* terms")


def accumulated(x: torch.Tensor) -> torch.Tensor:
    """``x`` in a dtype a sum over a whole feature map can be taken in: half precision
    (float16, bfloat16: what autocast leaves) goes to float32, as autocast does for its
    own reductions (float16 overflows at 65504); float32 and float64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def adapter(c_in: int, c_out: int, kernel_size: int = 1) -> nn.Module:
    """A conv mapping student channels to teacher channels; identity when they agree."""
    if c_in == c_out and kernel_size == 1:
        return nn.Identity()
    return nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2)
