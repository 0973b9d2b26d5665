"""Checks that need the backends but no training, run by ``harness run`` before Ray
starts: every model of the suite builds from its config, every given teacher checkpoint
loads into its model, every distiller builds for its pair. A mistake in a config
override is reported here, in seconds, naming the suite and the model, instead of
failing every trial later.
"""
from __future__ import annotations

import sys
from pathlib import Path
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


def preflight(suite: Suite) -> dict[str, Any]:
    """Build every model of the suite once, load every given checkpoint and build every
    distiller for its pair (each task's engine, ``catalog.TASKS``), so that a bad config
    override, checkpoint or pair fails here, in seconds, before Ray starts. Returns the
    networks built, by the content hash of their model entry (:func:`check_pretrained`
    reads their pretrained inits instead of building them again)."""
    from harness.data.formats import num_classes
    from harness.tasks.det.wrapper import inherit_neck_and_head

    from .weights import load_weights

    built: dict[str, tuple[Any, dict[str, Any]]] = {}
    nets: dict[str, Any] = {}

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
            nets.setdefault(content_hash(model), built[key][0])
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
    return nets


def check_data(suite: Suite, show: bool = False) -> None:
    """Every dataset of the suite checked (:mod:`harness.data.checks`; the result cached by
    the dataset's fingerprint under ``<teacher_cache>/datachecks``): errors raise one
    SuiteError listing each kind with its file, entry and count; warnings are printed and
    kept in ``suite.data_checks`` (the rows record them). ``show``: print each dataset's
    summary line too (``plan``)."""
    from harness.data.checks import check_dataset, report_lines, warnings_json
    problems = []
    for ds in suite.datasets():
        if not Path(ds["root"]).exists():
            continue                      # synthetic, written on first run (plan only)
        findings, cached = check_dataset(ds, Path(suite.doc["teacher_cache"]) / "datachecks")
        suite.data_checks[ds["name"]] = {"summary": findings.summary() + (" (cached)" if cached else ""),
                                         "warnings": warnings_json(findings), "errors": len(findings.errors)}
        lines = report_lines(ds["name"], findings)
        if show:
            print(f"  data {ds['name']}: {suite.data_checks[ds['name']]['summary']}")
        if findings.errors:
            problems += lines
        elif lines:
            print("\n".join(f"warning: {line}" for line in lines), file=sys.stderr)
    if problems:
        raise SuiteError(f"{suite.file}: the data has problems that would train or score a wrong model; "
                         f"nothing was trained:\n  " + "\n  ".join(problems))


def _pretrained_inits(net: Any) -> list[tuple[str, Any, str, str]]:
    """(module path, module, checkpoint, key prefix) of every module of a built network
    that mmengine will initialise from a checkpoint (``init_cfg`` of type Pretrained)."""
    out = []
    for path, module in net.named_modules():
        cfgs = getattr(module, "init_cfg", None)
        for cfg in cfgs if isinstance(cfgs, list) else [cfgs]:
            if isinstance(cfg, dict) and cfg.get("type") == "Pretrained" and cfg.get("checkpoint"):
                out.append((path, module, str(cfg["checkpoint"]), str(cfg.get("prefix") or "")))
    return out


def check_pretrained(suite: Suite, nets: dict[str, Any] | None = None) -> None:
    """Every ``pretrained`` checkpoint a model of the suite starts from (the config's own
    or the suite's file / URI) is had now (a URI downloaded with a bounded wait), read
    weights-only, and fits the module it initialises: every parameter of that module in
    the file with its shape. A partial load (what mmengine does silently, with the
    mismatch only in the trial's log) is an error naming the suite key and the file.
    ``nets``: the networks :func:`preflight` built (any model missing there is built)."""
    from harness.suite.paths import pretrained_file

    from .weights import read_state, shape_mismatches
    seen: set[tuple[str, str]] = set()
    for t in suite.trials:
        for role, model in (("teachers" if t.role == "teacher" else "students", t.model),
                            ("teachers", t.teacher)):
            if not model or model.get("pretrained") is False or catalog.arch_of(model)["task"] == "cls":
                continue
            if (model["name"], str(model.get("pretrained"))) in seen:
                continue
            seen.add((model["name"], str(model.get("pretrained"))))
            net = (nets or {}).get(content_hash(model)) or \
                catalog.task_engine(t.task, "build_model")(model, 2, t.schedule)[0]
            where = f"{suite.where.get(role, suite.file)}: {role}.{model['name']}.pretrained"
            for path, module, ckpt, prefix in _pretrained_inits(net):
                try:
                    state = read_state(pretrained_file(ckpt))
                except ValueError as exc:
                    raise SuiteError(f"{where}: {exc}") from exc.__cause__
                if prefix:
                    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
                own = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
                missing = [k for k in own if k not in state]
                shapes = shape_mismatches(state, own)
                if missing or shapes:
                    what = "; ".join(x for x in (
                        f"{len(missing)} of its {len(own)} tensors are not in the file (e.g. {missing[0]})"
                        if missing else "", f"{len(shapes)} have another shape (e.g. {shapes[0]})" if shapes else "")
                        if x)
                    raise SuiteError(f"{where}: '{ckpt}' does not fit the {path or 'model'} of '{model['name']}': "
                                     f"{what}; mmengine would load it partly and train the rest from scratch. "
                                     f"Give weights of this architecture, or 'pretrained: false'")


def check_room(suite: Suite) -> None:
    """Refuse, before Ray starts, a run whose output or teacher cache is on a disk that is
    already full (under 1 MiB free): every trial would fail writing its first state."""
    from .states import DISK_FULL_BELOW, existing_place, free_bytes
    for key in ("output", "teacher_cache"):
        free = free_bytes(suite.doc[key])
        if free is not None and free < DISK_FULL_BELOW:
            place = existing_place(suite.doc[key])        # (not made yet: its disk)
            raise SuiteError(f"{suite.where.get(key, suite.file)}: {key}: the disk of {place} is full ({free} bytes "
                             f"free, under {DISK_FULL_BELOW >> 20} MiB): free some room or write elsewhere; "
                             f"nothing was started")
