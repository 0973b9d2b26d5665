"""Global knowledge with prototypes: PGM + RDM.

Tang, S. et al. "Distilling Object Detectors With Global Knowledge", ECCV 2022
(arXiv:2210.09022). Knowledge is each instance's representation with respect to common
basis vectors (prototypes) of the two feature spaces; distillation is space alignment.

Prototype Generation Module (Sec. 3.2), before every epoch, per class and FPN level:

- candidates: descriptors (average-pooled box regions) of GT instances, teacher and
  student, L2-normalised;
- density filter ``rho_i = sum_j exp(-((1 - cos_ij) / 0.1)^2)``; candidates above the
  40th percentile of density in *both* spaces are kept (:func:`density_filter`);
- joint matching pursuit (:func:`joint_matching_pursuit`) picks M prototypes that share
  their index across the two spaces. For residuals ``r_a, r_b`` of every candidate and a
  candidate pair ``(p_a, p_b)`` the coefficients minimising
  ``||r_a - p_a w_a||^2 + ||r_b - p_b w_b||^2 + alpha (w_a - w_b)^2`` are
  ``w_a = (alpha (<p_a, r_a> + <p_b, r_b>) + <p_a, r_a>) / (1 + 2 alpha)`` (w_b
  symmetric); the pair with the lowest total cost over all candidates is picked, the
  residuals deflated, and the step repeated. Matching pursuit, not k-means.

Robust Distilling Module (Sec. 3.3):

- robustness weight per instance ``w = 1 - |q_s - q_t|`` with ``q = max cos(f, P)``
  over same-class prototypes, no gradient (:func:`robustness_weights`);
- global loss: smooth L1 between the instance's cosine similarities to all prototypes
  in the two spaces, weighted by ``w`` (:func:`global_alignment_loss`);
- local loss: feature imitation through a 3x3 adapter, foreground weighted by ``w``
  instead of a binary mask, ``sum w (a(F_s) - F_t)^2 / max(1, 2 sum w)``, plus a
  background term x4 normalised the same way (:func:`weighted_feature_loss`);
- per-RoI soft-label KD (T = 2, KL x 4) weighted by ``w`` for two-stage detectors
  (:func:`roi_soft_label_loss`);
- feature losses decay by ``1 - epoch / max_epochs``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------- PGM
def density(x: torch.Tensor, width: float = 0.1) -> torch.Tensor:
    """``rho_i = sum_j exp(-((1 - cos_ij) / width)^2)`` of L2-normalised rows (n x d)."""
    cos = x @ x.t()
    return torch.exp(-(((1 - cos) / width) ** 2)).sum(dim=1)


def density_filter(a: torch.Tensor, b: torch.Tensor, percentile: float = 40.0,
                   width: float = 0.1) -> torch.Tensor:
    """Boolean mask of the candidates dense enough in both spaces (above the percentile)."""
    da, db = density(a, width), density(b, width)
    qa = torch.quantile(da, percentile / 100.0)
    qb = torch.quantile(db, percentile / 100.0)
    return (da >= qa) & (db >= qb)


def pursuit_coefficients(ca: torch.Tensor, cb: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form coupled coefficients from the projections ``ca = <p_a, r_a>``, ``cb``."""
    wa = (alpha * (ca + cb) + ca) / (1 + 2 * alpha)
    wb = (alpha * (ca + cb) + cb) / (1 + 2 * alpha)
    return wa, wb


def joint_matching_pursuit(a: torch.Tensor, b: torch.Tensor, m: int = 10,
                           alpha: float = 10.0) -> torch.Tensor:
    """Indices of ``m`` prototypes chosen among the candidates (rows of a: n x d_a and
    b: n x d_b, L2-normalised, row i of both describing the same instance).

    Each step evaluates every unused candidate as the prototype pair for all residuals
    at once (n x n projections), so the cost is one matrix product per step.
    """
    n = a.shape[0]
    ra, rb = a.clone(), b.clone()
    used = torch.zeros(n, dtype=torch.bool, device=a.device)
    picks = []
    for _ in range(min(m, n)):                       # loop over prototypes, not instances
        ca, cb = a @ ra.t(), b @ rb.t()              # [j, i] = <p_j, r_i>
        wa, wb = pursuit_coefficients(ca, cb, alpha)
        # ||r - p w||^2 = ||r||^2 - 2 w <p, r> + w^2 (unit p)
        cost = ((ra * ra).sum(1)[None] - 2 * wa * ca + wa ** 2
                + (rb * rb).sum(1)[None] - 2 * wb * cb + wb ** 2 + alpha * (wa - wb) ** 2).sum(1)
        cost = cost.masked_fill(used, float("inf"))
        j = int(torch.argmin(cost))
        picks.append(j)
        used[j] = True
        ra = ra - wa[j][:, None] * a[j][None]
        rb = rb - wb[j][:, None] * b[j][None]
    return torch.tensor(picks, dtype=torch.long, device=a.device)


# --------------------------------------------------------------------------------- RDM
def robustness_weights(fs: torch.Tensor, ft: torch.Tensor, protos_s: torch.Tensor, protos_t: torch.Tensor,
                       proto_cls: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``w = 1 - |q_s - q_t|`` per instance, ``q`` the max cosine to same-class prototypes.

    fs: M x d_s, ft: M x d_t instance descriptors; protos_*: P x d prototypes with class
    ``proto_cls`` (P); labels: M. Instances of a class without prototypes get w = 0.
    """
    with torch.no_grad():
        cs = F.normalize(fs, dim=1) @ F.normalize(protos_s, dim=1).t()
        ct = F.normalize(ft, dim=1) @ F.normalize(protos_t, dim=1).t()
        same = labels[:, None] == proto_cls[None, :]
        qs = cs.masked_fill(~same, -2.0).amax(dim=1)
        qt = ct.masked_fill(~same, -2.0).amax(dim=1)
        w = 1 - (qs - qt).abs()
        return torch.where(same.any(dim=1), w, torch.zeros_like(w))


def global_alignment_loss(fs: torch.Tensor, ft: torch.Tensor, protos_s: torch.Tensor, protos_t: torch.Tensor,
                          weights: torch.Tensor) -> torch.Tensor:
    """Weighted smooth L1 between each instance's cosine-similarity vectors to all
    prototypes in the student and teacher spaces, averaged over instances."""
    if len(fs) == 0:
        return fs.sum() * 0
    cs = F.normalize(fs, dim=1) @ F.normalize(protos_s, dim=1).t()
    ct = F.normalize(ft, dim=1) @ F.normalize(protos_t, dim=1).t()
    per = F.smooth_l1_loss(cs, ct.detach(), reduction="none").sum(dim=1)
    return (weights * per).sum() / len(fs)


def weighted_feature_loss(fs: torch.Tensor, ft: torch.Tensor, fg: torch.Tensor,
                          bg_weight: float = 4.0) -> dict[str, torch.Tensor]:
    """Local feature imitation with a robustness-weighted foreground mask.

    fs: student map after the adapter, ft: teacher map (N x C x H x W); fg: N x H x W
    holding each cell's instance weight (0 off every instance). Background cells are
    those no instance covers. Each term is ``sum mask (fs - ft)^2 / max(1, 2 sum mask)``;
    the background term is multiplied by ``bg_weight``.
    """
    sq = ((fs - ft) ** 2).sum(dim=1)                             # N x H x W
    bg = (fg <= 0).to(sq.dtype)
    return {
        "fg": (fg * sq).sum() / (2 * fg.sum()).clamp(min=1.0),
        "bg": bg_weight * (bg * sq).sum() / (2 * bg.sum()).clamp(min=1.0),
    }


def instance_weight_mask(boxes: torch.Tensor, weights: torch.Tensor, img_hw: torch.Tensor, height: int,
                         width: int, stride: float) -> torch.Tensor:
    """N x H x W: the largest weight of the instances (N x B boxes in image pixels,
    weight 0 for padding) covering each cell of a map of the given stride."""
    xs = (torch.arange(width, device=boxes.device, dtype=boxes.dtype) + 0.5) * stride
    ys = (torch.arange(height, device=boxes.device, dtype=boxes.dtype) + 0.5) * stride
    in_x = (xs >= boxes[..., 0:1]) & (xs <= boxes[..., 2:3])                 # N x B x W
    in_y = (ys >= boxes[..., 1:2]) & (ys <= boxes[..., 3:4])                 # N x B x H
    cover = in_y[..., :, None] & in_x[..., None, :]
    vals = torch.where(cover, weights[..., None, None], torch.zeros((), device=boxes.device))
    return vals.amax(dim=1) if vals.shape[1] else boxes.new_zeros(boxes.shape[0], height, width)


def roi_soft_label_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, weights: torch.Tensor,
                        temp: float = 2.0, factor: float = 4.0) -> torch.Tensor:
    """Per-RoI ``factor * KL(softmax(z_t / T) || softmax(z_s / T))`` weighted by ``w``,
    averaged over RoIs."""
    if len(logits_s) == 0:
        return logits_s.sum() * 0
    kl = F.kl_div(F.log_softmax(logits_s / temp, dim=1), F.softmax(logits_t / temp, dim=1),
                  reduction="none").sum(dim=1)
    return factor * (weights * kl).sum() / len(logits_s)


def decay(epoch: int, max_epochs: int) -> float:
    """Feature-loss factor ``1 - epoch / max_epochs`` (epoch counted from 0)."""
    return max(0.0, 1.0 - epoch / max(1, max_epochs))


# ------------------------------------------------------------------------------ module
from typing import Any, Iterable  # noqa: E402

from torch import nn  # noqa: E402

from ._base import DetBatch, Distiller, ModelInfo, adapter  # noqa: E402
from .gid import pool_instances, roi_levels  # noqa: E402


def box_descriptors(feats: list[torch.Tensor], strides: list[int], boxes: torch.Tensor, valid: torch.Tensor,
                    level: int | None = None, size: int = 4) -> torch.Tensor:
    """Average-pooled box regions (M x C): on each box's own level by size (``level``
    None), or all on one level."""
    if level is None:
        return pool_instances(feats, strides, boxes, valid, size).mean(dim=(2, 3))
    one = [feats[level]]
    return pool_instances(one, [strides[level]], boxes, valid, size).mean(dim=(2, 3))


class GKP(Distiller):
    """PGM + RDM. The harness calls :meth:`before_epoch` with the current models and a
    sample of the training data before every epoch; the prototypes it picks are then
    used by every step of that epoch."""

    task = "det"
    needs_rois = True      # two-stage: positive sampled RoIs, their student and teacher logits

    def __init__(self, params: dict[str, Any], student: ModelInfo, teacher: ModelInfo) -> None:
        super().__init__(params, student, teacher)
        self.adapters = nn.ModuleList(adapter(cs, ct, kernel_size=3) for cs, ct in zip(student.channels,
                                                                                      teacher.channels))
        # per level: student prototypes, teacher prototypes, their classes (set by PGM)
        self.prototypes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    # ------------------------------------------------------------------------- PGM
    @torch.no_grad()
    def before_epoch(self, batches: Iterable[DetBatch]) -> None:
        """Pick prototypes per class and level from the GT instances of ``batches``
        (each with both models' features), consumed lazily until the sample is large
        enough."""
        p = self.params
        strides = self.teacher_info.strides
        per_level: list[dict[int, list[tuple[torch.Tensor, torch.Tensor]]]] = [{} for _ in strides]
        images: dict[int, int] = {}
        seen = 0
        for batch in batches:
            wh = batch.boxes[..., 2:] - batch.boxes[..., :2]
            valid = batch.box_valid & ((wh[..., 0] * wh[..., 1]).clamp(min=0).sqrt() > p["pgm_min_box"])
            if not valid.any():
                continue
            fs, ft = batch.student_feats, batch.teacher_feats
            labels = batch.labels[valid]
            for lvl in range(len(strides)):
                ds = box_descriptors(fs, self.student_info.strides, batch.boxes, valid, lvl)
                dt = box_descriptors(ft, strides, batch.boxes, valid, lvl)
                for c in labels.unique().tolist():
                    sel = labels == c
                    per_level[lvl].setdefault(c, []).append((ds[sel], dt[sel]))
            for c in labels.unique().tolist():
                images[c] = images.get(c, 0) + int((batch.labels == c).any(dim=1).sum())
            seen += len(batch.boxes)
            if seen >= p["pgm_max_images"] or (images and min(images.values()) >= p["pgm_images_per_class"]):
                break
        prototypes = []
        for lvl in range(len(strides)):
            ps, pt, pc = [], [], []
            for c, parts in sorted(per_level[lvl].items()):
                a = F.normalize(torch.cat([x for x, _ in parts]), dim=1)
                b = F.normalize(torch.cat([y for _, y in parts]), dim=1)
                if len(a) >= 5:
                    keep = density_filter(a, b, p["pgm_percentile"])
                    a, b = a[keep], b[keep]
                idx = joint_matching_pursuit(a, b, m=p["prototypes"], alpha=p["pursuit_alpha"])
                ps.append(a[idx])
                pt.append(b[idx])
                pc.append(torch.full((len(idx),), c, dtype=torch.long, device=a.device))
            if ps:
                prototypes.append((torch.cat(ps), torch.cat(pt), torch.cat(pc)))
            else:
                prototypes.append((torch.zeros(0, self.student_info.channels[lvl], device=batch.boxes.device),
                                   torch.zeros(0, self.teacher_info.channels[lvl], device=batch.boxes.device),
                                   torch.zeros(0, dtype=torch.long, device=batch.boxes.device)))
        self.prototypes = prototypes

    # ------------------------------------------------------------------------- RDM
    def _instances(self, batch: DetBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Boxes N x B x 4, validity and labels: positive RoIs (two-stage) or GT boxes."""
        if batch.rois is not None:
            return batch.rois.boxes, batch.rois.valid, batch.rois.labels
        return batch.boxes, batch.box_valid, batch.labels

    def forward(self, batch: DetBatch) -> dict[str, torch.Tensor]:
        p = self.params
        strides = self.teacher_info.strides
        boxes, valid, labels = self._instances(batch)
        flat_labels = labels[valid]
        levels = roi_levels(boxes[valid], len(strides))
        weights = torch.zeros(len(flat_labels), device=boxes.device)
        glob = batch.student_feats[0].sum() * 0
        if self.prototypes is not None and len(flat_labels):
            ds = box_descriptors(batch.student_feats, self.student_info.strides, boxes, valid)
            dt = box_descriptors(batch.teacher_feats, strides, boxes, valid)
            for lvl, (ps, pt, pc) in enumerate(self.prototypes):     # loop over levels only
                on = levels == lvl
                if not on.any() or len(pc) == 0:
                    continue
                weights[on] = robustness_weights(ds[on], dt[on], ps, pt, pc, flat_labels[on])
                if p["global_loss"]:
                    glob = glob + global_alignment_loss(ds[on], dt[on], ps, pt, weights[on]) * on.sum() / len(on)
        w_full = torch.zeros(valid.shape, device=boxes.device)
        w_full[valid] = weights
        fg_total, bg_total = 0.0, 0.0
        for lvl, (fs, ft) in enumerate(zip(batch.student_feats, batch.teacher_feats)):
            fg = instance_weight_mask(boxes, w_full, batch.img_hw, ft.shape[2], ft.shape[3], strides[lvl])
            local = weighted_feature_loss(self.adapters[lvl](fs), ft, fg, p["bg_weight"])
            fg_total, bg_total = fg_total + local["fg"], bg_total + local["bg"]
        fade = decay(self.epoch, self.max_epochs)
        out = {"loss_gkp_fg": fade * p["w_local"] * fg_total, "loss_gkp_bg": fade * p["w_local"] * bg_total,
               "loss_gkp_global": fade * p["w_global"] * glob}
        if batch.rois is not None and batch.rois.student_logits is not None:
            out["loss_gkp_roi_kd"] = p["w_roi_kd"] * roi_soft_label_loss(
                batch.rois.student_logits, batch.rois.teacher_logits, weights, p["kd_temp"], p["kd_factor"])
        return out
