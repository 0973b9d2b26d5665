"""The results store: its schema (every column documented, versioned) and atomic I/O.

Layout under a suite's output directory::

    rows/<trial_id>.parquet   one file per trial, written when the trial ends
    results.parquet           all rows of the suite, rewritten at the end of a run

Every file is written to a temporary name in the same directory and renamed into
place, so a reader never sees a half-written file, and a crash loses at most the trial
that was running. ``rows/`` is the source of truth; a resumed run skips the trials
whose row file says ``status == "ok"``.
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1

#: column -> (arrow type, meaning). One row per (trial, metric).
COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "schema_version": (pa.int32(), "version of this schema"),
    "suite": (pa.string(), "suite name"),
    "trial_id": (pa.string(), "content hash of what determines the trial's result"),
    "trial_name": (pa.string(), "readable dataset/teacher->student/method/seed"),
    "task": (pa.string(), "det | seg | cls"),
    "dataset": (pa.string(), "dataset name in the suite"),
    "role": (pa.string(), "'teacher' (the teacher's own score) or 'student'"),
    "teacher": (pa.string(), "teacher name; empty for the student alone ('none')"),
    "student": (pa.string(), "student name; for role 'teacher', empty"),
    "method": (pa.string(), "method label in the suite ('teacher' for the teacher's row)"),
    "method_name": (pa.string(), "registered method name"),
    "params": (pa.string(), "method hyperparameters as JSON (sorted keys)"),
    "seed": (pa.int64(), "random seed of the trial"),
    "metric": (pa.string(), "metric name, e.g. bbox_mAP; '' on an error row"),
    "value": (pa.float64(), "metric value (COCO AP in [0, 1]); NaN on an error row"),
    "higher_is_better": (pa.bool_(), "direction of the metric"),
    "primary": (pa.bool_(), "whether this is the task's leaderboard metric"),
    "epoch": (pa.int64(), "training epoch (or iteration) of the evaluation"),
    "status": (pa.string(), "'ok' or 'error'"),
    "error": (pa.string(), "error message (last line and type) when status is 'error'"),
    "wall_time_s": (pa.float64(), "wall time of the whole trial, seconds"),
    "train_images_per_s": (pa.float64(), "training throughput: images per second of training"),
    "device": (pa.string(), "device the trial ran on, e.g. cpu or cuda:0 (NVIDIA H100)"),
    "code_version": (pa.string(), "harness version and git commit of the code that ran"),
    "config_hash": (pa.string(), "hash of the full trial spec, resources and paths included"),
    "timestamp": (pa.string(), "UTC time the row was written, ISO 8601"),
}
SCHEMA = pa.schema([(name, typ) for name, (typ, _) in COLUMNS.items()])


def code_version() -> str:
    """``<package version>+g<commit>[.dirty]``; only the version outside a git checkout."""
    from . import __version__
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{sha}{'.dirty' if dirty else ''}" if sha else __version__


def to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Rows -> a table with exactly :data:`SCHEMA`; a missing or extra column is an error."""
    rows = list(rows)
    for row in rows:
        missing, extra = set(COLUMNS) - set(row), set(row) - set(COLUMNS)
        if missing or extra:
            raise ValueError(f"result row does not match the schema: missing {sorted(missing)}, "
                             f"extra {sorted(extra)}")
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def write_atomic(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write a Parquet file so that ``path`` is either absent, old, or complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def rows_dir(output: str | os.PathLike) -> Path:
    return Path(output) / "rows"


def write_trial_rows(output: str | os.PathLike, trial_id: str, rows: list[dict[str, Any]]) -> Path:
    return write_atomic(to_table(rows), rows_dir(output) / f"{trial_id}.parquet")


def read_results(path: str | os.PathLike) -> "Any":
    """A pandas DataFrame of a store: a suite directory (its ``rows/``), or one Parquet file."""
    import pandas as pd
    path = Path(path)
    if path.is_file():
        return pq.read_table(path).to_pandas()
    files = sorted(rows_dir(path).glob("*.parquet")) if path.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no results under '{path}' (expected {rows_dir(path)}/*.parquet "
                                f"or a .parquet file); run a suite first: python -m harness run SUITE")
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


def finished_trials(output: str | os.PathLike) -> set[str]:
    """Trial ids whose rows are all ``ok``: a resumed run does not redo them."""
    done = set()
    for f in rows_dir(output).glob("*.parquet"):
        status = pq.read_table(f, columns=["status"]).column("status").to_pylist()
        if status and all(s == "ok" for s in status):
            done.add(f.stem)
    return done


def consolidate(output: str | os.PathLike) -> Path | None:
    """Rewrite ``results.parquet`` from ``rows/`` (atomically); None when there are no rows."""
    files = sorted(rows_dir(output).glob("*.parquet"))
    if not files:
        return None
    table = pa.concat_tables([pq.read_table(f).cast(SCHEMA) for f in files])
    return write_atomic(table, Path(output) / "results.parquet")


def params_json(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)
