"""The detection task: an mmdet detector (student, and for a distilled student the
loaded teacher with the method's distiller), its loaders and its evaluator."""
from __future__ import annotations

from typing import Any

from harness import catalog
from harness.data.formats import config_loaders, num_classes


def build_model(model: dict[str, Any], num_classes: int, schedule: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A suite model entry built as a detector, and its mmdet config."""
    from .models import build_detector, detector_cfg
    cfg = detector_cfg(model, num_classes)
    return build_detector(cfg), cfg


def model_info(model: dict[str, Any], net: Any, cfg: dict[str, Any], num_classes: int,
               all_levels: bool = False) -> Any:
    """What a distiller is told of one side: the FPN levels it taps (every neck output
    with ``all_levels``, for the distillers that declare it)."""
    from .models import tapped_info
    return tapped_info(model, cfg, all_levels)


def build_trial_model(spec: Any, load_weights: Any) -> tuple[Any, dict[str, Any]]:
    """The :class:`DistillationModel` of a trial, with the teacher loaded; and the
    trained model's mmdet config (what the exported checkpoint loads into)."""
    from .wrapper import DistillationModel

    distilled = spec.role == "student" and spec.method_name != "none"
    n_cls = num_classes(spec.dataset)
    student, cfg = build_model(spec.model, n_cls, spec.schedule)
    if not distilled:
        return DistillationModel(student), cfg
    teacher, t_cfg = build_model(spec.teacher, n_cls, spec.schedule)
    load_weights(teacher, spec.teacher_checkpoint)
    every = bool(catalog.METHODS.get(spec.method_name).get("all_levels", False))
    s_info = model_info(spec.model, student, cfg, n_cls, every)
    t_info = model_info(spec.teacher, teacher, t_cfg, n_cls, every)
    distiller = catalog.METHODS.load(spec.method_name)(spec.params, s_info, t_info)
    return DistillationModel(student, teacher, distiller, num_levels=len(s_info.strides),
                             inherit=bool(spec.params.get("inherit"))), cfg


def prepare_trial(spec: Any, load_weights: Any) -> dict[str, Any]:
    """What the trial runner needs of a detection trial (see ``catalog.TASKS``)."""
    model, model_cfg = build_trial_model(spec, load_weights)
    train_loader, val_loader, evaluator = config_loaders(spec)
    return {"model": model, "model_cfg": model_cfg, "train_loader": train_loader, "val_loader": val_loader,
            "evaluator": evaluator}
