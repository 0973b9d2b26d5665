"""``harness run``: a suite's trials on one Ray Tune run.

A searcher hands out the trials in dependency order (the teachers first, each student as
soon as its own teacher ended), each with its model's resources (a trial with
``workers > 1`` trains on Ray Train workers, see :mod:`harness.run.workers`). Trial
processes are reused for later trials with the same resources. A trial reports its rows
as its last result and the driver writes them (no shared filesystem needed for
results); teacher weights and resumable states go through the run's storage
(:mod:`harness.store.storage`). A failed trial leaves an error row and the others go on;
a re-run skips the trials whose rows say ``ok``.
"""
from __future__ import annotations

import json
import sys
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.store import results, storage
from harness.suite.load import Suite
from harness.suite.spec import TrialSpec

from .session import (ROWS_KEY, _STOP, STARTED, Interrupted, RunState, _alive_nodes, _callbacks, _concurrency, _placement,
                      _ray_session, _resources, _rows_message, _write_status_rows, check_resources,
                      pending_trials, with_teacher_sha)
from .states import disk_full, teacher_lock


def _trainable(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one trial spec in; metrics reported at each
    evaluation, then the trial's rows (the driver writes them: no shared filesystem).
    A trial with ``resources.workers > 1`` trains on that many Ray Train workers."""
    from ray import tune

    from .trial import execute_trial

    spec = TrialSpec.from_dict(config["trial"])
    if int(spec.resources.get("workers", 1)) > 1 and not config.get("dry_run"):
        from .workers import train_on_workers
        with teacher_lock(spec):         # (its workers run under this lock: they do not take it)
            train_on_workers(spec, resume=config.get("resume", True))      # its workers report the rows
        return
    try:
        rows, _ = execute_trial(spec, report=tune.report, placement=_placement(), write=False,
                                resume=config.get("resume", True), dry_run=bool(config.get("dry_run")),
                                progress=tune.report)
    except Exception as exc:     # what execute_trial could not catch (a full disk as it wrote): an error row
        from .rows import result_rows
        rows = result_rows(spec, None, f"{type(exc).__name__}: {exc}", 0.0, placement=_placement())
    tune.report({ROWS_KEY: _rows_message(rows)})


class _DependencyOrder:
    """A Ray Tune searcher that hands out the suite's trials in dependency order: every
    teacher first, and each student as soon as its own teacher trial has ended (not when
    every teacher has). Of the trials ready, teachers go first, then distilled students,
    then students alone: a student alone needs nothing, so it fills slots that would
    otherwise idle while teachers train, and it does not hold back a distilled student
    whose chain (teacher, then student) is the longer one. Built lazily so that this
    module imports without Ray."""

    def __new__(cls, specs: list[TrialSpec], dry_run: bool, resume: bool) -> Any:
        from ray.tune.search import Searcher

        class DependencyOrder(Searcher):
            def __init__(self) -> None:
                super().__init__()
                self.waiting = sorted(specs, key=lambda s: (s.role != "teacher", s.method_name == "none"))
                self.teachers = {s.trial_id for s in specs if s.role == "teacher"}
                self.ended: set[str] = set()
                self.tune_ids: dict[str, str] = {}

            def suggest(self, trial_id: str) -> dict[str, Any] | None:
                for i, spec in enumerate(self.waiting):
                    if spec.role == "teacher" or spec.teacher_id not in self.teachers or \
                            spec.teacher_id in self.ended or dry_run:
                        self.waiting.pop(i)
                        self.tune_ids[trial_id] = spec.trial_id
                        return {"trial": with_teacher_sha(spec).to_dict(), "dry_run": dry_run, "resume": resume}
                return Searcher.FINISHED if not self.waiting else None     # None: ask again later

            def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
                self.ended.add(self.tune_ids.get(trial_id, ""))

        return DependencyOrder()


def _trial_dirname(trial: Any) -> str:
    spec = TrialSpec.from_dict(trial.config["trial"])
    return f"{spec.role}-{spec.method}-s{spec.seed}-{spec.trial_id}"


def _describe(requests: list[dict[str, Any]]) -> str:
    kinds = []
    for res in requests:
        workers = int(res.get("workers", 1))
        text = f"{workers} worker(s) x {res['cpu']:g} CPU / {res['gpu']:g} GPU" if workers > 1 else \
            f"{res['cpu']:g} CPU / {res['gpu']:g} GPU"
        if text not in kinds:
            kinds.append(text)
    return ", ".join(kinds) + (" each" if len(kinds) == 1 else " (per model)")


def _fit(suite: Suite, specs: list[TrialSpec], multi_node: bool, dry_run: bool = False,
         resume: bool = True) -> list[dict[str, Any]]:
    from ray import tune

    requests = [s.resources for s in specs]
    state = RunState(suite)
    tuner = tune.Tuner(
        # each trial its own model's request
        tune.with_resources(_trainable, lambda config: _resources(config["trial"]["resources"])),
        param_space={},
        # a trial's process is reused for the next trial with the same resources: torch,
        # mmengine and the models' libraries are imported once per worker, not per trial
        tune_config=tune.TuneConfig(num_samples=len(specs), reuse_actors=True,
                                    max_concurrent_trials=_concurrency(requests, _alive_nodes()),
                                    search_alg=_DependencyOrder(specs, dry_run, resume),
                                    trial_dirname_creator=_trial_dirname,
                                    trial_name_creator=lambda t: TrialSpec.from_dict(t.config["trial"]).name),
        run_config=tune.RunConfig(
            name=f"{suite.name}-{'dry-run' if dry_run else 'run'}",
            storage_path=storage.ray_path(suite.doc.get("storage"), suite.output),
            # a worker or node that dies is retried (the trial resumes from its last
            # checkpoint); a trial that raises reports an error row and is not
            failure_config=tune.FailureConfig(max_failures=int(suite.doc.get("max_failures") or 0)),
            verbose=0, callbacks=_callbacks(state, len(specs))),
    )
    print(f"{len(specs)} trial(s) on Ray Tune{' (dry run: no-op trials)' if dry_run else ''}, "
          f"{_describe(requests)}", flush=True)
    try:
        tuner.fit()
    except Exception as exc:     # Tune's own bookkeeping failed (its state on a full disk, say)
        raise disk_full(suite.output) or exc from None
    summary = []
    for spec in specs:
        error = state.errors.get(spec.trial_id, "")
        if spec.trial_id not in state.written:
            error = error or "the trial ended without reporting its rows"
            hint = ""
            if suite.doc.get("storage"):
                hint = (f" (its logs up to its last saved state: "
                        f"{storage.logs_uri(suite.doc['storage'], spec.trial_id)}; the rest on the node it ran on)")
            elif multi_node:
                hint = " (a multi-node run: see the trial's error.txt on the node it ran on)"
            _write_status_rows(suite, spec, "error", error + hint)
            state.failed.add(spec.trial_id)
        elif spec.trial_id in state.failed:
            error = error or "see its error row"
        summary.append({"trial": spec.name, "trial_id": spec.trial_id, "error": error,
                        "retries": state.retries.get(spec.trial_id, 0)})
    return summary


def _datasets(suite: Suite) -> dict[str, dict[str, Any]]:
    """Each dataset's format, root and classes as the trials read them (for the report:
    a wrong dataset set-up is visible after training too)."""
    from harness.data.formats import dataset_format
    out = {}
    for ds in suite.datasets():
        try:
            classes = list(dataset_format(ds).classes(ds))
        except (OSError, ValueError, KeyError):
            classes = None
        out[ds["name"]] = {"format": ds["format"], "root": ds["root"], "classes": classes}
    return out


def run_suite(suite: Suite, address: str | None = None, resume: bool = True,
              num_cpus: int | None = None, verbose: bool = False, dry_run: bool = False,
              prepare: Callable[[], None] | None = None, only: set[str] | None = None) -> dict[str, Any]:
    """Run every pending trial of a validated suite on Ray Tune and consolidate the store.

    One Tune run for the whole suite: teachers first, each student as soon as its own
    teacher has ended. The driver writes each trial's rows as it ends. ``verbose``
    forwards the trials' own output (mmengine logs) to this console; it is always in each
    trial's directory. A local Ray instance listens on loopback only. SIGINT and SIGTERM
    stop the run within seconds: the running trials are stopped, get rows with status
    ``interrupted`` (a later run resumes them from their last checkpoint), and
    :class:`Interrupted` is raised (the rows are kept; the next run consolidates them);
    a second signal leaves at once. ``dry_run``: every trial an instant no-op through
    the same path, with ``dry_run`` rows. ``prepare`` (the data written and checked, every
    model built once) runs while Ray starts; its error stops the run before any trial.
    ``only``: run just these trial ids (a round of compute-matched baselines: the rest
    of the suite was run, and a trial of it that failed is not tried again in the same
    run); the whole suite is recorded either way.
    """
    import signal

    out = Path(suite.output)

    def record() -> None:            # the suite as run (and its datasets' classes, once written)
        out.mkdir(parents=True, exist_ok=True)
        results.write_text_atomic(out / "suite.json", json.dumps(
            {"suite": suite.doc, "trial_ids": [t.trial_id for t in suite.trials],
             "trials": [t.to_dict() for t in suite.trials], "datasets": _datasets(suite)}, indent=1, default=str))
    teachers, students = pending_trials(suite, resume, dry_run=dry_run, quarantine=True)   # (we hold the lock)
    if only is not None:
        teachers, students = [t for t in teachers if t.trial_id in only], [t for t in students if t.trial_id in only]
    skipped = len(suite.trials) - len(teachers) - len(students)
    summary: dict[str, Any] = {"skipped": skipped, "trials": [], "interrupted": []}
    specs = teachers + students
    if not specs:
        if prepare is not None:
            prepare()
        record()
    else:
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"     # Ctrl-C reaches us, not Tune's own handler
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        received = _STOP
        received.clear()
        STARTED.clear()

        def on_term(signum: int, frame: Any) -> None:
            # (Tune may re-raise it as a plain KeyboardInterrupt, or swallow it where it
            # lands: the driver's callback raises it again at Tune's next step)
            name = "SIGTERM" if signum == signal.SIGTERM else "SIGINT (Ctrl-C)"
            if not received:
                print(f"\n{name}: stopping the running trials and keeping what finished "
                      f"(a second one leaves at once)", file=sys.stderr, flush=True)
                received.append(name)
                raise Interrupted(name)
            for sig in previous:           # the second: no more cleanup
                signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        try:
            with _ray_session(address, num_cpus, verbose, alongside=prepare):
                record()
                for sig in previous:        # after ray.init, which installs its own (sys.exit)
                    signal.signal(sig, on_term)
                check_resources(suite, _alive_nodes())
                summary["trials"] = _fit(suite, specs, multi_node=bool(address), dry_run=dry_run, resume=resume)
        except KeyboardInterrupt as exc:
            # (leaving the session shut Ray down: the running trials stopped before their rows are judged)
            signal_name = received[0] if received else \
                exc.args[0] if isinstance(exc, Interrupted) and exc.args else "SIGINT (Ctrl-C)"
            summary["finished"] = 0
            for spec in specs:         # the trials that had started (not every pending one of a large matrix)
                if spec.trial_id in STARTED and (results.rows_dir(suite.output) / f"{spec.trial_id}.parquet").exists():
                    summary["finished"] += 1
                elif spec.trial_id in STARTED:
                    _write_status_rows(suite, spec, "interrupted",
                                       f"interrupted by {signal_name} before it finished; the next run "
                                       f"resumes it from its last checkpoint")
                    summary["interrupted"].append(spec.name)
            # (results.parquet is not rewritten here: that reads every row file, minutes for a
            # large matrix; the rows are each trial's file, which every reader and the next
            # run read, and the next run consolidates)
            summary["results"] = str(results.rows_dir(out))
            raise Interrupted(signal_name, summary) from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            _STOP.clear()
    summary["results"] = str(results.consolidate(out) or "")
    return summary
