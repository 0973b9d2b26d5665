"""Global knowledge with prototypes: PGM + RDM.

Tang, S. et al. "Distilling Object Detectors With Global Knowledge", ECCV 2022
(arXiv:2210.09022). Knowledge is each instance's representation with respect to common
basis vectors (prototypes) of the two feature spaces; distillation is space alignment.

Prototype Generation Module (Sec. 3.2), before every epoch, per class and FPN level:

- candidates: descriptors (average-pooled box regions) of GT instances, teacher and
  student, L2-normalised;
- density filter ``rho_i = sum_j exp(-((1 - cos_ij) / 0.1)^2)``; candidates strictly
  above the ``int(0.4 n)``-th smallest density in *both* spaces are kept
  (:func:`density_filter`, as released);
- joint matching pursuit (:func:`joint_matching_pursuit`) picks M prototypes that share
  their index across the two spaces, among the kept candidates, against the residuals
  of every instance, a candidate possibly more than once (as released). For residuals
  ``r_a, r_b`` of every instance and a
  candidate pair ``(p_a, p_b)`` the coefficients minimising
  ``||r_a - p_a w_a||^2 + ||r_b - p_b w_b||^2 + alpha (w_a - w_b)^2`` are
  ``w_a = (alpha (<p_a, r_a> + <p_b, r_b>) + <p_a, r_a>) / (1 + 2 alpha)`` (w_b
  symmetric); the pair with the lowest total cost over all instances is picked, the
  residuals deflated, and the step repeated. Matching pursuit, not k-means.

Robust Distilling Module (Sec. 3.3), as the released code computes it
(hikvision-research/DAVAR-Lab-ML, ``ECCV22_Distilling_Object_Detectors_with_Global_Knowledge``,
``third_party/kd/mmdet/strategy/kd_{one,two}_stage_strategy.py`` and
``models/losses/kd_loss.py``), on every FPN level l of the neck (P3-P7 one-stage, P2-P6
two-stage):

- instances: GT boxes (one-stage) or the student's positive sampled RoIs with their GT
  labels (two-stage, ``proposal_replace_gt``); descriptor on level l: the mean of the
  feature over the cells ``int(y1/s) .. int(y2/s)`` x ``int(x1/s) .. int(x2/s)``
  (inclusive, s the level's stride; :func:`crop_descriptors`);
- robustness weight on level l, ``w = 1 - |q_s - q_t|`` with ``q = max cos(f, P)`` over
  the level's same-class prototypes, no gradient (:func:`robustness_weights`);
- local loss on level l: foreground mask of the instances *mapped to level l*
  (``floor(log2(sqrt((w+1)(h+1)) / 56))``), cells ``int(x1/s) .. int(x2/s) - 1`` holding
  w (a later instance overwrites; a box within one cell keeps the larger weight),
  ``L_fg = sum M (a(F_s) - F_t)^2 / max(1, 2 C sum M)``, background the cells off the
  mask, ``x bg_weight`` (4), the same normalisation (:func:`instance_mask`,
  :func:`weighted_feature_loss`); summed over levels (one-stage) or averaged over the
  5 levels (two-stage);
- per-RoI soft-label KD (two-stage): ``T^2 mean_c KL(softmax(z_t/T) || softmax(z_s/T)) w``
  averaged over RoIs, T = 2, w from the RoI's 7x7 RoIAlign features on its RoI-head
  level (:func:`roi_soft_label_loss`);
- global alignment loss, off in the released configuration (``pair_wise='use_pgm'``),
  ``global_loss: released`` computes its ``use_r2i`` form: on every level, smooth L1
  between ``w cos(f_s, P)`` and ``w cos(f_t, P)`` over all instances x all the level's
  prototypes, averaged, x ``w_global`` (``pair_wise_factor``, 5 in the config);
  ``global_loss: paper`` the paper's reading (per instance on its own level, summed over
  prototypes, the weight outside the smooth L1);
- feature and global losses decay by ``1 - epoch / max_epochs``; the soft-label loss
  does not.

PGM here draws candidates from GT instances of a sample of the training data with the
current models (the released PGM is a separate step over confident detections); see
docs/fidelity.md.
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
    """Boolean mask of the candidates dense enough in both spaces, as the released PGM
    computes it: strictly above the ``int(n * percentile / 100)``-th smallest density
    (``sorted[int(0.4 n)]``, no interpolation) in each space."""
    da, db = density(a, width), density(b, width)
    middle = int(len(da) * percentile / 100.0)
    return (da > da.sort().values[middle]) & (db > db.sort().values[middle])


def pursuit_coefficients(ca: torch.Tensor, cb: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form coupled coefficients from the projections ``ca = <p_a, r_a>``, ``cb``."""
    wa = (alpha * (ca + cb) + ca) / (1 + 2 * alpha)
    wb = (alpha * (ca + cb) + cb) / (1 + 2 * alpha)
    return wa, wb


def joint_matching_pursuit(a: torch.Tensor, b: torch.Tensor, m: int = 10, alpha: float = 10.0,
                           candidates: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (rows of a: n x d_a and b: n x d_b, L2-normalised, row i of both describing
    the same instance) of ``m`` prototypes, as the released PGM picks them: the
    residuals are those of every instance, the prototypes are drawn from ``candidates``
    (a boolean mask, or all rows), and a candidate may be picked again (its residual
    contribution is deflated, not removed).

    Each step evaluates every candidate as the prototype pair for all residuals at once
    (k x n projections), so the cost is one matrix product per step.
    """
    pool = torch.arange(a.shape[0], device=a.device) if candidates is None else \
        torch.nonzero(candidates, as_tuple=False).flatten()
    if pool.numel() == 0:
        return pool
    pa, pb = a[pool], b[pool]
    ra, rb = a.clone(), b.clone()
    picks = []
    for _ in range(m):                               # loop over prototypes, not instances
        ca, cb = pa @ ra.t(), pb @ rb.t()            # [j, i] = <p_j, r_i>
        wa, wb = pursuit_coefficients(ca, cb, alpha)
        # ||r - p w||^2 = ||r||^2 - 2 w <p, r> + w^2 (unit p)
        cost = ((ra * ra).sum(1)[None] - 2 * wa * ca + wa ** 2
                + (rb * rb).sum(1)[None] - 2 * wb * cb + wb ** 2 + alpha * (wa - wb) ** 2).sum(1)
        j = int(torch.argmin(cost))
        picks.append(int(pool[j]))
        ra = ra - wa[j][:, None] * pa[j][None]
        rb = rb - wb[j][:, None] * pb[j][None]
    return torch.tensor(picks, dtype=torch.long, device=a.device)


# --------------------------------------------------------------------------------- RDM
def robustness_weights(fs: torch.Tensor, ft: torch.Tensor, protos_s: torch.Tensor, protos_t: torch.Tensor,
                       proto_cls: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``w = 1 - |q_s - q_t|`` per instance, ``q`` the max cosine to same-class prototypes.

    fs: M x d_s, ft: M x d_t instance descriptors; protos_*: P x d prototypes with class
    ``proto_cls`` (P); labels: M. Instances of a class without prototypes get w = 0, and so
    does every instance of a level that has none at all (PGM found no instance large
    enough there: a small dataset's fine levels).
    """
    if len(proto_cls) == 0:
        return fs.new_zeros(len(fs))
    with torch.no_grad():
        # prototypes are made before the epoch (full precision): compared in the descriptors' dtype
        cs = F.normalize(fs, dim=1) @ F.normalize(protos_s.to(fs), dim=1).t()
        ct = F.normalize(ft, dim=1) @ F.normalize(protos_t.to(ft), dim=1).t()
        same = labels[:, None] == proto_cls[None, :]
        qs = cs.masked_fill(~same, -2.0).amax(dim=1)
        qt = ct.masked_fill(~same, -2.0).amax(dim=1)
        w = 1 - (qs - qt).abs()
        return torch.where(same.any(dim=1), w, torch.zeros_like(w))


def global_alignment_loss(fs: torch.Tensor, ft: torch.Tensor, protos_s: torch.Tensor, protos_t: torch.Tensor,
                          weights: torch.Tensor) -> torch.Tensor:
    """The paper's reading: weighted smooth L1 between each instance's cosine-similarity
    vectors to all prototypes in the two spaces, summed over prototypes, averaged over
    instances."""
    if len(fs) == 0:
        return fs.sum() * 0
    cs = F.normalize(fs, dim=1) @ F.normalize(protos_s.to(fs), dim=1).t()
    ct = F.normalize(ft, dim=1) @ F.normalize(protos_t.to(ft), dim=1).t()
    per = F.smooth_l1_loss(cs, ct.detach(), reduction="none").sum(dim=1)
    return (weights * per).sum() / len(fs)


def global_alignment_loss_released(fs: torch.Tensor, ft: torch.Tensor, protos_s: torch.Tensor,
                                   protos_t: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The released ``r2i_om_loss``: ``mean smoothL1(w cos(f_s, P_s), w cos(f_t, P_t))`` over
    instances x prototypes (K x P), the weight inside."""
    if len(fs) == 0 or len(protos_s) == 0:
        return fs.sum() * 0
    cs = F.normalize(fs, dim=1) @ F.normalize(protos_s.to(fs), dim=1).t()
    ct = F.normalize(ft, dim=1) @ F.normalize(protos_t.to(ft), dim=1).t()
    return F.smooth_l1_loss(cs * weights[:, None], (ct * weights[:, None]).detach())


def released_levels(boxes: torch.Tensor, num_levels: int) -> torch.Tensor:
    """The strategy's ``_map_roi_levels``: ``floor(log2(sqrt((w+1)(h+1)) / 56 + 1e-6))``."""
    scale = ((boxes[..., 2] - boxes[..., 0] + 1) * (boxes[..., 3] - boxes[..., 1] + 1)).clamp(min=0).sqrt()
    return torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(0, num_levels - 1).long()


def crop_descriptors(feat: torch.Tensor, boxes: torch.Tensor, image: torch.Tensor, stride: float) -> torch.Tensor:
    """M x C: the mean of ``feat`` (N x C x H x W) over each box's cells
    ``int(|y1|/s) .. int(|y2|/s)`` x ``int(|x1|/s) .. int(|x2|/s)`` (inclusive, clipped to
    the map), boxes M x 4 in image pixels of images ``image`` (M). Computed from an
    integral image (float64), so the cost is O(M C) whatever the box sizes."""
    if len(boxes) == 0:
        return feat.new_zeros(0, feat.shape[1])
    n, c, h, w = feat.shape
    cell = torch.div(boxes.abs(), stride, rounding_mode="floor").long()
    x0, y0 = cell[:, 0].clamp(0, w - 1), cell[:, 1].clamp(0, h - 1)
    x1, y1 = (cell[:, 2] + 1).clamp(max=w), (cell[:, 3] + 1).clamp(max=h)
    x1, y1 = torch.maximum(x1, x0 + 1), torch.maximum(y1, y0 + 1)
    integral = F.pad(feat.double().cumsum(2).cumsum(3), (1, 0, 1, 0))          # N x C x (H+1) x (W+1)
    flat = integral.flatten(2)                                                  # N x C x (H+1)(W+1)
    per = integral.new_zeros(len(boxes), c)
    for sign, ys, xs in ((1, y1, x1), (-1, y0, x1), (-1, y1, x0), (1, y0, x0)):    # four corners, not a box loop
        per = per + sign * flat[image, :, ys * (w + 1) + xs]
    area = ((y1 - y0) * (x1 - x0)).to(per.dtype)[:, None]
    return (per / area).to(feat.dtype)


def instance_mask(boxes: torch.Tensor, on: torch.Tensor, weights: torch.Tensor, height: int, width: int,
                  stride: float) -> torch.Tensor:
    """N x H x W foreground mask of the released ``get_gt_mask``: for the instances ``on``
    (N x B), in their order, cells ``int(y1/s) .. int(y2/s) - 1`` x ``int(x1/s) ..
    int(x2/s) - 1`` are set to the instance's weight (N x B); a box within one row or
    column of cells sets only its first cell, to the larger of its weight and what is
    there. Done for all instances at once: a cell holds the weight of the last instance
    that set its block, or more if a one-cell box after it had a larger weight."""
    x0 = torch.div(boxes[..., 0], stride, rounding_mode="trunc").long().clamp(min=0)
    y0 = torch.div(boxes[..., 1], stride, rounding_mode="trunc").long().clamp(min=0)
    x1 = torch.div(boxes[..., 2], stride, rounding_mode="trunc").long().clamp(max=width)
    y1 = torch.div(boxes[..., 3], stride, rounding_mode="trunc").long().clamp(max=height)
    cols = torch.arange(width, device=boxes.device)
    rows = torch.arange(height, device=boxes.device)
    block = ((rows[:, None] >= y0[..., None, None]) & (rows[:, None] < y1[..., None, None])
             & (cols >= x0[..., None, None]) & (cols < x1[..., None, None]))     # N x B x H x W
    single = (x0 == x1) | (y0 == y1)
    point = (rows[:, None] == y0[..., None, None]) & (cols == x0[..., None, None])
    sets = block & (on & ~single)[..., None, None]
    maxes = point & (on & single)[..., None, None]
    order = torch.arange(boxes.shape[1], device=boxes.device)[None, :, None, None]
    last = torch.where(sets, order, -1).amax(dim=1, keepdim=True) if boxes.shape[1] else \
        torch.full((boxes.shape[0], 1, height, width), -1, device=boxes.device)   # N x 1 x H x W
    w = weights[..., None, None].expand_as(sets)            # the mask takes the weights' dtype and device
    base = torch.where(last >= 0, w.gather(1, last.clamp(min=0)), w.new_zeros(()))[:, 0]
    later = torch.where(maxes & (order > last), w, w.new_full((), float("-inf")))
    top = later.amax(dim=1) if boxes.shape[1] else base
    return torch.maximum(base, top)


def weighted_feature_loss(fs: torch.Tensor, ft: torch.Tensor, fg: torch.Tensor,
                          bg_weight: float = 4.0) -> dict[str, torch.Tensor]:
    """The released ``KDLoss`` ("decouple"): fs the student map after the adapter, ft the
    teacher's (N x C x H x W), fg the N x H x W mask of :func:`instance_mask`.
    ``fg = sum M (fs - ft)^2 / max(1, 2 C sum M)``; the background mask is
    ``1 - (M where M <= 0, else 1)``, its term normalised the same way, x ``bg_weight``."""
    c = fs.shape[1]
    sq = ((fs - ft) ** 2).sum(dim=1)                             # N x H x W, summed over channels
    bg = 1 - torch.where(fg > 0, torch.ones_like(fg), fg)
    return {
        "fg": (fg * sq).sum() / (2 * c * fg.sum()).clamp(min=1.0),
        "bg": bg_weight * (bg * sq).sum() / (2 * c * bg.sum()).clamp(min=1.0),
    }


def roi_soft_label_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, weights: torch.Tensor,
                        temp: float = 2.0) -> torch.Tensor:
    """The released ``knowledge_distillation_kl_div_loss``: per RoI
    ``T^2 * mean over the C+1 classes of KL terms`` times its weight, averaged over RoIs."""
    if len(logits_s) == 0:
        return logits_s.sum() * 0
    kl = F.kl_div(F.log_softmax(logits_s / temp, dim=1), F.softmax(logits_t / temp, dim=1),
                  reduction="none").mean(dim=1) * temp * temp
    return (kl * weights).mean()


def decay(epoch: int, max_epochs: int) -> float:
    """Feature-loss factor ``1 - epoch / max_epochs`` (epoch counted from 0)."""
    return max(0.0, 1.0 - epoch / max(1, max_epochs))


# ------------------------------------------------------------------------------ module
from typing import Any, Iterable  # noqa: E402

from torch import nn  # noqa: E402

from ._base import DetBatch, Distiller, ModelInfo, adapter  # noqa: E402
from .gid import pool_instances, roi_levels  # noqa: E402


def instance_descriptors(feats: list[torch.Tensor], strides: list[int], boxes: torch.Tensor,
                         valid: torch.Tensor, level: int) -> torch.Tensor:
    """M x C crop-mean descriptors (:func:`crop_descriptors`) of the valid boxes of
    N x B x 4 on one level."""
    image = torch.arange(boxes.shape[0], device=boxes.device)[:, None].expand(valid.shape)[valid]
    return crop_descriptors(feats[level], boxes[valid], image, strides[level])


class GKP(Distiller):
    """PGM + RDM. The harness calls :meth:`before_epoch` with the current models and a
    sample of the training data before every epoch; the prototypes it picks are then
    used by every step of that epoch."""

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
                ds = instance_descriptors(fs, self.student_info.strides, batch.boxes, valid, lvl)
                dt = instance_descriptors(ft, strides, batch.boxes, valid, lvl)
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
                # the released filter on any sample it is given; one so small that nothing is
                # strictly denser than its 40th percentile (the released code fails there) has
                # every instance as a candidate
                keep = density_filter(a, b, p["pgm_percentile"])
                idx = joint_matching_pursuit(a, b, m=p["prototypes"], alpha=p["pursuit_alpha"],
                                             candidates=keep if keep.any() else None)
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
        strides, s_strides = self.teacher_info.strides, self.student_info.strides
        boxes, valid, labels = self._instances(batch)
        flat_labels = labels[valid]
        num_levels = len(strides)
        mapped = released_levels(boxes, num_levels)                       # N x B
        glob = batch.student_feats[0].sum() * 0
        fg_total, bg_total = 0.0, 0.0
        for lvl, (fs, ft) in enumerate(zip(batch.student_feats, batch.teacher_feats)):   # loop over levels only
            weights = ft.new_ones(valid.shape)          # binary mask without prototypes (the features' dtype)
            protos = self.prototypes[lvl] if self.prototypes is not None else None
            if protos is not None and len(flat_labels):
                ps, pt, pc = protos
                ds = instance_descriptors(batch.student_feats, s_strides, boxes, valid, lvl)
                dt = instance_descriptors(batch.teacher_feats, strides, boxes, valid, lvl)
                w = robustness_weights(ds, dt, ps, pt, pc, flat_labels)
                weights = w.new_zeros(valid.shape)
                weights[valid] = w
                if p["global_loss"] == "released":
                    glob = glob + global_alignment_loss_released(ds, dt, ps, pt, w)
                elif p["global_loss"] == "paper" and len(pc):
                    own = mapped[valid] == lvl
                    glob = glob + global_alignment_loss(ds[own], dt[own], ps, pt, w[own]) * own.sum() / len(own)
            fg = instance_mask(boxes, valid & (mapped == lvl), weights, ft.shape[2], ft.shape[3], strides[lvl])
            local = weighted_feature_loss(self.adapters[lvl](fs), ft, fg, p["bg_weight"])
            fg_total, bg_total = fg_total + local["fg"], bg_total + local["bg"]
        if self.student_info.family == "two_stage":          # the two-stage strategy averages over levels
            fg_total, bg_total = fg_total / num_levels, bg_total / num_levels
        fade = decay(self.epoch, self.max_epochs)
        out = {"loss_gkp_fg": fade * p["w_local"] * fg_total, "loss_gkp_bg": fade * p["w_local"] * bg_total}
        if p["global_loss"] != "off":
            out["loss_gkp_global"] = fade * p["w_global"] * glob
        if batch.rois is not None and batch.rois.student_logits is not None:
            out["loss_gkp_roi_kd"] = p["w_roi_kd"] * roi_soft_label_loss(
                batch.rois.student_logits, batch.rois.teacher_logits, self._roi_weights(batch), p["kd_temp"])
        return out

    def _roi_weights(self, batch: DetBatch) -> torch.Tensor:
        """Robustness weight of each positive RoI for the soft-label loss: its 7x7 RoIAlign
        features (sampling ratio 0, the RoI head's) on its RoI-head level (mmdet's 56-px
        rule over P2-P5), averaged, against that level's prototypes."""
        rois = batch.rois
        labels = rois.labels[rois.valid]
        if self.prototypes is None or not len(labels):
            return rois.student_logits.new_ones(len(labels))
        k = len(self.student_info.strides) - 1                       # the RoI head reads P2-P5
        s_strides, t_strides = self.student_info.strides[:k], self.teacher_info.strides[:k]
        ds = pool_instances(batch.student_feats[:k], s_strides, rois.boxes, rois.valid, 7, sampling_ratio=0)
        dt = pool_instances(batch.teacher_feats[:k], t_strides, rois.boxes, rois.valid, 7, sampling_ratio=0)
        ds, dt = ds.mean(dim=(2, 3)), dt.mean(dim=(2, 3))
        levels = roi_levels(rois.boxes[rois.valid], k)
        weights = ds.new_zeros(len(labels))
        for lvl in range(k):                                          # loop over levels only
            on = levels == lvl
            ps, pt, pc = self.prototypes[lvl]
            if on.any() and len(pc):
                # (in the destination's dtype: under autocast the pooled features may be float32)
                weights[on] = robustness_weights(ds[on], dt[on], ps, pt, pc, labels[on]).to(weights.dtype)
        return weights
