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
