"""The detection task: an mmdet detector (student, and for a distilled student the
loaded teacher with the method's distiller), its loaders and its evaluator."""
from __future__ import annotations

from typing import Any

from harness import catalog
from harness.data.formats import config_loaders, num_classes


def build_trial_model(spec: Any, load_weights: Any) -> tuple[Any, dict[str, Any]]:
    """The :class:`DistillationModel` of a trial, with the teacher loaded; and the
    trained model's mmdet config (what the exported checkpoint loads into)."""
    from .models import build_detector, detector_cfg, tapped_info
    from .wrapper import DistillationModel

    distilled = spec.role == "student" and spec.method_name != "none"
    n_cls = num_classes(spec.dataset)
    cfg = detector_cfg(spec.model, n_cls)
    student = build_detector(cfg)
    if not distilled:
        return DistillationModel(student), cfg
    t_cfg = detector_cfg(spec.teacher, n_cls)
    teacher = build_detector(t_cfg)
    load_weights(teacher, spec.teacher_checkpoint)
    every = bool(catalog.METHODS.get(spec.method_name).get("all_levels", False))
    s_info, t_info = tapped_info(spec.model, cfg, every), tapped_info(spec.teacher, t_cfg, every)
    distiller = catalog.METHODS.load(spec.method_name)(spec.params, s_info, t_info)
    return DistillationModel(student, teacher, distiller, num_levels=len(s_info.strides),
                             inherit=bool(spec.params.get("inherit"))), cfg


def prepare_trial(spec: Any, load_weights: Any) -> dict[str, Any]:
    """What the trial runner needs of a detection trial (see ``catalog.TASKS``)."""
    model, model_cfg = build_trial_model(spec, load_weights)
    train_loader, val_loader, evaluator = config_loaders(spec)
    return {"model": model, "model_cfg": model_cfg, "train_loader": train_loader, "val_loader": val_loader,
            "evaluator": evaluator}
