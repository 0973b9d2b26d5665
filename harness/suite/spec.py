"""The unit of work: one :class:`TrialSpec` per cell of a suite's matrix.

A spec is plain data (JSON-serialisable), so it can be the Ray Tune search space,
be written next to results, and be hashed. Its ``trial_id`` is a content hash of
everything that determines the result (not of paths or resources), which is what makes
a resumed run skip finished work and what keys a shared teacher checkpoint.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


def content_hash(obj: Any, n: int = 12) -> str:
    """A short stable hash of a JSON-serialisable object (key order does not matter)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


@dataclass
class TrialSpec:
    """One training (or teacher evaluation) run and everything needed to do it.

    ``role`` is ``"teacher"`` for the run that trains (or, given a checkpoint, only
    evaluates) a teacher, and ``"student"`` for a student trained with ``method``.
    """

    suite: str
    task: str
    role: str
    dataset: dict[str, Any]
    model: dict[str, Any]
    method: str = "none"          # label in the suite (usually the registry name)
    method_name: str = "none"     # registry name
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    schedule: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, Any] | None = None        # the teacher model, for students
    teacher_checkpoint: str | None = None        # where the teacher's weights are / will be
    #: what the teacher is: for a student, the teacher trial's ``trial_id`` (its model,
    #: data, schedule, seed and checkpoint); for a teacher given as a file, its sha256
    teacher_id: str | None = None
    resources: dict[str, Any] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    output_dir: str = "results"
    #: the run's storage (see :mod:`harness.store.storage`); None: node-local paths only
    storage: str | None = None
    #: for a student: the sha256 its teacher trial reported for the weights it wrote
    teacher_sha256: str | None = None
    #: a compute-matched baseline (the student alone on a stretched schedule):
    #: ``{"to": "<teacher>/<method label>", "target_device_hours": <the distilled trial's>}``
    matched: dict[str, Any] | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__.pop("_trial_id", None)        # a field changed: the id is computed again
        object.__setattr__(self, name, value)

    def identity(self) -> dict[str, Any]:
        """What determines the result: hashed into ``trial_id``."""
        ident = {f.name: getattr(self, f.name) for f in fields(self)
                 if f.name not in ("suite", "resources", "output_dir", "method", "teacher_checkpoint", "storage",
                                   "teacher_sha256", "matched")}
        ident["dataset"] = {k: v for k, v in self.dataset.items() if k != "name"}
        if self.teacher is not None:
            ident["teacher"] = {k: v for k, v in self.teacher.items() if k != "name"}
        ident["model"] = {k: v for k, v in self.model.items() if k != "name"}
        # how often the state is saved and how batches reach the device do not change the
        # result; mixed precision does, when it is on (off keeps earlier trial ids)
        sched = {k: v for k, v in self.schedule.items() if k not in ("checkpoint_interval", "pin_memory")}
        if not sched.get("amp"):
            sched.pop("amp", None)
            sched.pop("amp_dtype", None)
        ident["schedule"] = sched
        if self.matched:             # one baseline per distilled cell it is matched to
            ident["matched_to"] = self.matched["to"]
        workers = int(self.resources.get("workers", 1))
        if workers > 1:              # the global batch is workers x batch_size
            ident["workers"] = workers
        if self.teacher is not None and (workers > 1 or sched.get("iters")):
            # a distiller on several workers or an iteration-based schedule saw epoch 0 of 1
            # throughout (and no per-epoch step) before 2026-12: those rows are never
            # pooled with, nor taken for, what the harness computes now
            ident["distiller_epochs"] = 2
        return ident

    @property
    def trial_id(self) -> str:
        """Computed once per spec (a suite of 20,000 trials asks for each id several
        times); setting a field forgets it. Specs are not changed in place otherwise:
        ``dataclasses.replace`` makes a new one."""
        tid = self.__dict__.get("_trial_id")
        if tid is None:
            tid = self.__dict__["_trial_id"] = content_hash(self.identity())
        return tid

    @property
    def name(self) -> str:
        """Readable name: dataset/teacher->student/method/seed."""
        if self.role == "teacher":
            return f"{self.dataset['name']}/{self.model['name']}/teacher"
        pair = f"{self.teacher['name']}->{self.model['name']}" if self.teacher else self.model["name"]
        method = f"{self.method}@compute-of-{self.matched['to'].replace('/', '.')}" if self.matched else self.method
        return f"{self.dataset['name']}/{pair}/{method}/s{self.seed}"

    @property
    def trial_dir(self) -> Path:
        return Path(self.output_dir) / "trials" / self.trial_id

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrialSpec":
        return cls(**data)


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's content (cached per path, size and modification time)."""
    st = Path(path).stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def teacher_key(model: dict[str, Any], dataset: dict[str, Any], schedule: dict[str, Any],
                seed: int) -> str:
    """Key of a harness-trained teacher: a hash of what determines its weights."""
    return content_hash({
        "model": {k: v for k, v in model.items() if k not in ("name", "checkpoint")},
        "dataset": {k: v for k, v in dataset.items() if k != "name"},
        "schedule": schedule, "seed": seed,
    })
