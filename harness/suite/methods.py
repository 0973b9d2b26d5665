"""A suite's ``methods:`` (labels, method names, parameter overrides checked against the
catalog's defaults, choices and ranges) and its ``search:`` block (the searched method,
its space, starting points and seeds), and whether each method serves the datasets and
pairs it is given (``_check_tasks``, ``_check_serves``)."""
from __future__ import annotations

import math
from typing import Any

from harness import catalog
from harness.registry import suggest

from . import zoo
from .paths import _err
from .schema import Search
from .validation import validate
from .yamlio import Node

METHOD_ENTRY_KEYS = {"method", "params"}


def _check_param(label: str, name: str, entry: Any, params: Any, p: str, value: Any) -> None:
    """One hyperparameter against the registry: its choices, its type, its range."""
    where = f"methods.{label}.params.{p}"
    choices = entry.get("choices", {}).get(p)
    if choices:
        if value not in choices:
            raise _err(params, p, f"{where}: '{value}' is not one of "
                                  f"{', '.join(map(str, choices))}{suggest(str(value), choices)}")
        return
    default = entry["params"][p]
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise _err(params, p, f"{where} must be true or false, got {value!r}")
        return
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _err(params, p, f"{where} must be a number (default {default}), got {value!r}")
        if not math.isfinite(value):
            raise _err(params, p, f"{where} must be a finite number, got {value}")
        if isinstance(default, int) and not float(value).is_integer():
            raise _err(params, p, f"{where} must be a whole number (default {default}), got {value!r}")
        if p in entry.get("positive", ()) and value <= 0:
            raise _err(params, p, f"{where} must be greater than 0 (default {default}), got {value!r}")
        if value < 0:
            raise _err(params, p, f"{where} must be 0 or more (default {default}), got {value!r}")
        if p in entry.get("at_most_one", ()) and value > 1:
            raise _err(params, p, f"{where} must be between 0 and 1 (default {default}), got {value!r}")
    elif not isinstance(value, type(default)):
        raise _err(params, p, f"{where} must be a {type(default).__name__} (default {default!r}), got {value!r}")


def _methods(doc: Node) -> dict[str, tuple[str, dict[str, Any], Any]]:
    """label -> (registry name, overrides, node for error positions)."""
    node = doc.get("methods") or []
    out: dict[str, tuple[str, dict[str, Any], Any]] = {}
    items = [(m, None) for m in node] if isinstance(node, list) else list(node.items())
    for label, spec in items:
        spec = spec or {}
        name = spec.get("method") or label
        where = spec if isinstance(spec, Node) and "method" in spec else node if isinstance(node, Node) else doc
        if name not in catalog.METHODS:
            raise _err(where, "method" if where is spec else label if where is node else "methods",
                       f"methods.{label}: {catalog.METHODS.unknown_message(str(name))}")
        params = spec.get("params") or {}
        entry = catalog.METHODS.get(name)
        valid = entry["params"]
        for p, value in params.items():
            if p not in valid:
                raise _err(params, p, f"methods.{label}.params: '{p}' is not a parameter of {name}"
                                      f"{suggest(str(p), list(valid))}; valid: {', '.join(valid) or '(none)'}")
            _check_param(label, name, entry, params, p, value)
        out[label] = (name, dict(params), spec if isinstance(spec, Node) else node)
    if "none" not in out:   # the reference for every gain is always there
        out = {"none": ("none", {}, node), **out}
    return out


SEARCHABLE_SCHEDULE = ("lr", "momentum", "weight_decay", "grad_clip", "warmup_iters", "batch_size")


def _search(doc: Node, methods: dict[str, Any]) -> dict[str, Any]:
    """The ``search`` block: its method is a label of the suite (or several, the student
    alone ``none`` among them), every dimension of its space a schedule key or a numeric
    (or choice) hyperparameter of a searched method."""
    node = doc["search"]
    labels = node["method"] if isinstance(node["method"], list) else [node["method"]]
    for label in labels:
        if label not in methods:
            raise _err(node, "method", f"search.method: '{label}' is not a method label of the suite"
                                       f"{suggest(str(label), list(methods))}; valid: {', '.join(methods)}")
    if not labels or len(set(labels)) != len(labels):
        raise _err(node, "method", f"search.method: give each label once, got {labels}")
    space = node["space"]
    for key, dim in space.items():
        if key.startswith("schedule."):
            if key.split(".", 1)[1] not in SEARCHABLE_SCHEDULE:
                raise _err(space, key, f"search.space.{key}: searchable schedule keys are "
                                       f"{', '.join('schedule.' + k for k in SEARCHABLE_SCHEDULE)}")
            continue
        owners = [label for label in labels if key in catalog.METHODS.get(methods[label][0])["params"]]
        if not owners:
            valid = sorted({p for label in labels for p in catalog.METHODS.get(methods[label][0])["params"]})
            raise _err(space, key, f"search.space: '{key}' is not a parameter of {', '.join(labels)}"
                                   f"{suggest(key, valid)}; valid: {', '.join(valid + ['schedule.KEY'])}")
        values = dim.get("choice") or [v for k in ("uniform", "loguniform", "randint") for v in (dim.get(k) or [])]
        for label in owners:             # every value it can take must be a valid value of the parameter
            name = methods[label][0]
            for v in values:
                _check_param(f"{label} (search.space)", name, catalog.METHODS.get(name), space, key, v)
    for label in labels:
        params = catalog.METHODS.get(methods[label][0])["params"]
        if not any(k.startswith("schedule.") or k in params for k in space):
            raise _err(node, "space", f"search.space: nothing to search for '{label}': give schedule keys "
                                      f"(schedule.lr, ...) or its parameters ({', '.join(params) or 'it has none'})")
    full = validate(Search, node, doc, str(getattr(doc, "file", "<suite>")), ("search",)).model_dump()
    for i, point in enumerate(node.get("start_from") or []):
        for key, value in point.items():
            where = f"search.start_from[{i}].{key}"
            dim = full["space"].get(key)
            if dim is None:
                raise _err(point, key, f"{where}: '{key}' is not a key of search.space{suggest(str(key), list(space))}; "
                                       f"valid: {', '.join(space)}")
            if dim["choice"] is not None:
                ok, valid = value in dim["choice"], f"one of {dim['choice']}"
            else:
                form = next(k for k in ("uniform", "loguniform", "randint") if dim[k] is not None)
                low, high = dim[form]
                number = isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and (form != "randint" or isinstance(value, int))
                ok = number and (low <= value < high if form == "randint" else low <= value <= high)
                valid = f"{'an integer' if form == 'randint' else 'a number'} in {form} {[low, high]}"
            if not ok:
                raise _err(point, key, f"{where}: {value!r} is outside the space; valid: {valid}")
    if len(full["start_from"]) > full["budget"]:
        raise _err(node, "start_from", f"search.start_from: {len(full['start_from'])} configurations but a "
                                       f"budget of {full['budget']}; raise search.budget")
    return full | {"methods": {label: methods[label][0] for label in labels}}


def _check_tasks(doc: Node, datasets: dict, teachers: dict, students: dict,
                 pairs: list[tuple[str, str, list[str] | None]], methods: dict[str, Any]) -> None:
    """Pairs and methods apply to the datasets of their task; one that matches no dataset
    of the suite (or a pair mixing tasks) is an error."""
    tasks = {ds["task"] for ds in datasets.values()}
    listing = ", ".join(f"'{d['name']}' ({d['format']}) is a {d['task']} dataset" for d in datasets.values())
    for t_name, s_name, _ in pairs:
        t_arch, s_arch = catalog.arch_of(teachers[t_name]), catalog.arch_of(students[s_name])
        if t_arch["task"] != s_arch["task"]:
            raise _err(doc, "pairs", f"pair {t_name} -> {s_name} mixes tasks: the teacher ({t_arch.name}) is a "
                                     f"{t_arch['task']} model, the student ({s_arch.name}) a {s_arch['task']} model")
        if t_arch["task"] not in tasks:
            raise _err(doc, "pairs", f"pair {t_name} -> {s_name} is a {t_arch['task']} pair but no dataset of the "
                                     f"suite is: {listing}")
    for label, (method, _, where) in methods.items():
        entry = catalog.METHODS.get(method)
        if not tasks & set(entry["tasks"]):
            raise _err(where, label, f"method '{label}' ({method}) is for task {'/'.join(entry['tasks'])} "
                                     f"but no dataset of the suite is: {listing}")


def _check_serves(label: str, method: str, where: Any, teacher: dict, student: dict) -> None:
    entry = catalog.METHODS.get(method)
    t_arch, s_arch = catalog.arch_of(teacher), catalog.arch_of(student)
    t_heads, s_heads = zoo.head_types(teacher, t_arch), zoo.head_types(student, s_arch)
    for side, model, arch, heads in (("teacher", teacher, t_arch, t_heads), ("student", student, s_arch, s_heads)):
        if entry.get("dense_heads") and heads[0] not in entry["dense_heads"]:
            raise _err(where, label, f"method '{label}' ({method}) cannot serve the {side} '{model['name']}': it "
                                     f"distils the dense head's per-prior predictions, and its {heads[0]} is not "
                                     f"one it reads; supported: {', '.join(entry['dense_heads'])}")
        if entry.get("roi_heads") and arch.get("stages") == 2 and heads[1] not in entry["roi_heads"]:
            raise _err(where, label, f"method '{label}' ({method}) cannot serve the {side} '{model['name']}': its "
                                     f"per-RoI distillation needs one of {', '.join(entry['roi_heads'])}, and the "
                                     f"{side}'s RoI head is a {heads[1]}")
    same_head = t_arch.name == s_arch.name or (t_heads[0] == s_heads[0] and t_arch["family"] == s_arch["family"])
    if entry.get("needs_same_head") and not same_head:
        raise _err(where, label, f"method '{label}' ({method}) cannot serve the pair "
                                 f"{teacher['name']} -> {student['name']}: it compares the two heads' "
                                 f"predictions one to one, which needs the same head and anchor layout, but "
                                 f"the teacher is a {t_arch.name} and the student a {s_arch.name}")
    if entry.get("needs_same_levels") and tuple(t_arch["levels"]) != tuple(s_arch["levels"]):
        raise _err(where, label, f"method '{label}' ({method}) cannot serve the pair "
                                 f"{teacher['name']} -> {student['name']}: it matches feature levels one to "
                                 f"one, but the teacher's {t_arch.name} has strides {list(t_arch['levels'])} "
                                 f"and the student's {s_arch.name} has {list(s_arch['levels'])}")
