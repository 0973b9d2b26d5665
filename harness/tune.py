"""Scheduling a suite's trials on Ray Tune: the only module that imports Ray.

Two phases: first the teachers (each trained once per (teacher, dataset, schedule) and
cached, or only evaluated when the suite gives a checkpoint), then every student trial,
all through ``Tuner`` with the trial matrix as a grid search space and the suite's
per-trial resources. Each trial writes its own rows; a failed trial leaves an error
row and the others go on. A re-run skips the trials whose rows say ``ok``.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from . import results
from .spec import TrialSpec
from .suite import Suite

log = logging.getLogger(__name__)


def _trainable(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one trial spec in, metrics reported at each evaluation."""
    from ray import tune

    from .trial import execute_trial

    spec = TrialSpec.from_dict(config["trial"])
    rows, exc = execute_trial(spec, report=tune.report)
    if exc is not None:
        raise exc


def _progress_callback() -> Any:
    """One console line per evaluation and per finished or failed trial, instead of
    Tune's tables of every trial's whole configuration."""
    from ray import tune

    class Progress(tune.Callback):
        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            shown = ", ".join(f"{k}={v:.3f}" for k, v in result.items()
                              if isinstance(v, float) and not k.startswith(("time", "timestamp", "_")))
            print(f"  {trial.custom_trial_name or trial}: epoch {result.get('epoch', '?')}: {shown}", flush=True)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            print(f"  done   {trial.custom_trial_name or trial}", flush=True)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            print(f"  FAILED {trial.custom_trial_name or trial} (error row written; see its error.txt)", flush=True)

    return Progress()


def _trial_dirname(trial: Any) -> str:
    spec = TrialSpec.from_dict(trial.config["trial"])
    return f"{spec.role}-{spec.method}-s{spec.seed}-{spec.trial_id}"


def _fit(suite: Suite, phase: str, specs: list[TrialSpec]) -> list[dict[str, Any]]:
    from ray import tune

    res = suite.doc["resources"]
    trainable = tune.with_resources(_trainable, {"cpu": float(res["cpu"]), "gpu": float(res["gpu"])})
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([s.to_dict() for s in specs])},
        tune_config=tune.TuneConfig(num_samples=1, reuse_actors=False, trial_dirname_creator=_trial_dirname,
                                    trial_name_creator=lambda t: TrialSpec.from_dict(t.config["trial"]).name),
        run_config=tune.RunConfig(
            name=f"{suite.name}-{phase}", storage_path=str((Path(suite.output) / "ray").resolve()),
            failure_config=tune.FailureConfig(max_failures=0), verbose=0, callbacks=[_progress_callback()]),
    )
    print(f"{phase}: {len(specs)} trial(s) on Ray Tune, {res['cpu']} CPU / {res['gpu']} GPU each", flush=True)
    grid = tuner.fit()
    summary = []
    for result in grid:
        spec = TrialSpec.from_dict(result.config["trial"])
        rows_file = results.rows_dir(suite.output) / f"{spec.trial_id}.parquet"
        error = str(result.error) if result.error else ""
        if not rows_file.exists():
            # Trials write their rows where they run: on a multi-node cluster the output
            # directory must be on storage every node shares, as Ray's storage_path must.
            error = error or f"the trial ended but its rows are not at {rows_file}"
            from .trial import result_rows
            results.write_trial_rows(suite.output, spec.trial_id, result_rows(
                spec, None, error + " (on a multi-node cluster, put 'output' on shared storage)", 0.0))
        summary.append({"trial": spec.name, "error": error})
    return summary


def pending_trials(suite: Suite, resume: bool = True) -> tuple[list[TrialSpec], list[TrialSpec]]:
    """(teacher trials, student trials) still to run; with ``resume`` finished ones are
    skipped (a teacher only while its checkpoint is still there)."""
    done = results.finished_trials(suite.output) if resume else set()
    teachers = [t for t in suite.teacher_trials()
                if t.trial_id not in done or not Path(t.teacher_checkpoint or "").is_file()]
    students = [t for t in suite.student_trials() if t.trial_id not in done]
    return teachers, students


def run_suite(suite: Suite, address: str | None = None, resume: bool = True,
              num_cpus: int | None = None, verbose: bool = False) -> dict[str, Any]:
    """Run every pending trial of a validated suite on Ray Tune and consolidate the store.

    ``verbose`` forwards the trials' own output (mmengine logs) to this console; it is
    always in each trial's directory.
    """
    import ray

    out = Path(suite.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(
        {"suite": suite.doc, "trials": [t.to_dict() for t in suite.trials]}, indent=1, default=str))
    teachers, students = pending_trials(suite, resume)
    skipped = len(suite.trials) - len(teachers) - len(students)
    summary: dict[str, Any] = {"skipped": skipped, "trials": []}
    if teachers or students:
        os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
        started = not ray.is_initialized()
        if started:
            ray.init(address=address, include_dashboard=False, num_cpus=None if address else num_cpus,
                     logging_level=logging.WARNING, log_to_driver=verbose)
        try:
            for phase, specs in (("teachers", teachers), ("students", students)):
                if specs:
                    summary["trials"] += _fit(suite, phase, specs)
        finally:
            if started:
                ray.shutdown()
    summary["results"] = str(results.consolidate(out) or "")
    return summary
