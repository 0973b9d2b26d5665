"""ICSD with adaptive loss weighting (AICSD) for semantic segmentation.

Mansourian, A. et al. "AICSD: Adaptive Inter-Class Similarity Distillation for Semantic
Segmentation", 2023 (arXiv:2308.04243); released code github.com/AmirMansurian/AICSD.

- Eq. 1, intra-class distribution: for each class channel c of the logits (B x C x H x W,
  at the input resolution), ``P_c = softmax over all H*W positions of z_c / T``.
- Eq. 2, inter-class similarity ``ICS(i, j) = KL(P_i || P_j)``: a C x C matrix per image,
  for teacher and student, each row L2-normalised.
- Eq. 3, ``L_ICSD = mean((ICS_s - ICS_t)^2)``, averaged over the batch.
- Eq. 4, pixel-wise KD ``L_KD = mean over pixels of KL(softmax_C(z_t) || softmax_C(z_s))``.
- Eq. 5-6, adaptive loss weighting: ``alpha = epoch / max_epochs``,
  ``L = alpha (L_CE + l_ICSD L_ICSD) + (1 - alpha) l_KD L_KD``.

The released code (AmirMansurian/AICSD, ``distiller.py``, ``Distiller.forward``) differs;
``variant="released"`` (the default: the published numbers came from it) reproduces it:

- ICSD (``lo_loss``): the softmax runs over H only (dim 2 of B x C x H x W); the "KL" is
  ``KLDivLoss('batchmean')`` given probabilities as its input,
  ``sum P_j (log P_j - P_i) / B`` over the whole batch (one matrix per batch); only
  i <= j is computed and mirrored; rows L2-normalised; the loss is
  ``mean((ICS_s - ICS_t)^2) / B``;
- pixel KD (``pi_loss``): ``KLDivLoss()(log_softmax(z_s), softmax(z_t))`` with PyTorch's
  default reduction ``mean``, i.e. divided by B*C*H*W, void pixels included. The
  weight 10 (``--pi_lambda 10``) was tuned for that scale; the paper's form (summed
  over classes, averaged over labelled pixels) is C times larger.

The class count is the logits' channel count, i.e. the dataset's. The README's commands
name ``--pa_lambda 9500`` for ICSD, but ``distiller.py`` computes ICSD under
``lo_lambda`` (``pa_lambda`` weighs a pairwise-similarity term); 9500 is taken as
ICSD's weight. ALW is a commented-out block of ``train_kd.py``:
``alpha = epoch / 120; loss = alpha (L_seg + L_ICSD) + (1 - alpha) L_KD`` (120 = its
epochs), i.e. ``alpha = epoch / max_epochs`` here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def intra_class_distributions(logits: torch.Tensor, temp: float = 1.0) -> torch.Tensor:
    """B x C x HW: each class channel's softmax over all positions (Eq. 1)."""
    b, c = logits.shape[:2]
    return F.softmax(logits.reshape(b, c, -1) / temp, dim=2)


def ics_matrix(logits: torch.Tensor, temp: float = 1.0, eps: float = 1e-12) -> torch.Tensor:
    """B x C x C inter-class KL similarity, rows L2-normalised (Eq. 2)."""
    p = intra_class_distributions(logits, temp)
    logp = torch.log(p.clamp(min=eps))
    # KL(P_i || P_j) = sum_x P_i log P_i - sum_x P_i log P_j
    kl = (p * logp).sum(dim=2, keepdim=True) - torch.bmm(p, logp.transpose(1, 2))
    return F.normalize(kl, p=2, dim=2)


def ics_matrix_released(logits: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """C x C matrix of the released code: softmax over H, ``KLDivLoss('batchmean')`` on
    probabilities, i <= j mirrored, rows L2-normalised."""
    b, c = logits.shape[:2]
    p = F.softmax(logits, dim=2)                                  # over H only
    flat = p.transpose(0, 1).reshape(c, -1)                       # C x (B*H*W)
    logp = torch.log(flat.clamp(min=eps))
    # m[i, j] = sum P_j (log P_j - P_i) / B   (input P_i, target P_j)
    m = ((flat * logp).sum(dim=1)[None, :] - flat @ flat.t()) / b
    upper = torch.triu(m)                                         # computed for i <= j
    sym = upper + upper.t() - torch.diag(torch.diagonal(m))
    return F.normalize(sym, p=2, dim=1)


def icsd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, variant: str = "paper",
              temp: float = 1.0) -> torch.Tensor:
    """``L_ICSD`` (Eq. 3), or the released code's version."""
    if variant == "paper":
        return ((ics_matrix(logits_s, temp) - ics_matrix(logits_t, temp)) ** 2).mean()
    if variant == "released":
        return ((ics_matrix_released(logits_s) - ics_matrix_released(logits_t)) ** 2).mean() / logits_s.shape[0]
    raise ValueError(f"ICSD variant '{variant}' is not one of: paper, released")


def pixel_kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, temp: float = 1.0,
                  ignore: torch.Tensor | None = None, variant: str = "released") -> torch.Tensor:
    """``KL(softmax_C(z_t / T) || softmax_C(z_s / T))`` (Eq. 4).

    ``variant="released"``: the KL's elementwise terms averaged over B*C*H*W, every pixel
    (the released ``KLDivLoss()`` with reduction ``mean``); ``"paper"``: summed over
    classes and averaged over pixels, ``ignore`` (B x H x W, True where the label is
    void) leaving those out.
    """
    terms = F.softmax(logits_t / temp, dim=1) * (F.log_softmax(logits_t / temp, dim=1)
                                                 - F.log_softmax(logits_s / temp, dim=1))
    if variant == "released":
        return terms.mean()
    if variant != "paper":
        raise ValueError(f"pixel KD variant '{variant}' is not one of: paper, released")
    kl = terms.sum(dim=1)
    if ignore is not None:
        keep = ~ignore
        return kl[keep].sum() / keep.sum().clamp(min=1)
    return kl.mean()


def alw_weights(epoch: int, max_epochs: int) -> tuple[float, float]:
    """(weight of CE + ICSD, weight of pixel KD) at an epoch (from 0): ``alpha, 1 - alpha``."""
    alpha = min(1.0, max(0.0, epoch / max(1, max_epochs)))
    return alpha, 1.0 - alpha


# ------------------------------------------------------------------------------ modules
from typing import Any  # noqa: E402

from ._base import Distiller  # noqa: E402


class ICSD(Distiller):
    """AICSD: ``alpha (L_CE + l_ICSD L_ICSD) + (1 - alpha) l_KD L_KD`` with
    ``alpha = epoch / max_epochs`` when ``alw`` (else alpha = 1 and both terms count)."""


    def _weights(self) -> tuple[float, float]:
        return alw_weights(self.epoch, self.max_epochs) if self.params["alw"] else (1.0, 1.0)

    def student_loss_weight(self) -> float:
        """The factor on the student's own (cross-entropy) losses."""
        return self._weights()[0]

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        p = self.params
        a, b = self._weights()
        ignore = batch.labels == 255
        return {"loss_icsd": a * p["w_icsd"] * icsd_loss(batch.student_logits, batch.teacher_logits,
                                                         p["variant"], p["temp"]),
                "loss_pixel_kd": b * p["w_kd"] * pixel_kd_loss(batch.student_logits, batch.teacher_logits,
                                                               ignore=ignore, variant=p["variant"])}


class PixelKD(Distiller):
    """Pixel-wise KD baseline, added to the student's own losses (``variant`` as in
    :func:`pixel_kd_loss`; the default weight 10 is the released ``pi_lambda``)."""


    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        return {"loss_pixel_kd": self.params["weight"] * pixel_kd_loss(
            batch.student_logits, batch.teacher_logits, self.params["temp"], ignore=batch.labels == 255,
            variant=self.params["variant"])}
