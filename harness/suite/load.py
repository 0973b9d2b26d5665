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

from harness import catalog
from harness.registry import suggest

from .methods import _check_serves, _check_tasks, _methods, _search
from .paths import (DOWNLOAD_SCHEMES, _contained, _err, _expand, _load_with_extends, _no_credentials, _pretrained,
                    _storage, allowed_roots, cached_checkpoint, fetch_checkpoint, synth_mismatch)
from . import zoo
from .schema import Baselines, Resources, Schedule, SeedRule, SuiteDoc, check_name
from .validation import validate
from .spec import TrialSpec, file_sha256, teacher_key
from .yamlio import Node, SuiteError

SCHEDULE_DEFAULTS: dict[str, Any] = Schedule().model_dump()
#: the most trials one suite may expand to (a matrix this large is a mistake, not a benchmark)
MAX_TRIALS = 100_000

#: a ``type:`` in a model override names a registered class, optionally with its
#: registry scope; never an import path (mmengine would import any dotted name)
TYPE_SCOPES = ("mmdet", "mmseg", "mmengine", "mmcv", "mmpretrain")
_TYPE_RE = re.compile(rf"^(?:({'|'.join(TYPE_SCOPES)})\.)?[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class Suite:
    """A validated suite: the merged document and the trials it expands to."""

    name: str
    file: str
    doc: dict[str, Any]
    trials: list[TrialSpec] = field(default_factory=list)
    #: every ``type:`` named in a model override: (name, file:line, key path), checked
    #: against the mm registries by the preflight, before anything is built
    type_refs: list[tuple[str, str, str]] = field(default_factory=list)
    #: ``file:line`` of each top-level key, for errors found after loading
    where: dict[str, str] = field(default_factory=dict)
    #: dataset name -> what its check found (summary, warnings as JSON, error count),
    #: filled before any trial (``harness.run.preflight.check_data``); the rows record the warnings
    data_checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: teacher name -> its checkpoint URI, not downloaded yet (only when loaded without
    #: ``fetch``, as ``plan`` loads: the ids of its trials are known once it is)
    pending_downloads: dict[str, str] = field(default_factory=dict)

    @property
    def output(self) -> Path:
        return Path(self.doc["output"])

    def teacher_trials(self) -> list[TrialSpec]:
        return [t for t in self.trials if t.role == "teacher"]

    def student_trials(self) -> list[TrialSpec]:
        return [t for t in self.trials if t.role == "student"]

    def datasets(self) -> list[dict[str, Any]]:
        """Each dataset of the matrix once (as its trials hold it), in the trials' order."""
        return list({t.dataset["name"]: t.dataset for t in self.trials}.values())


# ---------------------------------------------------------------------------- helpers
def _check_keys(node: Any, allowed: set[str] | dict[str, str], what: str) -> None:
    if not isinstance(node, dict):
        raise _err(node, None, f"{what} must be a mapping, got {type(node).__name__}")
    for key in node:
        if key not in allowed:
            raise _err(node, key, f"unknown key '{key}' in {what}{suggest(str(key), list(allowed))}; "
                                  f"valid keys: {', '.join(sorted(allowed))}")


# --------------------------------------------------------------------------- sections
def _schedule(doc: Node, node: Any, base: dict[str, Any], loc: tuple[str, ...]) -> dict[str, Any]:
    """``base`` overridden by the schedule at ``loc``, checked whole by the schema."""
    if node is None:
        return dict(base)
    if not isinstance(node, dict):
        raise _err(doc if len(loc) == 1 else _node_at(doc, loc[:-1]), loc[-1],
                   f"{'.'.join(loc)} must be a mapping of schedule keys, got {node!r}")
    merged = validate(Schedule, {**base, **node}, doc, str(getattr(doc, "file", "<suite>")), loc).model_dump()
    if merged["iters"] is None and "epochs" not in node and "epochs" not in base:
        raise _err(node, None, f"{'.'.join(loc)}: give epochs or iters")
    return merged


def _node_at(doc: Any, loc: tuple[Any, ...]) -> Any:
    for key in loc:
        doc = doc[key]
    return doc


def _datasets(doc: Node, roots: list[Path]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, ds in doc["datasets"].items():
        fmt = ds.get("format")
        if fmt not in catalog.DATASET_FORMATS:
            raise _err(ds, "format", f"datasets.{name}.format: "
                                     f"{catalog.DATASET_FORMATS.unknown_message(str(fmt))}")
        entry = catalog.DATASET_FORMATS.get(fmt)
        root = os.path.abspath(_expand(ds, "root", ds["root"], f"datasets.{name}.root"))
        synth = ds.get("synth")
        if synth is not None:
            _check_keys(synth, set(entry["synth_params"]), f"datasets.{name}.synth ({fmt})")
            if not Path(root).exists():      # it will be written: only where this run may write
                _contained(root, ds, "root", f"datasets.{name}.root (synthetic, written on first use)", roots)
        if synth is not None and Path(root).exists():
            why = synth_mismatch({"root": root, "format": fmt, "synth": dict(synth)})
            if why:
                raise _err(ds, "synth", f"datasets.{name}.synth: {why}")
        if synth is None and not Path(root).exists():
            raise _err(ds, "root", f"datasets.{name}.root: '{root}' does not exist. Point it at a "
                                   f"{fmt}-layout dataset, or write a synthetic one with: "
                                   f"python -m harness data synth {fmt} --out {root}")
        unlabeled = ds.get("unlabeled")
        if unlabeled is None and fmt == "imagenet" and (synth or {}).get("unlabeled_images"):
            unlabeled = "unlabeled"           # where the synthetic writer puts them
        if unlabeled is not None and (os.path.isabs(unlabeled) or ".." in Path(unlabeled).parts):
            raise _err(ds, "unlabeled", f"datasets.{name}.unlabeled: a folder inside the dataset's root, "
                                        f"got '{unlabeled}'")
        out[name] = {"name": name, "format": fmt, "root": root, "task": entry["task"],
                     "synth": dict(synth) if synth is not None else None,
                     "classes": list(ds["classes"]) if ds.get("classes") else None,
                     "unlabeled": str(unlabeled) if unlabeled else None,
                     "aug": bool(ds.get("aug", False))}
    return out


def _scan_types(obj: Any, node: Any, key_path: str, refs: list[tuple[str, str, str]]) -> None:
    """Every ``type`` (and ``_scope_``) in a config override must name a registered class,
    never an import path: mmengine's registries import any dotted name they are given."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            here = f"{key_path}.{key}"
            if not isinstance(key, str):
                raise _err(obj, key, f"{here}: config keys are strings, got {key!r}")
            if key == "type":
                if not isinstance(value, str) or not _TYPE_RE.match(value):
                    raise _err(obj, key, f"{here}: '{value}' is not a registered class name; a type names a "
                                         f"class registered in mmdet / mmseg / mmengine / mmcv (e.g. ResNet, "
                                         f"GN, mmdet.FPN), never an import path")
                refs.append((value, obj.where(key) if isinstance(obj, Node) else key_path, here))
            elif key == "_scope_" and value not in TYPE_SCOPES:
                raise _err(obj, key, f"{here}: scope '{value}' is not one of {', '.join(TYPE_SCOPES)}")
            _scan_types(value, value, here, refs)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            _scan_types(value, node, f"{key_path}[{i}]", refs)


def _architecture(m: Any, where: str) -> dict[str, Any]:
    """``{"name": ..., "arch": ...}`` of a model entry: a catalog architecture (``arch:``),
    or one described from the OpenMMLab config it names (``config:``, see
    :mod:`harness.suite.zoo`), which the model then carries (``config``, ``arch_meta``)."""
    name = where.split(".", 1)[1]
    arch, config = m.get("arch"), m.get("config")
    if arch is not None and config is not None:
        raise _err(m, "config", f"{where}: give arch or config, not both (arch names a bundled config itself)")
    if config is None:
        if arch not in catalog.ARCHS:
            raise _err(m, "arch", f"{where}.arch: {catalog.ARCHS.unknown_message(str(arch))}"
                                  + ("" if arch is not None else "; or name an OpenMMLab config with 'config:'"))
        return {"name": name, "arch": arch}
    ref = str(config) if "::" in str(config) else os.path.abspath(_expand(m, "config", str(config), f"{where}.config"))
    why = zoo.check_reference(ref)
    if why is not None:
        raise _err(m, "config", f"{where}.config: {why}")
    try:
        meta = zoo.describe(ref)
    except Exception as exc:             # the config's own error (a missing _base_, a bad key)
        raise _err(m, "config", f"{where}.config: '{ref}' cannot be read as an mmdet / mmseg model config: "
                                f"{type(exc).__name__}: {exc}") from None
    return {"name": name, "arch": meta["name"], "config": ref, "arch_meta": meta}


def _models(doc: Node, key: str, schedule: dict[str, Any], pretrained: Any, resources: dict[str, Any],
            refs: list[tuple[str, str, str]]) -> dict[str, dict]:
    """The suite's teachers or students; ``pretrained`` and ``resources`` are the suite's
    defaults (a model's own ``resources`` keys override the suite's one by one)."""
    out = {}
    for name, m in doc[key].items():
        model = _architecture(m, f"{key}.{name}")
        for part in ("backbone", "neck", "head", "model"):
            if m.get(part) is not None:
                _scan_types(m[part], m[part], f"{key}.{name}.{part}", refs)
                model[part] = _plain(m[part])
        if m.get("checkpoint") and str(m["checkpoint"]).startswith(DOWNLOAD_SCHEMES):
            # fetched into the cache once it is known
            model["checkpoint_url"] = _no_credentials(m, "checkpoint", f"{key}.{name}.checkpoint", str(m["checkpoint"]))
        elif m.get("checkpoint"):
            ckpt = os.path.abspath(_expand(m, "checkpoint", m["checkpoint"], f"{key}.{name}.checkpoint"))
            if not Path(ckpt).is_file():
                raise _err(m, "checkpoint", f"{key}.{name}.checkpoint: '{ckpt}' is not a file; give a "
                                            f"local checkpoint path, or leave 'checkpoint' out to "
                                            f"have the harness train this teacher")
            model["checkpoint"] = ckpt
        model["pretrained"] = _pretrained(m, "pretrained", f"{key}.{name}.pretrained", pretrained)
        if catalog.arch_of(model)["task"] == "cls" and isinstance(model["pretrained"], str):
            raise _err(m, "pretrained", f"{key}.{name}.pretrained: classifiers are built by torchvision from "
                                        f"scratch (SSLD and Hinton KD train their students so); a checkpoint "
                                        f"cannot be given here")
        model["schedule"] = _schedule(doc, m.get("schedule"), schedule, (key, name, "schedule"))
        own = validate(Resources, m["resources"], doc, doc.file if isinstance(doc, Node) else "<suite>",
                       (key, name, "resources")).model_dump(exclude_unset=True) if m.get("resources") else {}
        model["resources"] = {**resources, **own}
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
    out = []
    for item in doc["pairs"]:
        where = item if isinstance(item, Node) else doc
        key_of = (lambda k: k) if isinstance(item, Node) else (lambda k: "pairs")
        if isinstance(item, dict):
            t, s, only = item.get("teacher"), item.get("student"), item.get("methods")
        else:
            t, s, only = item[0], item[1], None
        for role, name, known in (("teacher", t, teachers), ("student", s, students)):
            if name not in known:
                raise _err(where, key_of(role), f"pair names {role} '{name}' which is not under '{role}s'"
                                                f"{suggest(str(name), list(known))}; valid: {', '.join(known)}")
        if only is not None:
            for label in only:
                if label not in methods:
                    raise _err(where, key_of("methods"), f"pair {t} -> {s} names method '{label}' which is not "
                                                         f"under 'methods'{suggest(str(label), list(methods))}; "
                                                         f"valid: {', '.join(methods)}")
            only = ["none"] + [m for m in only if m != "none"]
        if (t, s) in [(a, b) for a, b, _ in out]:
            raise _err(where, key_of("teacher"), f"the pair {t} -> {s} is given twice")
        out.append((t, s, only))
    return out


# ------------------------------------------------------------------------------- main
def load_suite(path: str | Path, output_roots: list[str] | tuple[str, ...] = (),
               seeds_for: dict[tuple[str, str, str, str], list[int]] | None = None, fetch: bool = True) -> Suite:
    """Load, merge and validate a suite and expand its trial matrix. Imports no backend.
    ``seeds_for``: (dataset, teacher, student, method label) -> the seeds of that cell,
    instead of the suite's (a run adding seeds until each gain is precise). ``fetch``:
    download a teacher's checkpoint URI not yet in the cache (``run``); without it
    (``plan``, which stays offline and read-only) such a teacher is listed in
    ``suite.pending_downloads`` and its trials' ids are provisional (the checkpoint's
    content is part of them).

    Every place the run will write (``output``, ``teacher_cache``, synthetic datasets)
    must resolve under the working directory, ``$KD_HARNESS_OUTPUT_ROOT`` or one of
    ``output_roots``.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise SuiteError(f"{path}: is a directory; give a suite file, e.g. suites/demo.yaml")
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:        # a symlink loop
        raise SuiteError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    doc = _load_with_extends(resolved)
    file = str(path.resolve())
    validate(SuiteDoc, doc, doc, file)           # types and ranges of every key
    roots = allowed_roots(output_roots)
    name = str(doc.get("name") or path.stem)
    if not doc.get("name"):
        try:
            check_name(name)
        except ValueError as exc:
            raise SuiteError(f"{file}: the suite's name comes from the file name: {exc}; give 'name:'") from None
    schedule = _schedule(doc, doc.get("schedule"), SCHEDULE_DEFAULTS, ("schedule",))
    resources = validate(Resources, doc.get("resources") or {}, doc, file, ("resources",)).model_dump()
    datasets = _datasets(doc, roots)
    pretrained = _pretrained(doc, "pretrained", "pretrained")
    refs: list[tuple[str, str, str]] = []
    teachers = _models(doc, "teachers", schedule, pretrained, resources, refs)
    students = _models(doc, "students", schedule, pretrained, resources, refs)
    methods = _methods(doc)
    pairs = _pairs(doc, teachers, students, methods)
    _check_tasks(doc, datasets, teachers, students, pairs, methods)
    # seeds until precise: the rule with its defaults filled (every reader of it sees them)
    rule = SeedRule.model_validate(doc["seeds"]).model_dump() if isinstance(doc.get("seeds"), dict) else None
    seeds = list(range(rule["first"])) if rule else list(doc.get("seeds", [0]))
    most = rule["max"] if rule else len(seeds)
    bound = len(datasets) * len(pairs) * (len(methods) + 1) * most + len(datasets) * len(pairs)
    if bound > MAX_TRIALS:
        raise _err(doc, "seeds", f"the matrix has up to {bound} trials ({len(datasets)} dataset(s) x {len(pairs)} "
                                 f"pair(s) x {len(methods)} method(s) x {most} seed(s)); a suite runs at most "
                                 f"{MAX_TRIALS}: split it into several suites")
    # absolute: Ray trials may run in another working directory (or on another node)
    output = os.path.abspath(_expand(doc, "output", str(doc.get("output") or f"results/{name}"), "output"))
    _contained(output, doc, "output" if "output" in doc else None, "output", roots)
    cache = os.path.abspath(_expand(doc, "teacher_cache", str(doc.get("teacher_cache")
                                                             or Path(output).parent / "_teachers"), "teacher_cache"))
    _contained(cache, doc, "teacher_cache" if "teacher_cache" in doc else None, "teacher_cache", roots)
    storage = _storage(doc, roots)
    pending: dict[str, str] = {}
    for t_name, teacher in teachers.items():        # checkpoint URLs: downloaded once, before anything runs
        if teacher.get("checkpoint_url") and not fetch:
            teacher["checkpoint"], digest = cached_checkpoint(teacher["checkpoint_url"], cache)
            if digest is None:
                pending[t_name] = teacher["checkpoint_url"]
        elif teacher.get("checkpoint_url"):
            try:
                teacher["checkpoint"], _ = fetch_checkpoint(teacher["checkpoint_url"], cache)
            except ValueError as exc:
                raise _err(doc["teachers"][t_name], "checkpoint", f"teachers.{t_name}.checkpoint: {exc}") from None
    teacher_seed = int(doc.get("teacher_seed", 0))
    for key, models in (("teachers", teachers), ("students", students)):
        for m_name, m in models.items():
            if m["schedule"].get("amp") and not float(m["resources"]["gpu"]):
                where = (key, m_name, "schedule") if "schedule" in (doc[key][m_name] or {}) else ("schedule",)
                raise _err(doc, where[0], f"{'.'.join(where)}.amp: mixed precision needs a GPU (mmengine's "
                                          f"AmpOptimWrapper runs on CUDA) but resources.gpu is 0; set "
                                          f"resources.gpu or amp: false")
    search = _search(doc, methods) if doc.get("search") is not None else None
    for label in doc.get("tuned") or {}:
        if label not in methods:
            raise _err(doc["tuned"], label, f"tuned: '{label}' is not a method label of the suite; valid: "
                                            f"{', '.join(methods)}")

    merged = dict(doc)
    merged.update(name=name, output=output, teacher_cache=cache, schedule=schedule, resources=resources,
                  search=search, storage=storage, **({"seeds": rule} if rule else {}),
                  baselines=Baselines.model_validate(doc.get("baselines") or {}).model_dump())
    suite = Suite(name=name, file=str(path), doc=merged, type_refs=refs,
                  where={k: doc.where(k) for k in doc} if isinstance(doc, Node) else {}, pending_downloads=pending)
    common = dict(suite=name, output_dir=output, storage=storage)
    teacher_trials: dict[tuple[str, str], TrialSpec] = {}
    for ds in datasets.values():
        ds_id = {k: v for k, v in ds.items() if k != "task"}
        for t_name, s_name, only in pairs:
            if catalog.arch_of(teachers[t_name])["task"] != ds["task"]:
                continue                     # a pair serves the datasets of its own task
            teacher = teachers[t_name]
            s_sched, s_res = students[s_name]["schedule"], students[s_name]["resources"]
            student = {k: v for k, v in students[s_name].items() if k not in ("schedule", "resources")}
            t_sched, t_res = teacher["schedule"], teacher["resources"]
            t_model = {k: v for k, v in teacher.items() if k not in ("schedule", "resources")}
            if (ds["name"], t_name) not in teacher_trials:
                if t_name in pending:        # (plan) not downloaded: no content to identify it by yet
                    t_ckpt, t_source = teacher["checkpoint"], f"not downloaded: {pending[t_name]}"
                elif teacher.get("checkpoint"):
                    t_ckpt, t_source = teacher["checkpoint"], file_sha256(teacher["checkpoint"])
                else:
                    key = teacher_key(t_model, ds_id, t_sched, teacher_seed)
                    t_ckpt, t_source = str(Path(cache) / f"{ds['name']}-{t_name}-{key}" / "teacher.pth"), None
                spec = TrialSpec(task=ds["task"], role="teacher", dataset=ds_id, model=t_model, method="teacher",
                                 method_name="teacher", seed=teacher_seed, schedule=t_sched,
                                 teacher_checkpoint=t_ckpt, teacher_id=t_source, resources=t_res, **common)
                teacher_trials[(ds["name"], t_name)] = spec
                suite.trials.append(spec)
            t_spec = teacher_trials[(ds["name"], t_name)]
            family = catalog.arch_of(student)["family"]
            for label, (method, overrides, where) in methods.items():
                if (only is not None and label not in only) or ds["task"] not in catalog.METHODS.get(method)["tasks"]:
                    continue
                _check_serves(label, method, where, teacher, student)
                distilled = method != "none"
                entry = doc["methods"].get(label) if isinstance(doc.get("methods"), dict) else None
                m_sched = _schedule(doc, entry.get("schedule"), s_sched, ("methods", label, "schedule")) \
                    if isinstance(entry, dict) and entry.get("schedule") is not None else s_sched
                for seed in (seeds_for or {}).get((ds["name"], t_name, s_name, label), seeds):
                    suite.trials.append(TrialSpec(
                        task=ds["task"], role="student", dataset=ds_id, model=dict(student),
                        method=label, method_name=method,
                        params=catalog.method_params(method, family, overrides),
                        seed=seed, schedule=m_sched, teacher=t_model if distilled else None,
                        teacher_checkpoint=t_spec.teacher_checkpoint if distilled else None,
                        # the teacher's whole identity (its schedule, seed, data, checkpoint's
                        # content): a student of a changed teacher is a new trial
                        teacher_id=t_spec.trial_id if distilled else None, resources=s_res, **common))
    unique: dict[str, TrialSpec] = {}
    for trial in suite.trials:   # `none` is shared by every pair with the same student
        unique.setdefault(trial.trial_id, trial)
    suite.trials = list(unique.values())
    return suite
