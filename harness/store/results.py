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

import functools
import json
import os
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 6
#: Parquet key-value metadata key holding the schema version of a file
VERSION_KEY = b"kd_harness.schema_version"

#: column -> (arrow type, meaning). One row per (trial, metric). Version 2 added every
#: column from ``versions`` on, version 3 every column from ``node`` on; an older file is
#: upgraded on read (the columns it lacks are null).
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
    "status": (pa.string(), "'ok'; 'error' (the trial raised, or its worker died more often than max_failures "
                            "allows), 'diverged' (its loss became NaN or infinite), 'interrupted' (the run was "
                            "stopped), 'pruned' (a search stopped it early) or 'dry_run' (run --dry-run: nothing "
                            "was trained); only 'ok' rows reach a leaderboard"),
    "error": (pa.string(), "error message (last line and type) when status is 'error'"),
    "wall_time_s": (pa.float64(), "wall time of the whole trial, seconds"),
    "train_images_per_s": (pa.float64(), "training throughput: images per second of training"),
    "device": (pa.string(), "device the trial ran on, e.g. cpu or cuda:0 (NVIDIA H100)"),
    "code_version": (pa.string(), "harness version and git commit of the code that ran"),
    "config_hash": (pa.string(), "hash of the full trial spec, resources and paths included"),
    "timestamp": (pa.string(), "UTC time the row was written, ISO 8601"),
    # ---- version 2: provenance, cost, best epoch, curves
    "versions": (pa.string(), "JSON {package: version} of torch, torchvision, mmcv, mmdet, mmseg, mmengine, ray"),
    "dataset_fingerprint": (pa.string(), "sha256 of the dataset's annotation files and image list (names, sizes)"),
    "schedule_hash": (pa.string(), "hash of the training schedule: trials to compare must share it"),
    "teacher_sha256": (pa.string(), "sha256 of the teacher checkpoint file the trial used (teacher rows: the one "
                                    "it wrote or evaluated); '' for the student alone"),
    "teacher_weights_hash": (pa.string(), "hash of the teacher's weights as held in memory during the trial: equal "
                                          "to the teacher row's means the trial ran with that checkpoint, unchanged"),
    "device_count": (pa.int64(), "accelerators the trial held (0 on the CPU)"),
    "started_at": (pa.string(), "UTC start of the trial, ISO 8601"),
    "ended_at": (pa.string(), "UTC end of the trial, ISO 8601"),
    "device_hours": (pa.float64(), "wall hours x devices held (GPUs, or CPUs when it held no GPU)"),
    "peak_memory_mb": (pa.float64(), "peak accelerator memory allocated (GPU) or peak resident memory (CPU), MiB"),
    "train_images_per_s_no_teacher": (pa.float64(), "training images per second without the teacher's forward time"),
    "teacher_time_share": (pa.float64(), "share of the training step time spent in the teacher's forward"),
    "best_value": (pa.float64(), "best value of this metric over the trial's evaluations"),
    "best_epoch": (pa.int64(), "epoch (or iteration) of best_value"),
    "curve": (pa.string(), "JSON [[epoch, value], ...]: this metric at every evaluation"),
    "search_id": (pa.string(), "id of the hyperparameter search the trial belongs to; '' for suite trials"),
    # ---- version 3: placement, workers, resumption, retries
    "node": (pa.string(), "Ray node id of the node the trial ran on (its first worker's); '' outside Ray"),
    "node_ip": (pa.string(), "IP address of that node"),
    "accelerator_ids": (pa.string(), "JSON list of the GPU ids Ray gave the trial (its first worker's)"),
    "workers": (pa.int64(), "data-parallel workers the trial trained on (Ray Train); 1 for a single process"),
    "resumed_from": (pa.int64(), "epoch (or iteration) of the checkpoint the trial resumed from; 0 from scratch"),
    "attempts": (pa.int64(), "times the trial was started: 1, plus one per retry after its worker or node died"),
    # ---- version 4: what the dataset check before the run let through
    "data_warnings": (pa.string(), "JSON [{kind, file, entry, what, count}]: the warnings of the dataset's check "
                                   "before the run (e.g. boxes partly outside their image, clipped); '[]' when none"),
    # ---- version 5: compute-matched baselines
    "train_iters": (pa.int64(), "optimizer steps the trial trained (its last stage's count plus the stages before)"),
    "matched_to": (pa.string(), "for a compute-matched baseline (the student alone on a stretched schedule): the "
                                "distilled cell it matches, '<teacher>/<method label>'; '' otherwise"),
    "matched_target_hours": (pa.float64(), "for a compute-matched baseline: the device-hours of the distilled "
                                           "trial (same seed) it was stretched to match; null otherwise"),
    # ---- version 6: the schedule itself, not only its hash
    "schedule": (pa.string(), "JSON: the schedule the trial trained on (epochs or iters, lr, weight decay, policy, "
                              "...), whose hash is schedule_hash; null in rows written before version 6"),
}
#: columns a version-1 file lacks (added as nulls on read); later versions likewise
V2_COLUMNS = list(COLUMNS)[list(COLUMNS).index("versions"):]
#: columns a version-2 file lacks
V3_COLUMNS = list(COLUMNS)[list(COLUMNS).index("node"):]
SCHEMA = pa.schema([(name, typ) for name, (typ, _) in COLUMNS.items()])

# Result files are shared (a team reads one store): they get the permissions the
# user's umask gives any new file, not mkstemp's private 0600.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


@functools.lru_cache(maxsize=None)       # (one process: one checkout; two git calls per row otherwise)
def code_version() -> str:
    """``<package version>+g<commit>[.dirty]``; only the version outside a git checkout."""
    from harness import __version__
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
    return pa.Table.from_pylist(rows, schema=SCHEMA.with_metadata({VERSION_KEY: str(SCHEMA_VERSION).encode()}))


def _atomic(path: str | os.PathLike, write: "Any") -> Path:
    """``write(tmp)`` then rename onto ``path``: a reader sees the old file or the new
    one, never half of one; the temporary file is removed whatever happens."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_atomic(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write a Parquet file so that ``path`` is either absent, old, or complete."""
    return _atomic(path, lambda tmp: pq.write_table(table, tmp))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return _atomic(path, lambda tmp: Path(tmp).write_text(text))


def remove_stale_temporaries(directory: str | os.PathLike) -> int:
    """Remove ``.*.tmp`` files a killed writer left behind (call with the run lock held)."""
    n = 0
    for tmp in Path(directory).rglob(".*.tmp"):
        try:
            tmp.unlink()
            n += 1
        except OSError:
            pass
    return n


def rows_dir(output: str | os.PathLike) -> Path:
    return Path(output) / "rows"


def write_trial_rows(output: str | os.PathLike, trial_id: str, rows: list[dict[str, Any]]) -> Path:
    return write_atomic(to_table(rows), rows_dir(output) / f"{trial_id}.parquet")


class NewerSchema(ValueError):
    """A file written by a newer harness than this one."""


def file_version(table: pa.Table) -> int:
    meta = table.schema.metadata or {}
    if VERSION_KEY in meta:
        return int(meta[VERSION_KEY])
    if "schema_version" in table.column_names and table.num_rows:
        return int(max(table.column("schema_version").to_pylist()))
    return 1


class NotResults(ValueError):
    """A file that is not a results store (another Parquet file, wrong columns, no rows)."""


#: the columns every version of the schema has: a file without them is not a results store
V1_COLUMNS = list(COLUMNS)[:list(COLUMNS).index("versions")]


def upgrade(table: pa.Table, source: str | os.PathLike = "<table>") -> pa.Table:
    """A table of any known schema version as the current :data:`SCHEMA`: version-1 rows
    get the version-2 columns as nulls; a newer version is an error that says so, and so
    is a table that is not a results store (columns of version 1 missing, none of its rows)."""
    missing = [c for c in V1_COLUMNS if c not in table.column_names]
    if missing:
        raise NotResults(f"{source}: not a kd-harness results file: it lacks the column(s) "
                         f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''} (a results store has "
                         f"the columns documented in harness/store/results.py)")
    if table.num_rows == 0:
        raise NotResults(f"{source}: a results file with no rows")
    version = file_version(table)
    if version > SCHEMA_VERSION:
        raise NewerSchema(f"{source}: written with results schema v{version}, but this harness reads up to "
                          f"v{SCHEMA_VERSION}; upgrade kd-harness to read it")
    for name in COLUMNS:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, COLUMNS[name][0]))
    table = table.select(list(COLUMNS))
    try:
        return table.cast(SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        for field in SCHEMA:            # name the column whose values are not what the schema says
            try:
                table.column(field.name).cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise NotResults(f"{source}: not a kd-harness results file: column '{field.name}' holds "
                                 f"{table.schema.field(field.name).type} values that are not {field.type} "
                                 f"({exc})") from None
        raise NotResults(f"{source}: not a kd-harness results file ({exc})") from None


def _read(f: Path, columns: list[str] | None = None, quarantine: bool = False) -> pa.Table | None:
    """One row file (upgraded to the current schema), or None (with a warning) when it
    cannot be read: one bad file must not break plan, run or report. Reading never
    changes the store, except with ``quarantine`` (a run or a search, with its lock
    held, reading what is done): the file is then moved to ``rows/corrupt/`` and its
    trial run again. A file from a newer harness is an error, never skipped."""
    try:
        table = upgrade(pq.read_table(f), f)
    except (OSError, pa.ArrowException, NotResults) as exc:
        where = f"the next run moves it to {f.parent / 'corrupt'} and runs its trial again"
        if quarantine:
            target = f.parent / "corrupt" / f.name
            try:
                target.parent.mkdir(exist_ok=True)
                os.replace(f, target)
                where = f"moved to {target}; its trial will be run again"
            except OSError as move_error:
                where = f"it could not be moved to {target.parent} ({move_error})"
        warnings.warn(f"skipping unreadable result file {f} ({type(exc).__name__}: {exc}); {where}", stacklevel=2)
        return None
    return table.select(columns) if columns else table


def read_results(path: str | os.PathLike, current_only: bool = True) -> "Any":
    """A pandas DataFrame of a store: a suite directory (its ``rows/``), or one Parquet file.

    For a suite directory, ``current_only`` keeps only the trials of the suite as it was
    last run (``suite.json``): rows of earlier configurations stay on disk but are not
    pooled with the current ones. ``current_only=False`` reads everything.
    """
    import pandas as pd
    path = Path(path)
    if path.is_file():
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise FileNotFoundError(f"'{path}' is not a readable Parquet file ({type(exc).__name__}: {exc})") from None
        return upgrade(table, path).to_pandas()
    files = sorted(rows_dir(path).glob("*.parquet")) if path.is_dir() else []
    current = current_trials(path) if current_only else None
    read = [(f, _read(f)) for f in files]
    # the suite as last run, and every search's trials (a report shows them in their own section)
    tables = [t for f, t in read if t is not None
              and (current is None or f.stem in current or any(t.column("search_id").to_pylist()))]
    if not tables:
        raise FileNotFoundError(f"no results under '{path}' (expected {rows_dir(path)}/*.parquet "
                                f"or a .parquet file); run a suite first: python -m harness run SUITE")
    return pd.concat([t.to_pandas() for t in tables], ignore_index=True)


def current_trials(output: str | os.PathLike) -> set[str] | None:
    """Trial ids of the suite as last run into ``output`` (None when unknown)."""
    try:
        return set(json.loads((Path(output) / "suite.json").read_text())["trial_ids"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def suite_record(output: str | os.PathLike) -> dict[str, Any]:
    """What a report needs of the suite as last run in ``output``, from its ``suite.json``
    (read once): ``datasets`` (format, root, classes per dataset), ``trials`` (the trial
    specs), ``seed_rule`` (the ``seeds:`` rule, or None for a seed list), ``tolerance``
    (of compute-matched baselines) and ``tuned`` (the labels a search chose); empty values when there is no record (a lone Parquet
    file, an older run)."""
    try:
        doc = json.loads((Path(output) / "suite.json").read_text())
    except (OSError, ValueError):
        doc = {}
    doc = doc if isinstance(doc, dict) else {}
    datasets, trials = doc.get("datasets"), doc.get("trials")
    suite = doc.get("suite") if isinstance(doc.get("suite"), dict) else {}
    seeds, baselines, tuned = suite.get("seeds"), suite.get("baselines"), suite.get("tuned")
    tolerance = baselines.get("tolerance") if isinstance(baselines, dict) else None
    return {"datasets": dict(datasets) if isinstance(datasets, dict) else {},
            "trials": [t for t in trials if isinstance(t, dict)] if isinstance(trials, list) else [],
            "seed_rule": seeds if isinstance(seeds, dict) else None,
            "tolerance": float(tolerance) if isinstance(tolerance, (int, float)) else 0.1,
            "tuned": {str(k): str(v) for k, v in tuned.items()} if isinstance(tuned, dict) else None}


def suite_datasets(output: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The datasets of the suite as last run in ``output`` (format, root, classes), from
    its ``suite.json``; empty when there is none (a lone Parquet file, an older run)."""
    return suite_record(output)["datasets"]


#: the statuses of a trial that failed on its own (it raised, or its loss diverged)
FAILED = ("error", "diverged")


def failed_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of ``rows`` that say their trial failed."""
    return [r for r in rows if r.get("status") in FAILED]


def finished_trials(output: str | os.PathLike, also: tuple[str, ...] = (), quarantine: bool = False) -> set[str]:
    """Trial ids whose rows are all ``ok`` (or one of the statuses ``also`` names: a dry
    run's ``dry_run``): a resumed run does not redo them. ``quarantine``: see :func:`_read`."""
    done, good = set(), {"ok", *also}
    for f in rows_dir(output).glob("*.parquet"):
        table = _read(f, columns=["status"], quarantine=quarantine)
        status = table.column("status").to_pylist() if table is not None else []
        if status and all(s in good for s in status):
            done.add(f.stem)
    return done


def teacher_sha256(output: str | os.PathLike, teacher_trial_id: str) -> str | None:
    """The sha256 of the weights a finished teacher trial wrote (from its rows), or None."""
    path = rows_dir(output) / f"{teacher_trial_id}.parquet"
    table = _read(path, columns=["status", "teacher_sha256"]) if path.is_file() else None
    if table is None:
        return None
    shas = {sha for status, sha in zip(table.column("status").to_pylist(), table.column("teacher_sha256").to_pylist())
            if status == "ok" and sha}
    return shas.pop() if len(shas) == 1 else None


def consolidate(output: str | os.PathLike) -> Path | None:
    """Rewrite ``results.parquet`` from ``rows/`` (atomically); None when there are no rows."""
    tables = [t for t in (_read(f) for f in sorted(rows_dir(output).glob("*.parquet"))) if t is not None]
    if not tables:
        return None
    table = pa.concat_tables(tables).replace_schema_metadata({VERSION_KEY: str(SCHEMA_VERSION).encode()})
    return write_atomic(table, Path(output) / "results.parquet")


def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on (not imported: read from metadata)."""
    from importlib import metadata
    out = {}
    for name in ("torch", "torchvision", "mmcv", "mmdet", "mmsegmentation", "mmengine", "ray"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = ""
    return out


def params_json(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)
