"""Suites: short, strict YAML files that expand into a matrix of trials.

A suite names datasets, teachers, students, (teacher, student) pairs, methods with
their hyperparameter overrides, seeds, a schedule and per-trial resources, and may
``extends:`` a base suite (mappings merge key by key, the extending file wins).
The matrix is datasets x pairs x methods x seeds, each pair and method applied to the
datasets of its task (a suite may mix detection, segmentation and classification); the
student alone (``none``) and the teacher's own score are always part of it.

Validation happens here, before anything is imported or trained, and every error
names the file, the line, the key and what would be valid.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import catalog
from .pretrained import is_uri
from .registry import suggest
from .spec import TrialSpec, teacher_key
from .yamlio import Node, SuiteError, deep_merge, load_yaml

SUITE_KEYS = {
    "name": "suite name (default: the file's stem)",
    "description": "free text",
    "extends": "path (or list of paths) of base suites, relative to this file",
    "datasets": "mapping name -> {format, root, synth, classes}",
    "teachers": "mapping name -> model (arch, backbone, neck, head, model, checkpoint, schedule)",
    "students": "mapping name -> model (arch, backbone, neck, head, model, schedule)",
    "pairs": "list of {teacher, student, methods} (or [teacher, student]); methods restricts the suite's",
    "methods": "list of method names, or mapping label -> {method, params}",
    "seeds": "list of integer seeds",
    "schedule": "training schedule shared by every trial",
    "resources": "per-trial resources {cpu, gpu}",
    "output": "results directory (default results/<name>)",
    "teacher_cache": "where harness-trained teachers are kept (default <output>/../_teachers)",
    "teacher_seed": "seed for harness-trained teachers (default 0)",
    "pretrained": "default for every model: true (the configs' ImageNet backbones), false, or a file / URI",
}
DATASET_KEYS = {"format", "root", "synth", "classes", "unlabeled", "aug"}
MODEL_KEYS = {"arch", "backbone", "neck", "head", "model", "schedule", "pretrained"}
TEACHER_KEYS = MODEL_KEYS | {"checkpoint"}
SCHEDULE_DEFAULTS: dict[str, Any] = {
    "epochs": 12, "iters": None, "val_interval": 1, "batch_size": 2, "lr": 0.01,
    "momentum": 0.9, "weight_decay": 1e-4, "grad_clip": 35.0, "warmup_iters": 100,
    "img_scale": [1333, 800], "num_workers": 0, "optimizer": "sgd", "policy": "step",
    "crop_size": None,       # segmentation: random crop [h, w] after the random rescale
}
OPTIMIZERS = ("sgd", "adamw")
POLICIES = ("step", "cosine", "poly")
RESOURCE_DEFAULTS = {"cpu": 1, "gpu": 0}
METHOD_ENTRY_KEYS = {"method", "params"}


@dataclass
class Suite:
    """A validated suite: the merged document and the trials it expands to."""

    name: str
    file: str
    doc: dict[str, Any]
    trials: list[TrialSpec] = field(default_factory=list)

    @property
    def output(self) -> Path:
        return Path(self.doc["output"])

    def teacher_trials(self) -> list[TrialSpec]:
        return [t for t in self.trials if t.role == "teacher"]

    def student_trials(self) -> list[TrialSpec]:
        return [t for t in self.trials if t.role == "student"]


# ---------------------------------------------------------------------------- helpers
def _err(node: Any, key: Any, message: str) -> SuiteError:
    where = node.where(key) if isinstance(node, Node) else "<suite>"
    return SuiteError(f"{where}: {message}")


def _check_keys(node: Any, allowed: set[str] | dict[str, str], what: str) -> None:
    if not isinstance(node, dict):
        raise _err(node, None, f"{what} must be a mapping, got {type(node).__name__}")
    for key in node:
        if key not in allowed:
            raise _err(node, key, f"unknown key '{key}' in {what}{suggest(str(key), list(allowed))}; "
                                  f"valid keys: {', '.join(sorted(allowed))}")


_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_path(value: str) -> str:
    """Expand ``~``, ``${VAR}`` and ``${VAR:-default}`` in a path from a suite."""
    def repl(m: re.Match[str]) -> str:
        return os.environ.get(m.group(1)) or (m.group(2) or "")
    return os.path.expanduser(_VAR.sub(repl, value))


def _load_with_extends(path: Path, seen: tuple[Path, ...] = ()) -> Node:
    doc = load_yaml(path)
    if doc is None:
        doc = Node()
        doc.file, doc.line, doc.key_lines = str(path), 1, {}
    if not isinstance(doc, dict):
        raise SuiteError(f"{path}: a suite must be a YAML mapping")
    bases = doc.get("extends") or []
    bases = [bases] if isinstance(bases, str) else bases
    merged: Any = None
    for base in bases:
        base_path = (path.parent / expand_path(str(base))).resolve()
        if base_path in seen:
            raise _err(doc, "extends", f"'{base}' extends itself (cycle)")
        if not base_path.exists():
            raise _err(doc, "extends", f"base suite '{base}' not found (looked at {base_path})")
        base_doc = _load_with_extends(base_path, seen + (base_path,))
        merged = base_doc if merged is None else deep_merge(merged, base_doc)
    return doc if merged is None else deep_merge(merged, doc)


# --------------------------------------------------------------------------- sections
def _schedule(node: Any, base: dict[str, Any], what: str) -> dict[str, Any]:
    if node is None:
        return dict(base)
    _check_keys(node, set(SCHEDULE_DEFAULTS), what)
    out = dict(base)
    out.update(node)
    if out["iters"] is None and not (isinstance(out["epochs"], int) and out["epochs"] > 0):
        raise _err(node, "epochs", f"{what}.epochs must be a positive integer (or give iters)")
    if out["optimizer"] not in OPTIMIZERS:
        raise _err(node, "optimizer", f"{what}.optimizer '{out['optimizer']}' is not one of "
                                      f"{', '.join(OPTIMIZERS)}{suggest(out['optimizer'], OPTIMIZERS)}")
    if out["policy"] not in POLICIES:
        raise _err(node, "policy", f"{what}.policy '{out['policy']}' is not one of "
                                   f"{', '.join(POLICIES)}{suggest(str(out['policy']), POLICIES)}")
    for key in ("batch_size", "val_interval"):
        if not isinstance(out[key], int) or out[key] < 1:
            raise _err(node, key, f"{what}.{key} must be a positive integer, got {out[key]!r}")
    return out


def _datasets(doc: Node) -> dict[str, dict[str, Any]]:
    node = doc.get("datasets")
    if not node:
        raise _err(doc, None, "the suite declares no datasets (key 'datasets')")
    _check_keys(node, set(node), "datasets")
    out = {}
    for name, ds in node.items():
        _check_keys(ds, DATASET_KEYS, f"datasets.{name}")
        fmt = ds.get("format")
        if fmt not in catalog.DATASET_FORMATS:
            raise _err(ds, "format", f"datasets.{name}.format: "
                                     f"{catalog.DATASET_FORMATS.unknown_message(str(fmt))}")
        if "root" not in ds:
            raise _err(ds, None, f"datasets.{name} has no 'root'")
        entry = catalog.DATASET_FORMATS.get(fmt)
        root = os.path.abspath(expand_path(str(ds["root"])))
        synth = ds.get("synth")
        if synth is not None:
            _check_keys(synth, set(entry["synth_params"]), f"datasets.{name}.synth")
        if synth is None and not Path(root).exists():
            raise _err(ds, "root", f"datasets.{name}.root: '{root}' does not exist. Point it at a "
                                   f"{fmt}-layout dataset, or write a synthetic one with: "
                                   f"python -m harness data synth {fmt} --out {root}")
        unlabeled = ds.get("unlabeled")
        if unlabeled is None and fmt == "imagenet" and (synth or {}).get("unlabeled_images"):
            unlabeled = "unlabeled"           # where the synthetic writer puts them
        ds = dict(ds, unlabeled=unlabeled)
        out[name] = {"name": name, "format": fmt, "root": root, "task": entry["task"],
                     "synth": dict(synth) if synth is not None else None,
                     "classes": list(ds["classes"]) if ds.get("classes") else None,
                     "unlabeled": str(ds["unlabeled"]) if ds.get("unlabeled") else None,
                     "aug": bool(ds.get("aug", False))}
    return out


def _pretrained(node: Any, key: str, what: str, default: Any = True) -> Any:
    """A ``pretrained`` setting: True, False, a URI, or an existing local file (absolute)."""
    if not isinstance(node, dict) or key not in node:
        return default                       # the suite's setting, already checked
    value = node[key]
    if isinstance(value, bool):
        return value
    if not isinstance(value, str) or not value:
        raise _err(node, key, f"{what} must be true, false, or a checkpoint file or URI, got {value!r}")
    if is_uri(value):
        return value
    path = os.path.abspath(expand_path(value))
    if not Path(path).is_file():
        raise _err(node, key, f"{what}: '{path}' is not a file; give a local checkpoint of the backbone, a URI "
                              f"(torchvision://, open-mmlab://, https://, ...), true for the config's own, "
                              f"or false to train from scratch")
    return path


def _models(doc: Node, key: str, allowed: set[str], schedule: dict[str, Any],
            pretrained: Any = True) -> dict[str, dict]:
    """The suite's teachers or students; ``pretrained`` is the suite's default."""
    node = doc.get(key)
    if not node:
        raise _err(doc, None, f"the suite declares no {key}")
    out = {}
    for name, m in node.items():
        _check_keys(m, allowed, f"{key}.{name}")
        arch = m.get("arch")
        if arch not in catalog.ARCHS:
            raise _err(m, "arch", f"{key}.{name}.arch: {catalog.ARCHS.unknown_message(str(arch))}")
        model = {"name": name, "arch": arch}
        for part in ("backbone", "neck", "head", "model"):
            if m.get(part) is not None:
                if not isinstance(m[part], dict):
                    raise _err(m, part, f"{key}.{name}.{part} must be a mapping of config overrides")
                model[part] = _plain(m[part])
        if m.get("checkpoint"):
            ckpt = os.path.abspath(expand_path(str(m["checkpoint"])))
            if not Path(ckpt).is_file():
                raise _err(m, "checkpoint", f"{key}.{name}.checkpoint: '{ckpt}' is not a file; give a "
                                            f"local checkpoint path, or leave 'checkpoint' out to "
                                            f"have the harness train this teacher")
            model["checkpoint"] = ckpt
        model["pretrained"] = _pretrained(m, "pretrained", f"{key}.{name}.pretrained", pretrained)
        if catalog.ARCHS.get(arch)["task"] == "cls" and isinstance(model["pretrained"], str):
            raise _err(m, "pretrained", f"{key}.{name}.pretrained: classifiers are built by torchvision from "
                                        f"scratch (SSLD and Hinton KD train their students so); a checkpoint "
                                        f"cannot be given here")
        model["schedule"] = _schedule(m.get("schedule"), schedule, f"{key}.{name}.schedule")
        out[name] = model
    return out


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _pairs(doc: Node, teachers: dict, students: dict,
           methods: dict[str, Any]) -> list[tuple[str, str, list[str] | None]]:
    """(teacher, student, method labels or None for all) per pair."""
    node = doc.get("pairs")
    if not node:
        raise _err(doc, None, "the suite declares no pairs (list of {teacher, student})")
    out = []
    for item in node:
        where, only = (item, None) if isinstance(item, Node) else (doc, None)
        if isinstance(item, dict):
            _check_keys(item, {"teacher", "student", "methods"}, "pairs[]")
            t, s, only = item.get("teacher"), item.get("student"), item.get("methods")
        elif isinstance(item, list) and len(item) == 2:
            t, s = item
        else:
            raise _err(doc, "pairs", f"each pair is {{teacher: T, student: S}} or [T, S], got {item!r}")
        for role, name, known in (("teacher", t, teachers), ("student", s, students)):
            if name not in known:
                raise _err(where, role if where is item else "pairs",
                           f"pair names {role} '{name}' which is not under '{role}s'"
                           f"{suggest(str(name), list(known))}; valid: {', '.join(known)}")
        if only is not None:
            for label in only:
                if label not in methods:
                    raise _err(where, "methods", f"pair {t} -> {s} names method '{label}' which is not under "
                                                 f"'methods'{suggest(str(label), list(methods))}; "
                                                 f"valid: {', '.join(methods)}")
            only = ["none"] + [m for m in only if m != "none"]
        out.append((t, s, only))
    return out


def _methods(doc: Node) -> dict[str, tuple[str, dict[str, Any], Any]]:
    """label -> (registry name, overrides, node for error positions)."""
    node = doc.get("methods") or []
    out: dict[str, tuple[str, dict[str, Any], Any]] = {}
    items = [(m, None) for m in node] if isinstance(node, list) else list(node.items())
    for label, spec in items:
        if not isinstance(label, str):
            raise _err(doc, "methods", f"method names are strings, got {label!r}")
        spec = spec or {}
        if spec:
            _check_keys(spec, METHOD_ENTRY_KEYS, f"methods.{label}")
        name = spec.get("method", label)
        where = spec if isinstance(spec, Node) and "method" in spec else node
        if name not in catalog.METHODS:
            raise _err(where, "method" if where is spec else label,
                       f"methods.{label}: {catalog.METHODS.unknown_message(str(name))}")
        params = spec.get("params") or {}
        entry = catalog.METHODS.get(name)
        valid = entry["params"]
        for p, value in params.items():
            if p not in valid:
                raise _err(params, p, f"methods.{label}.params: '{p}' is not a parameter of {name}"
                                      f"{suggest(str(p), list(valid))}; valid: {', '.join(valid) or '(none)'}")
            choices = entry.get("choices", {}).get(p)
            if choices and value not in choices:
                raise _err(params, p, f"methods.{label}.params.{p}: '{value}' is not one of "
                                      f"{', '.join(map(str, choices))}{suggest(str(value), choices)}")
            default = valid[p]
            if isinstance(default, bool) and not isinstance(value, bool):
                raise _err(params, p, f"methods.{label}.params.{p} must be true or false, got {value!r}")
            if isinstance(default, (int, float)) and not isinstance(default, bool) and (
                    isinstance(value, bool) or not isinstance(value, (int, float))):
                raise _err(params, p, f"methods.{label}.params.{p} must be a number (default {default}), "
                                      f"got {value!r}")
        out[label] = (name, dict(params), spec if isinstance(spec, Node) else node)
    if "none" not in out:   # the reference for every gain is always there
        out = {"none": ("none", {}, node), **out}
    return out


def _check_tasks(doc: Node, datasets: dict, teachers: dict, students: dict,
                 pairs: list[tuple[str, str, list[str] | None]], methods: dict[str, Any]) -> None:
    """Pairs and methods apply to the datasets of their task; one that matches no dataset
    of the suite (or a pair mixing tasks) is an error."""
    tasks = {ds["task"] for ds in datasets.values()}
    listing = ", ".join(f"'{d['name']}' ({d['format']}) is a {d['task']} dataset" for d in datasets.values())
    for t_name, s_name, _ in pairs:
        t_arch, s_arch = catalog.ARCHS.get(teachers[t_name]["arch"]), catalog.ARCHS.get(students[s_name]["arch"])
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
    t_arch, s_arch = catalog.ARCHS.get(teacher["arch"]), catalog.ARCHS.get(student["arch"])
    if entry.get("needs_same_head") and t_arch.name != s_arch.name:
        raise _err(where, label, f"method '{label}' ({method}) cannot serve the pair "
                                 f"{teacher['name']} -> {student['name']}: it compares the two heads' "
                                 f"predictions one to one, which needs the same head and anchor layout, but "
                                 f"the teacher is a {t_arch.name} and the student a {s_arch.name}")
    if entry.get("needs_same_levels") and tuple(t_arch["levels"]) != tuple(s_arch["levels"]):
        raise _err(where, label, f"method '{label}' ({method}) cannot serve the pair "
                                 f"{teacher['name']} -> {student['name']}: it matches feature levels one to "
                                 f"one, but the teacher's {t_arch.name} has strides {list(t_arch['levels'])} "
                                 f"and the student's {s_arch.name} has {list(s_arch['levels'])}")


# ------------------------------------------------------------------------------- main
def load_suite(path: str | Path) -> Suite:
    """Load, merge and validate a suite and expand its trial matrix. Imports no backend."""
    path = Path(path)
    doc = _load_with_extends(path.resolve())
    _check_keys(doc, SUITE_KEYS, "the suite")
    name = str(doc.get("name") or path.stem)
    schedule = _schedule(doc.get("schedule"), SCHEDULE_DEFAULTS, "schedule")
    resources = dict(RESOURCE_DEFAULTS)
    if doc.get("resources") is not None:
        _check_keys(doc["resources"], set(RESOURCE_DEFAULTS), "resources")
        resources.update(doc["resources"])
    datasets = _datasets(doc)
    pretrained = _pretrained(doc, "pretrained", "pretrained")
    teachers = _models(doc, "teachers", TEACHER_KEYS, schedule, pretrained)
    students = _models(doc, "students", MODEL_KEYS, schedule, pretrained)
    methods = _methods(doc)
    pairs = _pairs(doc, teachers, students, methods)
    _check_tasks(doc, datasets, teachers, students, pairs, methods)
    seeds = doc.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise _err(doc, "seeds", f"seeds must be a non-empty list of integers, got {seeds!r}")
    # absolute: Ray trials may run in another working directory (or on another node)
    output = os.path.abspath(expand_path(str(doc.get("output") or f"results/{name}")))
    cache = os.path.abspath(expand_path(str(doc.get("teacher_cache") or Path(output).parent / "_teachers")))
    teacher_seed = int(doc.get("teacher_seed", 0))

    merged = dict(doc)
    merged.update(name=name, output=output, teacher_cache=cache, schedule=schedule, resources=resources)
    suite = Suite(name=name, file=str(path), doc=merged)
    common = dict(suite=name, resources=resources, output_dir=output)
    seen_teachers: set[tuple[str, str]] = set()
    for ds in datasets.values():
        ds_id = {k: v for k, v in ds.items() if k != "task"}
        for t_name, s_name, only in pairs:
            if catalog.ARCHS.get(teachers[t_name]["arch"])["task"] != ds["task"]:
                continue                     # a pair serves the datasets of its own task
            teacher = teachers[t_name]
            s_sched = students[s_name]["schedule"]
            student = {k: v for k, v in students[s_name].items() if k != "schedule"}
            t_sched = teacher["schedule"]
            t_model = {k: v for k, v in teacher.items() if k != "schedule"}
            if teacher.get("checkpoint"):
                t_ckpt = teacher["checkpoint"]
            else:
                key = teacher_key(t_model, ds_id, t_sched, teacher_seed)
                t_ckpt = str(Path(cache) / f"{ds['name']}-{t_name}-{key}" / "teacher.pth")
            if (ds["name"], t_name) not in seen_teachers:
                seen_teachers.add((ds["name"], t_name))
                suite.trials.append(TrialSpec(
                    task=ds["task"], role="teacher", dataset=ds_id, model=t_model, method="teacher",
                    method_name="teacher", seed=teacher_seed, schedule=t_sched,
                    teacher_checkpoint=t_ckpt, **common))
            family = catalog.ARCHS.get(student["arch"])["family"]
            for label, (method, overrides, where) in methods.items():
                if (only is not None and label not in only) or ds["task"] not in catalog.METHODS.get(method)["tasks"]:
                    continue
                _check_serves(label, method, where, teacher, student)
                for seed in seeds:
                    suite.trials.append(TrialSpec(
                        task=ds["task"], role="student", dataset=ds_id, model=dict(student),
                        method=label, method_name=method,
                        params=catalog.method_params(method, family, overrides),
                        seed=seed, schedule=s_sched, teacher=t_model if method != "none" else None,
                        teacher_checkpoint=t_ckpt if method != "none" else None, **common))
    unique: dict[str, TrialSpec] = {}
    for trial in suite.trials:   # `none` is shared by every pair with the same student
        unique.setdefault(trial.trial_id, trial)
    suite.trials = list(unique.values())
    return suite
