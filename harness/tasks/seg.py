"""Segmentation in the same engine: mmseg segmentors (any ``EncoderDecoder``), a
distillation model the Runner trains, and the trial's model build.

:class:`SegDistillationModel` runs the student's own ``loss`` (its decode head's input
features and output are captured on the way), the frozen teacher on the same batch, and
hands the distiller a :class:`methods._base.SegBatch`: both models' logits upsampled to
the input size and at the decode head's own resolution, the decode heads' input
features and the label map; the distiller may scale the student's own losses (ICSD's
adaptive loss weighting, :meth:`methods._base.Distiller.student_loss_weight`).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness import catalog
from harness.suite.zoo import resolve as resolve_config_path
from methods._base import SegBatch

from .configs import merge as _merge
from .pretrained import backbone_checkpoint
from .teacher_student import TeacherStudentModel


def _no_syncbn(node: Any) -> Any:
    """One process, one device: every SyncBN becomes BN."""
    if isinstance(node, dict):
        return {k: ("BN" if k == "type" and v == "SyncBN" else _no_syncbn(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_no_syncbn(v) for v in node]
    return node


def segmentor_cfg(model: dict[str, Any], num_classes: int, crop: list[int] | None) -> dict[str, Any]:
    """The mmseg model config for a suite model entry; the backbone starts from the
    checkpoint the config names (mmseg's model-level ``pretrained``) unless the suite
    says otherwise (:mod:`harness.tasks.pretrained`)."""
    from mmengine.config import Config

    arch = catalog.arch_of(model)
    cfg = _no_syncbn(Config.fromfile(str(resolve_config_path(arch["config"]))).model.to_dict())
    bundled = cfg["backbone"]
    cfg["backbone"] = _merge(bundled, model.get("backbone", {}))
    cfg["pretrained"] = backbone_checkpoint(model.get("name", model["arch"]), model.get("pretrained", True),
                                            cfg.get("pretrained") or (bundled.get("init_cfg") or {}).get("checkpoint"),
                                            bundled, cfg["backbone"])
    cfg["backbone"]["init_cfg"] = None               # mmseg puts `pretrained` there itself
    cfg["decode_head"] = _merge(cfg["decode_head"], model.get("head", {}))
    heads = [cfg["decode_head"]] + (cfg["auxiliary_head"] if isinstance(cfg.get("auxiliary_head"), list)
                                    else [cfg["auxiliary_head"]] if cfg.get("auxiliary_head") else [])
    for head in heads:
        head["num_classes"] = num_classes
    if crop:
        cfg["data_preprocessor"]["size"] = tuple(crop)
    else:
        cfg["data_preprocessor"].pop("size", None)
        cfg["data_preprocessor"]["size_divisor"] = 32
    return _merge(cfg, model.get("model", {}))


def build_segmentor(cfg: dict[str, Any]) -> nn.Module:
    """Build an mmseg segmentor in the mmseg registry scope."""
    from mmengine.config import ConfigDict
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope("mmseg"):
        return MODELS.build(ConfigDict(copy.deepcopy(cfg)))


def build_model(model: dict[str, Any], num_classes: int, schedule: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """A suite model entry built as a segmentor (the schedule's crop size applied), and
    its mmseg config."""
    cfg = segmentor_cfg(model, num_classes, schedule.get("crop_size"))
    return build_segmentor(cfg), cfg


def model_info(model: dict[str, Any], net: nn.Module, cfg: dict[str, Any], num_classes: int,
               all_levels: bool = False) -> Any:
    """:class:`methods._base.ModelInfo` of a segmentor: the channels and strides of the
    feature maps its decode head receives (the backbone's outputs, or the neck's), found
    by running ``extract_feat`` once on a blank 64 x 64 image (eval mode, no gradient:
    nothing is trained or counted), so any mmseg ``EncoderDecoder`` is described alike."""
    from methods._base import ModelInfo

    size = 64
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            feats = net.extract_feat(torch.zeros(1, 3, size, size))
    finally:
        net.train(was_training)
    feats = [feats] if torch.is_tensor(feats) else list(feats)
    return ModelInfo(arch=model["arch"], family=catalog.arch_of(model)["family"],
                     channels=[int(f.shape[1]) for f in feats], strides=[round(size / f.shape[2]) for f in feats],
                     task="seg", num_classes=num_classes)


class SegDistillationModel(TeacherStudentModel):
    """Student (+ frozen teacher + distiller) for segmentation, driven by the Runner."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, distiller: Any = None) -> None:
        super().__init__(student, teacher, distiller, student.data_preprocessor)
        self._logits: torch.Tensor | None = None
        self._feats: list[torch.Tensor] = []
        if distiller is not None:
            self._capture_logits(student.decode_head)

    def _capture_logits(self, head: nn.Module) -> None:
        """Keep the decode head's input features and output. mmseg's heads call
        ``self.forward`` directly in ``loss`` (module hooks do not fire), so ``forward``
        is wrapped on the instance."""
        original = head.forward

        def forward(inputs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
            self._feats = [inputs] if torch.is_tensor(inputs) else list(inputs)
            self._logits = original(inputs, *args, **kwargs)
            return self._logits
        head.forward = forward

    def init_weights(self) -> None:
        self.student.init_weights()

    def forward(self, inputs: torch.Tensor, data_samples: Any = None, mode: str = "tensor") -> Any:
        if mode == "predict":
            return self.student.predict(inputs, data_samples)
        if mode == "tensor":
            return self.student._forward(inputs, data_samples)
        if mode != "loss":
            raise ValueError(f"invalid mode '{mode}': expected loss, predict or tensor")
        losses = self.student.loss(inputs, data_samples)
        if self.distiller is None:
            return losses
        size = inputs.shape[2:]
        student_logits = F.interpolate(self._logits, size=size, mode="bilinear", align_corners=False)
        with torch.no_grad():
            t_feats = self.teacher.extract_feat(inputs)
            t = self.teacher.decode_head(t_feats)
            teacher_logits = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
        labels = torch.stack([ds.gt_sem_seg.data for ds in data_samples]).squeeze(1)
        batch = SegBatch(student_logits, teacher_logits, labels, student_head_logits=self._logits,
                         teacher_head_logits=t, student_feats=self._feats,
                         teacher_feats=[t_feats] if torch.is_tensor(t_feats) else list(t_feats))
        return self.with_distillation(losses, batch)


def build_trial_model(spec: Any, load_weights: Any) -> tuple[SegDistillationModel, dict[str, Any]]:
    """The model of a segmentation trial (teacher loaded) and the student's config."""
    from harness.data.formats import num_classes

    n = num_classes(spec.dataset)
    student, cfg = build_model(spec.model, n, spec.schedule)
    if spec.role == "teacher" or spec.method_name == "none":
        return SegDistillationModel(student), cfg
    teacher, t_cfg = build_model(spec.teacher, n, spec.schedule)
    load_weights(teacher, spec.teacher_checkpoint)
    distiller = catalog.METHODS.load(spec.method_name)(spec.params, model_info(spec.model, student, cfg, n),
                                                       model_info(spec.teacher, teacher, t_cfg, n))
    return SegDistillationModel(student, teacher, distiller), cfg


def prepare_trial(spec: Any, load_weights: Any) -> dict[str, Any]:
    """What the trial runner needs of a segmentation trial (see ``catalog.TASKS``)."""
    from harness.data.formats import config_loaders
    model, model_cfg = build_trial_model(spec, load_weights)
    train_loader, val_loader, evaluator = config_loaders(spec, val_batch_size=1)   # val images keep their sizes
    return {"model": model, "model_cfg": model_cfg, "train_loader": train_loader, "val_loader": val_loader,
            "evaluator": evaluator}
