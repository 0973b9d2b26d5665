"""GID: General Instance Distillation for object detection.

Dai, X. et al. "General Instance Distillation for Object Detection", CVPR 2021
(arXiv:2103.02340). No official code was released; the author's later detectron2
reproduction differs in the GI score (offered as ``score="max_logit"``).

- Sec. 3.1, general-instance selection (GISM), every iteration, no GT used:
  ``P_GI(r) = max_c |P_t(r, c) - P_s(r, c)|`` over the (sigmoid) class scores of
  corresponding predictions r (``score="max_logit"``, the reproduction's: the difference
  of the sigmoids of each side's largest logit); the GI box is the teacher's box where
  the teacher's max score is higher, else the student's; top ``top_n`` by score, boxes
  clipped to the image and those with a side of ``min_size`` px or less dropped, NMS at
  IoU ``nms_iou``, top ``k`` per image.
- Sec. 3.2.1, feature loss: RoIAlign (``roi_size`` x ``roi_size``, sampling ratio 2,
  aligned) of each GI box on the FPN level chosen by detectron2's canonical rule (a
  224-px box on P4: ``floor(4 + log2(sqrt(wh) / 224))``, clamped to the tapped levels),
  student features through an adapter; ``L_feat = sum_i ||t_i - s_i||^2 / (K S^2)`` with
  K the number of GIs in the batch.
- Sec. 3.2.2, relation loss: pairwise Euclidean distances between the pooled GI
  features, each matrix divided by its mean positive off-diagonal distance,
  ``L_rel = sum smoothL1(D_s, D_t) / (K^2 - K)``; over all GIs of the batch
  (``relation="batch"``, the reproduction's) or per image, averaged over images
  (``relation="image"``); fewer than 3 GIs give 0.
- Sec. 3.2.3, response loss on the predictions the detector's own assignment matches to
  a GI box (anchors with IoU >= the assigner's positive threshold, plus each GI's
  best-matching anchors: low-quality matches, as detectron2's RetinaNet matcher and
  mmdet's assigner allow; FCOS points inside a box): BCE of student logits against
  sigmoid(teacher logits), summed over classes, and smooth L1 (``beta = reg_beta``)
  between box regressions, both averaged over the matched predictions. For two-stage
  detectors these are the RPN outputs.
- Eq. 7: ``L_GT + l_feat L_feat + l_rel L_rel + l_cls L_cls + l_reg L_reg``.

Reference: no official code was released; the defaults and the computation follow the
first author's detectron2 reproduction (daixinghome/Distill_GID_detectron2, ``GID/gid``),
2x config ``Distill_RetinaNet_T_Res101_S_Res50_2x_L1Smo.yaml``: feature weight 5e-4
(the 1x default is 5e-3), regression smooth-L1 beta 0.1. Differences kept: the score
defaults to the paper's definition (``score="paper"``); the reproduction declares a
3x3 adapter shared over levels but never applies it (its condition is inverted), so
with equal channels (its only setting) no adapter acts, as here, where a 1x1 adapter
per level exists only when the channels differ.

Everything is batched: one NMS call for the whole batch (boxes offset per image), one
RoIAlign call per FPN level, no loop over boxes or anchors (only ``relation="image"``
loops over the batch's images).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, roi_align

from ._base import Distiller, ModelInfo, accumulated, adapter


# --------------------------------------------------------------------------- selection
def gi_scores(cls_t: torch.Tensor, cls_s: torch.Tensor, score: str = "paper") -> torch.Tensor:
    """Disagreement score of every prediction: N x P from N x P x C class logits."""
    if score == "paper":
        return (cls_t.sigmoid() - cls_s.sigmoid()).abs().amax(dim=-1)
    if score == "max_logit":
        return (cls_t.amax(dim=-1).sigmoid() - cls_s.amax(dim=-1).sigmoid()).abs()
    raise ValueError(f"GID score '{score}' is not one of: paper, max_logit")


def select_general_instances(scores: torch.Tensor, boxes_t: torch.Tensor, boxes_s: torch.Tensor,
                             conf_t: torch.Tensor, conf_s: torch.Tensor, top_n: int = 3000,
                             min_size: float = 10.0, nms_iou: float = 0.3, k: int = 10,
                             img_hw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """General instances of a batch.

    scores, conf_t, conf_s: N x P; boxes_*: N x P x 4 (x1, y1, x2, y2); img_hw: N x 2,
    each image's (h, w) before padding, to clip the boxes to (detectron2's
    ``find_top_rpn_proposals``: clip, then keep boxes whose sides exceed ``min_size``).
    Returns boxes N x k x 4, a validity mask N x k, and their scores N x k, highest
    score first within each image.
    """
    n, p = scores.shape
    boxes = torch.where((conf_t > conf_s)[..., None], boxes_t, boxes_s)
    top = scores.topk(min(top_n, p), dim=1)
    sc = top.values                                                        # N x T
    bx = boxes.gather(1, top.indices[..., None].expand(-1, -1, 4))         # N x T x 4
    if img_hw is not None:
        limit = img_hw.flip(-1).repeat(1, 2)[:, None, :]                   # N x 1 x 4: (w, h, w, h)
        bx = torch.minimum(bx.clamp(min=0), limit)
    wh = bx[..., 2:] - bx[..., :2]
    ok = (wh > min_size).all(dim=-1)
    image = torch.arange(n, device=scores.device)[:, None].expand_as(sc)
    flat_boxes, flat_scores, flat_image = bx[ok], sc[ok], image[ok]
    keep = batched_nms(flat_boxes, flat_scores, flat_image, nms_iou)      # by decreasing score
    kept_image = flat_image[keep]
    # rank of each kept box within its image, without a loop: stable sort by image keeps
    # the score order, then subtract the position where each image's run starts
    order = torch.sort(kept_image, stable=True).indices
    keep, kept_image = keep[order], kept_image[order]
    counts = torch.bincount(kept_image, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(keep), device=scores.device) - starts[kept_image]
    sel = rank < k
    out_boxes = scores.new_zeros(n, k, 4)
    out_scores = scores.new_zeros(n, k)
    valid = torch.zeros(n, k, dtype=torch.bool, device=scores.device)
    out_boxes[kept_image[sel], rank[sel]] = flat_boxes[keep[sel]]
    out_scores[kept_image[sel], rank[sel]] = flat_scores[keep[sel]]
    valid[kept_image[sel], rank[sel]] = True
    return out_boxes, valid, out_scores


# ------------------------------------------------------------------------ feature path
def roi_levels(boxes: torch.Tensor, num_levels: int, finest_scale: float = 56.0) -> torch.Tensor:
    """FPN level of each box by its size (mmdet's ``map_roi_levels``)."""
    scale = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, num_levels - 1).long()


def canonical_levels(boxes: torch.Tensor, strides: list[int], canonical_size: float = 224.0,
                     canonical_level: int = 4) -> torch.Tensor:
    """Index into ``strides`` of each box's level by detectron2's rule
    (``assign_boxes_to_levels``): ``floor(4 + log2(sqrt(area) / 224 + 1e-8))`` clamped to
    the levels present (P3 for strides starting at 8)."""
    lo, hi = int(round(math.log2(strides[0]))), int(round(math.log2(strides[-1])))
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0)
    level = torch.floor(canonical_level + torch.log2(area.sqrt() / canonical_size + 1e-8))
    return (level.clamp(lo, hi) - lo).long()


def pool_instances(feats: list[torch.Tensor], strides: list[int], boxes: torch.Tensor, valid: torch.Tensor,
                   size: int, rule: str = "mmdet", sampling_ratio: int = 2) -> torch.Tensor:
    """RoIAlign every valid box of N x K x 4 on its level: M x C x size x size (M = valid.sum()).
    ``rule``: "mmdet" (56-px finest scale) or "detectron2" (224 px on P4)."""
    image = torch.arange(boxes.shape[0], device=boxes.device)[:, None].expand(valid.shape)[valid]
    rois = torch.cat([image[:, None].to(boxes.dtype), boxes[valid]], dim=1)          # M x 5
    levels = (canonical_levels(rois[:, 1:], strides) if rule == "detectron2"
              else roi_levels(rois[:, 1:], len(feats)))
    out = feats[0].new_zeros(len(rois), feats[0].shape[1], size, size)
    for lvl, (feat, stride) in enumerate(zip(feats, strides)):                      # loop over levels only
        idx = (levels == lvl).nonzero(as_tuple=True)[0]
        if len(idx):
            out[idx] = roi_align(feat, rois[idx], size, spatial_scale=1.0 / stride,
                                 sampling_ratio=sampling_ratio, aligned=True)
    return out


def feature_loss(pooled_s: torch.Tensor, pooled_t: torch.Tensor) -> torch.Tensor:
    """``sum_i ||t_i - s_i||^2 / (K S^2)`` over the M pooled instances."""
    if len(pooled_t) == 0:
        return pooled_s.sum() * 0
    s = pooled_t.shape[-1]
    return (accumulated(pooled_t - pooled_s) ** 2).sum() / (len(pooled_t) * s * s)


def _normalised_distances(flat: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances (K x K) divided by their mean positive off-diagonal
    value, the diagonal zero (the reproduction's ``pdist``: squared distances clamped at
    1e-12 before the root)."""
    sq = flat.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * flat @ flat.t()).clamp(min=1e-12).sqrt()
    d = d * (1 - torch.eye(len(flat), device=flat.device, dtype=flat.dtype))
    positive = d > 0
    mean = (d * positive).sum() / positive.sum().clamp(min=1)
    return d / mean.clamp(min=1e-12)


def relation_loss_batch(pooled_s: torch.Tensor, pooled_t: torch.Tensor) -> torch.Tensor:
    """``sum smoothL1(D_s, D_t) / (K^2 - K)`` over all K pooled GIs of the batch at once,
    0 below 3 GIs (the reproduction's ``loss_RkdDistance``)."""
    k = len(pooled_s)
    if k < 3:
        return pooled_s.sum() * 0
    d_s, d_t = _normalised_distances(pooled_s.flatten(1)), _normalised_distances(pooled_t.flatten(1))
    return F.smooth_l1_loss(d_s, d_t, reduction="sum", beta=1.0) / (k * k - k)


def relation_loss(pooled_s: torch.Tensor, pooled_t: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The per-image form: :func:`relation_loss_batch` on each image's GIs, averaged over
    the images with at least 3."""
    image = torch.arange(valid.shape[0], device=valid.device)[:, None].expand(valid.shape)[valid]
    per_image = [relation_loss_batch(pooled_s[image == i], pooled_t[image == i])
                 for i in range(valid.shape[0]) if int(valid[i].sum()) >= 3]     # loop over images only
    return torch.stack(per_image).mean() if per_image else pooled_s.sum() * 0


# ------------------------------------------------------------------------ response path
def box_iou_batched(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of P boxes against each image's K boxes: (P x 4, N x K x 4) -> N x P x K."""
    lt = torch.maximum(a[None, :, None, :2], b[:, None, :, :2])
    rb = torch.minimum(a[None, :, None, 2:], b[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_a[None, :, None] + area_b[:, None, :] - inter).clamp(min=1e-6)


def anchor_mask(anchors: torch.Tensor, gi_boxes: torch.Tensor, valid: torch.Tensor,
                pos_iou: float = 0.5, low_quality: bool = True, min_pos_iou: float = 0.0) -> torch.Tensor:
    """N x P: anchors the detector's assigner would make positive for the GI boxes: IoU
    at least ``pos_iou`` with some GI, and with ``low_quality`` every anchor whose IoU
    with a GI equals that GI's best (ties included) when the best is at least
    ``min_pos_iou`` (detectron2's ``allow_low_quality_matches``, mmdet's
    ``match_low_quality``)."""
    iou = box_iou_batched(anchors, gi_boxes).masked_fill(~valid[:, None, :], -1)     # N x P x K
    mask = (iou >= pos_iou).any(dim=-1)
    if low_quality:
        best = iou.amax(dim=1, keepdim=True)                                           # N x 1 x K
        low = (iou == best) & valid[:, None, :] & (best >= min_pos_iou)
        mask = mask | low.any(dim=-1)
    return mask


def point_mask(points: torch.Tensor, gi_boxes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """N x P: points (P x 2) inside some GI box (FCOS's assignment region)."""
    x, y = points[None, :, None, 0], points[None, :, None, 1]
    b = gi_boxes[:, None]
    inside = (x > b[..., 0]) & (x < b[..., 2]) & (y > b[..., 1]) & (y < b[..., 3]) & valid[:, None, :]
    return inside.any(dim=-1)


def response_losses(cls_s: torch.Tensor, cls_t: torch.Tensor, reg_s: torch.Tensor, reg_t: torch.Tensor,
                    mask: torch.Tensor, reg_beta: float = 0.1) -> dict[str, torch.Tensor]:
    """Classification (soft-target BCE) and regression (smooth L1 with ``reg_beta``) on the
    masked predictions, each summed and divided by the number of masked predictions.

    cls_*: N x P x C logits; reg_*: N x P x R regressions; mask: N x P.
    """
    m = mask.sum().clamp(min=1)
    bce = F.binary_cross_entropy_with_logits(cls_s[mask], cls_t[mask].sigmoid(), reduction="sum")
    reg = F.smooth_l1_loss(reg_s[mask], reg_t[mask], reduction="sum", beta=reg_beta)
    return {"cls": bce / m, "reg": reg / m}


# ------------------------------------------------------------------------------ module
class GID(Distiller):
    """GID on a detector's FPN features and dense-head (or RPN) outputs."""

    needs_head_outputs = True

    def __init__(self, params: dict[str, Any], student: ModelInfo, teacher: ModelInfo) -> None:
        super().__init__(params, student, teacher)
        if student.head_layout != teacher.head_layout:
            raise ValueError(f"GID compares teacher and student predictions one to one, which needs the same "
                             f"head and prior (anchor) layout: teacher {teacher.head_layout}, "
                             f"student {student.head_layout}")
        self.adapters = nn.ModuleList(adapter(cs, ct) for cs, ct in zip(student.channels, teacher.channels))

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        p = self.params
        hs, ht = batch.student_head, batch.teacher_head
        scores = gi_scores(ht.cls, hs.cls, p["score"])
        boxes, valid, _ = select_general_instances(
            scores.detach(), ht.boxes.detach(), hs.boxes.detach(), ht.cls.detach().amax(-1),
            hs.cls.detach().amax(-1), top_n=p["top_n"], min_size=p["min_size"], nms_iou=p["nms_iou"], k=p["k"],
            img_hw=batch.img_hw)
        strides = self.teacher_info.strides
        feats_s = [a(f) for a, f in zip(self.adapters, batch.student_feats)]
        pooled_s = pool_instances(feats_s, strides, boxes, valid, p["roi_size"], rule="detectron2")
        pooled_t = pool_instances(batch.teacher_feats, strides, boxes, valid, p["roi_size"], rule="detectron2")
        if hs.points_only:
            mask = point_mask(hs.priors, boxes, valid)
        else:
            mask = anchor_mask(hs.priors, boxes, valid, hs.pos_iou, hs.low_quality, hs.min_pos_iou)
        resp = response_losses(hs.cls, ht.cls, hs.reg, ht.reg, mask, p["reg_beta"])
        relation = (relation_loss_batch(pooled_s, pooled_t) if p["relation"] == "batch"
                    else relation_loss(pooled_s, pooled_t, valid))
        return {
            "loss_gid_feat": p["w_feat"] * feature_loss(pooled_s, pooled_t),
            "loss_gid_rel": p["w_rel"] * relation,
            "loss_gid_cls": p["w_cls"] * resp["cls"],
            "loss_gid_reg": p["w_reg"] * resp["reg"],
        }
