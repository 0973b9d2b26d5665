"""SSLD: Simple Semi-supervised Label Distillation (classification), and Hinton KD.

Cui, C. et al. "Beyond Self-Supervision: A Simple Yet Effective Network Distillation
Alternative to Improve Backbones" (arXiv:2103.05959); PaddleClas' SSLD recipe.

- The student matches the teacher only: no hard labels, no label smoothing.
- Loss ("JS divergence" in the recipe, implemented as a symmetric KL),
  ``L = 1/2 [KL(p_t || p_s) + KL(p_s || p_t)]``, T = 1, averaged over the batch.
- Unlabeled images can be added since no label is used; PaddleClas mined them by
  labelling with the teacher and keeping the top-k most confident images per class
  (:func:`mine_confident`).

Hinton, G. et al. "Distilling the Knowledge in a Neural Network" (2015): the
classification baseline, ``CE(z_s, y) + w T^2 KL(softmax(z_t / T) || softmax(z_s / T))``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor, temp: float = 1.0) -> torch.Tensor:
    """``KL(softmax(p / T) || softmax(q / T))`` per sample (N)."""
    logp, logq = F.log_softmax(p_logits / temp, dim=1), F.log_softmax(q_logits / temp, dim=1)
    return (logp.exp() * (logp - logq)).sum(dim=1)


def ssld_loss(logits_s: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
    """Symmetric KL between student and teacher, averaged over the batch (no labels)."""
    return 0.5 * (kl(logits_t, logits_s) + kl(logits_s, logits_t)).mean()


def hinton_kd_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, labels: torch.Tensor, temp: float = 4.0,
                   weight: float = 1.0) -> dict[str, torch.Tensor]:
    """Hinton KD: the CE on labels and ``weight * T^2 * KL`` at temperature T."""
    return {"ce": F.cross_entropy(logits_s, labels), "kd": weight * temp ** 2 * kl(logits_t, logits_s, temp).mean()}


def mine_confident(probs: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the top-``k`` most confident images per predicted class.

    probs: M x C teacher probabilities of unlabeled images. Each image counts for the
    class it is predicted as; at most k per class are kept, most confident first.
    """
    conf, cls = probs.max(dim=1)
    order = torch.argsort(conf, descending=True)
    order = order[torch.sort(cls[order], stable=True).indices]           # by class, confident first
    sorted_cls = cls[order]
    counts = torch.bincount(sorted_cls, minlength=probs.shape[1])
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(order), device=probs.device) - starts[sorted_cls]
    return order[rank < k]


# ------------------------------------------------------------------------------ modules
from typing import Any  # noqa: E402

from ._base import Distiller  # noqa: E402


class SSLD(Distiller):
    """SSLD: symmetric KL to the teacher on every image, labelled or not; no label is
    read. Unlabeled data, top-k mining and the fine-tune stage are run by the harness
    from this method's parameters (``unlabeled``, ``mine_topk``, ``finetune_epochs``)."""


    def teacher_batch_statistics(self) -> bool:
        """``teacher_mode: train``: the teacher's BN layers use each batch's statistics, as
        PaddleClas' distillation runs its teacher (in train mode, deliberately)."""
        return self.params.get("teacher_mode", "eval") == "train"

    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        return {"loss_ssld": self.params["weight"] * ssld_loss(batch.student_logits, batch.teacher_logits)}


class HintonKD(Distiller):
    """Hinton KD: CE on the labelled images plus ``weight T^2 KL`` to the teacher."""


    def forward(self, batch: Any) -> dict[str, torch.Tensor]:
        labelled = batch.labels >= 0
        out = hinton_kd_loss(batch.student_logits[labelled], batch.teacher_logits[labelled],
                             batch.labels[labelled], self.params["temp"], self.params["weight"])
        return {"loss_ce": out["ce"], "loss_kd": out["kd"]}
