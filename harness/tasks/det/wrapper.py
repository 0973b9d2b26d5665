"""The model one trial trains: a student, a frozen teacher and a distiller's parts.

:class:`DistillationModel` is an mmengine ``BaseModel``, so the stock ``Runner``,
optimiser wrappers and evaluation loops drive it unchanged:

- ``loss`` runs the student's own ``loss`` (its neck output is captured by a forward
  hook, so the features the distiller sees are exactly the ones the student's head
  used), the teacher on the identical preprocessed batch without autograd, and adds the
  distiller's ``loss_*`` terms to the student's;
- ``predict`` is the student's, so evaluation measures the student alone;
- the teacher is frozen by :class:`~harness.tasks.teacher_student.TeacherStudentModel`, and
  ``init_weights`` never touches it;
- with ``inherit`` (FGD's inheriting strategy) the student's neck and head are copied
  from the teacher inside ``init_weights``, after the student's own initialisation:
  mmengine's ``Runner.train()`` calls ``init_weights()``, which would otherwise overwrite
  a copy made when the model was built (FGD's README warns of this for mmdet >= 2.12);
- ``student_state_dict`` is the export: the student alone, loadable into a plain
  detector built from the same config.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from methods._base import DetBatch, Distiller, RoIBatch

from .dense import dense_head, head_outputs
from harness.tasks.teacher_student import TeacherStudentModel


def inherit_neck_and_head(student: nn.Module, teacher: nn.Module) -> None:
    """FGD's inheriting strategy: every weight outside the backbone (neck, heads) is
    copied from the teacher into the student. yzd-v/FGD (``detection_distiller.py``,
    ``init_student``) loads all non-``backbone.`` keys of the teacher's checkpoint with a
    non-strict load that skips mismatched shapes silently; here a mismatch is an error."""
    source, target = teacher.state_dict(), student.state_dict()
    keys = [k for k in target if not k.startswith(("backbone.", "data_preprocessor."))]
    bad = [k for k in keys if k not in source or source[k].shape != target[k].shape]
    if bad:
        raise ValueError(f"'inherit' needs the student's neck and head to have the teacher's shapes (set "
                         f"inherit: false for this pair); these differ: {bad[:4]}{'...' if len(bad) > 4 else ''}")
    student.load_state_dict({k: source[k] for k in keys}, strict=False)


class DistillationModel(TeacherStudentModel):
    """Student + frozen teacher + distiller (any of the last two may be absent)."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None,
                 distiller: Distiller | None = None, num_levels: int | None = None,
                 inherit: bool = False) -> None:
        super().__init__(student, teacher, distiller, student.data_preprocessor)
        self.num_levels = num_levels
        self.inherit = inherit
        if inherit:
            if teacher is None:
                raise ValueError("'inherit' copies the teacher's neck and head: it needs a teacher")
            inherit_neck_and_head(student, teacher)     # shapes checked now; redone in init_weights
        self._captured: dict[str, Any] = {}
        self._needs_head = bool(getattr(distiller, "needs_head_outputs", False))
        if distiller is not None:
            student.neck.register_forward_hook(self._capture("feats"))
            if self._needs_head:
                dense_head(student).register_forward_hook(self._capture("head"))
            if getattr(distiller, "needs_rois", False) and getattr(student, "with_roi_head", False):
                self._capture_rois(student.roi_head)

    def _capture_rois(self, roi_head: nn.Module) -> None:
        """Keep the sampling results and class logits of the student's RoI head (mmdet's
        ``bbox_loss`` is a method, not a module, so it is wrapped on the instance)."""
        original = roi_head.bbox_loss

        def bbox_loss(x: Any, sampling_results: Any) -> Any:
            out = original(x, sampling_results)
            self._captured["rois"] = (sampling_results, out["cls_score"])
            return out
        roi_head.bbox_loss = bbox_loss

    def _capture(self, key: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._captured[key] = output
        return hook

    def init_weights(self) -> None:
        """Initialise the student only (its pretrained backbone is loaded here), then,
        with ``inherit``, copy the teacher's neck and head into it; the teacher keeps its
        loaded weights and the distiller's parts were initialised when built."""
        self.student.init_weights()
        if self.inherit:
            inherit_neck_and_head(self.student, self.teacher)

    def forward(self, inputs: torch.Tensor, data_samples: Any = None, mode: str = "tensor") -> Any:
        if mode == "loss":
            return self.loss(inputs, data_samples)
        if mode == "predict":
            return self.student.predict(inputs, data_samples)
        if mode == "tensor":
            return self.student._forward(inputs, data_samples)
        raise ValueError(f"invalid mode '{mode}': expected loss, predict or tensor")

    def loss(self, inputs: torch.Tensor, data_samples: Any) -> dict[str, torch.Tensor]:
        self._captured = {}
        losses = self.student.loss(inputs, data_samples)
        if self.distiller is None:
            return losses
        captured, self._captured = self._captured, {}
        with torch.no_grad():
            teacher_all = self.teacher.extract_feat(inputs)
            teacher_raw = dense_head(self.teacher)(teacher_all) if self._needs_head else None
        student_feats, teacher_feats = list(captured["feats"]), list(teacher_all)
        k = self.num_levels or len(student_feats)
        batch = DetBatch.from_data_samples(student_feats[:k], teacher_feats[:k], data_samples)
        if self._needs_head:
            batch.student_head = head_outputs(self.student, captured["head"])
            batch.teacher_head = head_outputs(self.teacher, teacher_raw)
        if "rois" in captured:
            batch.rois = self._roi_batch(*captured["rois"], teacher_all)
        return self.with_distillation(losses, batch)

    def _roi_batch(self, sampling_results: Any, cls_score: torch.Tensor, teacher_feats: Any) -> RoIBatch:
        """Positive RoIs padded per image, their student logits, and the teacher's RoI
        head (its last stage for a cascade) run on the same RoIs."""
        from mmdet.structures.bbox import bbox2roi

        n = len(sampling_results)
        pos = [len(r.pos_priors) for r in sampling_results]
        r_max = max(pos + [1])
        device = cls_score.device
        boxes = torch.zeros(n, r_max, 4, device=device)
        labels = torch.zeros(n, r_max, dtype=torch.long, device=device)
        valid = torch.zeros(n, r_max, dtype=torch.bool, device=device)
        rows = []
        start = 0
        for i, r in enumerate(sampling_results):          # gathering, not a loss loop
            boxes[i, :pos[i]] = r.pos_priors.detach()
            labels[i, :pos[i]] = r.pos_gt_labels
            valid[i, :pos[i]] = True
            rows.append(torch.arange(start, start + pos[i], device=device))   # positives come first
            start += len(r.priors)
        student_logits = cls_score[torch.cat(rows)]
        teacher_logits = None
        head = getattr(self.teacher, "roi_head", None)
        if head is not None:
            rois = bbox2roi([r.pos_priors.detach() for r in sampling_results])
            with torch.no_grad():
                out = (head._bbox_forward(head.num_stages - 1, teacher_feats, rois) if hasattr(head, "num_stages")
                       else head._bbox_forward(teacher_feats, rois))
            teacher_logits = out["cls_score"]
        return RoIBatch(boxes, valid, labels, student_logits, teacher_logits)

    @torch.no_grad()
    def prepare_epoch(self, loader: Any) -> None:
        """Before-epoch step of distillers that need one (PGM): hands them batches of the
        training data with both models' features, computed lazily, the student in eval
        mode so its BN statistics are not touched."""
        if type(self.distiller).before_epoch is Distiller.before_epoch:
            return                            # the default does nothing: no pass over the data
        before = self.distiller.before_epoch
        was_training = self.student.training
        self.student.eval()
        k = self.num_levels

        def batches() -> Any:
            for data in loader:
                data = self.data_preprocessor(data, False)
                fs = list(self.student.extract_feat(data["inputs"]))[:k]
                ft = list(self.teacher.extract_feat(data["inputs"]))[:k]
                yield DetBatch.from_data_samples(fs, ft, data["data_samples"])
        try:
            before(batches())
        finally:
            self.student.train(was_training)
