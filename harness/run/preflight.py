"""Checks that need the backends but no training, run by ``harness run`` before Ray
starts: every model of the suite builds from its config, every given teacher checkpoint
loads into its model, every distiller builds for its pair. A mistake in a config
override is reported here, in seconds, naming the suite and the model, instead of
failing every trial later.
"""
from __future__ import annotations

from typing import Any

from harness import catalog
from harness.suite.spec import content_hash
from harness.suite.load import Suite
from harness.suite.yamlio import SuiteError


def registered_types() -> set[str]:
    """Every class name registered in mmengine's, mmcv's, mmdet's and mmseg's registries
    (each registry and its children), plain and scope-qualified (``mmdet.ResNet``)."""
    import mmcv.ops  # noqa: F401 - registers mmcv's layers and ops
    import mmengine.registry as root
    from mmdet.utils import register_all_modules as det_modules
    from mmseg.utils import register_all_modules as seg_modules

    det_modules(init_default_scope=False)
    seg_modules(init_default_scope=False)
    names: set[str] = set()

    def walk(reg: Any) -> None:
        for key in reg.module_dict:
            names.update((key, f"{reg.scope}.{key}"))
        for child in reg.children.values():
            walk(child)
    for obj in vars(root).values():
        if isinstance(obj, root.Registry):
            walk(obj)
    return names


def check_types(suite: Suite) -> None:
    """Every ``type:`` of the suite's config overrides names a registered class. Done
    before any config is built: mmengine would import an unregistered dotted name."""
    if not suite.type_refs:
        return
    known = registered_types()
    for name, where, key in suite.type_refs:
        if name not in known:
            from harness.registry import suggest
            raise SuiteError(f"{where}: {key}: '{name}' is not a class registered in mmdet / mmseg / mmengine / "
                             f"mmcv{suggest(name, sorted(known))}")


def preflight(suite: Suite) -> None:
    """Build every model of the suite once, load every given checkpoint and build every
    distiller for its pair (each task's engine, ``catalog.TASKS``), so that a bad config
    override, checkpoint or pair fails here, in seconds, before Ray starts."""
    from harness.data.formats import num_classes
    from harness.tasks.det.wrapper import inherit_neck_and_head

    from .weights import load_weights

    built: dict[str, tuple[Any, dict[str, Any]]] = {}

    def build(model: dict[str, Any], ds: dict[str, Any], role: str, schedule: dict[str, Any],
              task: str) -> tuple[Any, dict[str, Any]]:
        key = content_hash([model, ds["root"], schedule.get("crop_size")])
        if key not in built:
            try:
                built[key] = catalog.task_engine(task, "build_model")(model, num_classes(ds), schedule)
            except Exception as exc:
                raise SuiteError(f"{suite.file}: {role} '{model['name']}' (arch {model['arch']}) does not "
                                 f"build: {type(exc).__name__}: {exc}") from exc
            if model.get("checkpoint"):
                try:
                    load_weights(built[key][0], model["checkpoint"])
                except Exception as exc:
                    raise SuiteError(f"{suite.file}: teachers.{model['name']}.checkpoint: {exc}") from exc
        return built[key]

    distillers: set[str] = set()
    for t in suite.trials:
        net, cfg = build(t.model, t.dataset, "teacher" if t.role == "teacher" else "student", t.schedule, t.task)
        if t.teacher is None or t.method_name in ("none", "teacher"):
            continue
        t_net, t_cfg = build(t.teacher, t.dataset, "teacher", t.schedule, t.task)
        key = content_hash([t.method_name, t.params, cfg, t_cfg])
        if key in distillers:
            continue
        distillers.add(key)
        try:
            every = bool(catalog.METHODS.get(t.method_name).get("all_levels", False))
            info = catalog.task_engine(t.task, "model_info")
            n = num_classes(t.dataset)
            catalog.METHODS.load(t.method_name)(t.params, info(t.model, net, cfg, n, every),
                                                info(t.teacher, t_net, t_cfg, n, every))
            if t.params.get("inherit"):
                inherit_neck_and_head(net, t_net)
        except Exception as exc:
            raise SuiteError(f"{suite.file}: method '{t.method}' cannot be built for "
                             f"{t.teacher['name']} -> {t.model['name']}: {type(exc).__name__}: {exc}") from exc
