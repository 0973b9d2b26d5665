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

from . import catalog, results
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


def _fit(suite: Suite, phase: str, specs: list[TrialSpec], multi_node: bool) -> list[dict[str, Any]]:
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
    errors = {}
    for result in grid:     # a trial that never started has no config
        config = result.config or {}
        if "trial" in config and result.error:
            errors[TrialSpec.from_dict(config["trial"]).trial_id] = str(result.error)
    summary = []
    for spec in specs:
        rows_file = results.rows_dir(suite.output) / f"{spec.trial_id}.parquet"
        error = errors.get(spec.trial_id, "")
        if not rows_file.exists():
            error = error or f"the trial ended but its rows are not at {rows_file}"
            hint = " (on a multi-node cluster, put 'output' on storage every node shares)" if multi_node else ""
            _write_status_rows(suite, spec, "error", error + hint)
        summary.append({"trial": spec.name, "trial_id": spec.trial_id, "error": error})
    return summary


def _write_status_rows(suite: Suite, spec: TrialSpec, status: str, message: str, search_id: str = "") -> None:
    """The one row of a trial that ended without a result (error, interrupted, pruned)."""
    from .trial import result_rows
    rows = result_rows(spec, None, message, 0.0, status=status, search_id=search_id)
    results.write_trial_rows(suite.output, spec.trial_id, rows)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT (Ctrl-C) or SIGTERM."""


def pending_trials(suite: Suite, resume: bool = True) -> tuple[list[TrialSpec], list[TrialSpec]]:
    """(teacher trials, student trials) still to run; with ``resume`` finished ones are
    skipped (a teacher only while its checkpoint is still there)."""
    done = results.finished_trials(suite.output) if resume else set()
    teachers = [t for t in suite.teacher_trials()
                if t.trial_id not in done or not Path(t.teacher_checkpoint or "").is_file()]
    students = [t for t in suite.student_trials() if t.trial_id not in done]
    return teachers, students


def check_resources(suite: Suite, available: list[dict[str, float]]) -> None:
    """Refuse a per-trial request that no node of the cluster can ever satisfy (Tune
    would wait for it forever). ``available`` holds each node's total resources."""
    from .yamlio import SuiteError
    res = suite.doc["resources"]
    need = {"CPU": float(res["cpu"]), "GPU": float(res["gpu"])}
    if any(all(node.get(k, 0.0) >= v for k, v in need.items() if v > 0) for node in available):
        return
    nodes = "; ".join(f"{n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU" for n in available) or "none"
    raise SuiteError(f"{suite.where.get('resources', suite.file)}: resources: each trial asks for {res['cpu']:g} CPU and {res['gpu']:g} GPU, "
                     f"but no node of the cluster has that much (nodes: {nodes}); lower 'resources' or add nodes")


def local_capacity(num_cpus: int | None = None) -> list[dict[str, float]]:
    """What a local Ray instance would have: this machine's CPUs (or ``--num-cpus``) and GPUs."""
    import torch
    return [{"CPU": float(num_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]


def _loopback_ray(local: bool) -> tuple[Any, bool]:
    """Import Ray; a local instance (no address) runs in Ray's own single-machine mode (its
    default on macOS and Windows): the node's address is loopback, so every Ray process
    listens on 127.0.0.1 only. Returns (ray, the previous mode) for :func:`_restore`."""
    if local:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants
    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = not local     # read at import; ray may be imported already
    return ray, previous


def _restore(previous: bool) -> None:
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER = previous


def run_suite(suite: Suite, address: str | None = None, resume: bool = True,
              num_cpus: int | None = None, verbose: bool = False) -> dict[str, Any]:
    """Run every pending trial of a validated suite on Ray Tune and consolidate the store.

    ``verbose`` forwards the trials' own output (mmengine logs) to this console; it is
    always in each trial's directory. A local Ray instance listens on loopback only.
    SIGINT and SIGTERM stop the run: the running trials are stopped, get rows with
    status ``interrupted`` (a later run redoes them), and :class:`Interrupted` is raised
    after the store is consolidated.
    """
    import signal

    ray, cluster_mode = _loopback_ray(local=not (address or os.environ.get("RAY_ADDRESS")))

    out = Path(suite.output)
    out.mkdir(parents=True, exist_ok=True)
    results.write_text_atomic(out / "suite.json", json.dumps(
        {"suite": suite.doc, "trial_ids": [t.trial_id for t in suite.trials],
         "trials": [t.to_dict() for t in suite.trials]}, indent=1, default=str))
    teachers, students = pending_trials(suite, resume)
    skipped = len(suite.trials) - len(teachers) - len(students)
    summary: dict[str, Any] = {"skipped": skipped, "trials": [], "interrupted": []}
    if teachers or students:
        os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"     # Ctrl-C reaches us, not Tune's own handler
        started = not ray.is_initialized()
        previous = signal.getsignal(signal.SIGTERM)

        def on_term(signum: int, frame: Any) -> None:
            raise Interrupted("SIGTERM")
        running: list[TrialSpec] = []
        try:
            if started:
                # a local instance is on loopback only (above): an exposed Ray runs any code it is sent
                ray.init(address=address, include_dashboard=False, num_cpus=None if address else num_cpus,
                         logging_level=logging.WARNING, log_to_driver=verbose)
            signal.signal(signal.SIGTERM, on_term)       # after ray.init, which installs its own (sys.exit)
            check_resources(suite, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
            for phase, specs in (("teachers", teachers), ("students", students)):
                if specs:
                    running = specs
                    summary["trials"] += _fit(suite, phase, specs, multi_node=bool(address))
                    running = []
        except KeyboardInterrupt as exc:
            signal_name = exc.args[0] if isinstance(exc, Interrupted) and exc.args else "SIGINT (Ctrl-C)"
            if started and ray.is_initialized():
                ray.shutdown()               # stops the running trials before their rows are judged
            for spec in running:
                if not (results.rows_dir(suite.output) / f"{spec.trial_id}.parquet").exists():
                    _write_status_rows(suite, spec, "interrupted",
                                       f"interrupted by {signal_name} before it finished; the next run redoes it")
                    summary["interrupted"].append(spec.name)
            summary["results"] = str(results.consolidate(out) or "")
            raise Interrupted(signal_name, summary) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
            if started and ray.is_initialized():
                ray.shutdown()
            _restore(cluster_mode)
    summary["results"] = str(results.consolidate(out) or "")
    return summary


# --------------------------------------------------------------------------- searches
def _search_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    from ray import tune
    out = {}
    for key, dim in space.items():
        if dim.get("choice") is not None:
            out[key] = tune.choice(dim["choice"])
        elif dim.get("uniform") is not None:
            out[key] = tune.uniform(*dim["uniform"])
        elif dim.get("loguniform") is not None:
            out[key] = tune.loguniform(*dim["loguniform"])
        else:
            out[key] = tune.randint(*dim["randint"])
    return out


def _configured(base: TrialSpec, config: dict[str, Any], seed: int) -> TrialSpec:
    """The base trial with a sampled configuration (method parameters and schedule keys)."""
    params = dict(base.params)
    schedule = dict(base.schedule)
    for key, value in config.items():
        if key.startswith("schedule."):
            schedule[key.split(".", 1)[1]] = value
        else:
            params[key] = value
    return TrialSpec.from_dict({**base.to_dict(), "params": params, "schedule": schedule, "seed": seed})


def _search_trainable(config: dict[str, Any], base: dict[str, Any], seeds: list[int], sid: str) -> None:
    """One configuration, trained on each of the search's seeds in turn, reporting every
    evaluation (ASHA compares configurations at the same seed and evaluation)."""
    from ray import tune

    from .trial import execute_trial

    spec = TrialSpec.from_dict(base)
    for seed in seeds:
        rows, exc = execute_trial(_configured(spec, config, seed), report=tune.report, search_id=sid)
        if exc is not None:
            raise exc


def search_id(suite: Suite) -> str:
    from .spec import content_hash
    base = [t.trial_id for t in suite.student_trials() if t.method == suite.doc["search"]["method"]]
    return content_hash([suite.doc["search"], base], n=10)


def _best_suite(suite: Suite, base: TrialSpec, params: dict[str, Any], sid: str) -> dict[str, Any]:
    """A ready-to-run suite re-evaluating the best configuration (and the student alone)
    on the search's fresh seeds, with the suite's teachers."""
    doc = suite.doc
    search = doc["search"]
    plain = json.loads(json.dumps({k: doc[k] for k in ("datasets", "teachers", "students")}, default=str))
    ds = base.dataset["name"]
    teacher, student = base.teacher["name"], base.model["name"]
    dataset = plain["datasets"][ds]
    dataset["root"] = base.dataset["root"]                       # absolute, as the search used it
    s_entry = plain["students"][student]
    schedule_over = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("schedule.")}
    if schedule_over:
        s_entry["schedule"] = {**(s_entry.get("schedule") or {}), **schedule_over}
    method_params = {k: v for k, v in params.items() if not k.startswith("schedule.")}
    label = f"{search['method']}-best"
    out = {
        "name": f"{suite.name}-{search['method']}-best-{sid}",
        "description": f"best configuration of search {sid} of suite {suite.name} ({search['method']} on {ds}, "
                       f"{teacher} -> {student}), re-evaluated on fresh seeds",
        "datasets": {ds: dataset},
        "teachers": {teacher: plain["teachers"][teacher]},
        "students": {student: s_entry},
        "pairs": [{"teacher": teacher, "student": student}],
        "methods": {label: {"method": search["method_name"], "params": method_params}},
        "seeds": list(search["final_seeds"]),
        "schedule": {k: v for k, v in doc["schedule"].items()},
        "resources": dict(doc["resources"]),
        "output": doc["output"],
        "teacher_cache": doc["teacher_cache"],
        "teacher_seed": int(doc.get("teacher_seed", 0)),
    }
    if "pretrained" in doc:
        out["pretrained"] = doc["pretrained"]
    return out


def run_search(suite: Suite, address: str | None = None, num_cpus: int | None = None,
               verbose: bool = False) -> dict[str, Any]:
    """``harness tune``: the suite's teachers (trained once, or reused), then per (dataset,
    pair) of the searched method a Ray Tune search (Optuna or random, ASHA early stopping
    on the validation metric); every search trial's rows go to the store with the search's
    id; the best configuration per cell is written as a suite file."""
    import yaml

    search = suite.doc["search"]
    sid = search_id(suite)
    teachers, _ = pending_trials(suite)
    bases = {}
    for t in suite.student_trials():                 # one base trial per (dataset, pair)
        if t.method == search["method"]:
            bases.setdefault((t.dataset["name"], t.teacher["name"], t.model["name"]), t)
    needed = {b.teacher_id for b in bases.values()}
    teachers = [t for t in teachers if t.trial_id in needed]
    summary: dict[str, Any] = {"search_id": sid, "cells": []}

    ray, cluster_mode = _loopback_ray(local=not (address or os.environ.get("RAY_ADDRESS")))
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, num_cpus=None if address else num_cpus,
                 logging_level=logging.WARNING, log_to_driver=verbose)
    try:
        check_resources(suite, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
        if teachers:
            _fit(suite, "teachers", teachers, multi_node=bool(address))
        res = suite.doc["resources"]
        for (ds, teacher, student), base in bases.items():
            if not Path(base.teacher_checkpoint or "").is_file():
                summary["cells"].append({"cell": f"{ds}/{teacher}->{student}", "error": "the teacher failed"})
                continue
            metric_entry = catalog.METRICS.get(catalog.task_metric(base.dataset["format"]))
            metric, mode = metric_entry["primary"], "max" if metric_entry["higher_is_better"] else "min"
            evals = max(1, int(base.schedule["epochs"]) // int(base.schedule["val_interval"])) \
                if not base.schedule.get("iters") else max(1, int(base.schedule["iters"]) // int(base.schedule["val_interval"]))
            scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=search["grace_period"],
                                      reduction_factor=search["reduction_factor"],
                                      # past the last evaluation: ASHA stops a trial that reaches
                                      # max_t, which would cut it before it writes its rows
                                      max_t=evals * len(search["seeds"]) + 1) if search["scheduler"] == "asha" else None
            points = [dict(p) for p in search["start_from"]] or None
            if search["searcher"] == "optuna":
                from ray.tune.search.optuna import OptunaSearch
                searcher = OptunaSearch(seed=0, points_to_evaluate=points)
            else:
                from ray.tune.search import BasicVariantGenerator
                searcher = BasicVariantGenerator(points_to_evaluate=points, random_state=0)
            trainable = tune.with_parameters(_search_trainable, base=base.to_dict(), seeds=list(search["seeds"]),
                                             sid=sid)
            tuner = tune.Tuner(
                tune.with_resources(trainable, {"cpu": float(res["cpu"]), "gpu": float(res["gpu"])}),
                param_space=_search_space(search["space"]),
                tune_config=tune.TuneConfig(metric=metric, mode=mode, search_alg=searcher, scheduler=scheduler,
                                            num_samples=search["budget"],
                                            max_concurrent_trials=search["concurrency"], reuse_actors=False),
                run_config=tune.RunConfig(name=f"search-{sid}-{ds}-{teacher}-{student}",
                                          storage_path=str((Path(suite.output) / "ray").resolve()),
                                          failure_config=tune.FailureConfig(max_failures=0), verbose=0,
                                          callbacks=[_progress_callback()]))
            print(f"search {sid}: {search['method']} on {ds}, {teacher} -> {student}: {search['budget']} "
                  f"configuration(s), {search['searcher']}, scheduler {search['scheduler']}", flush=True)
            grid = tuner.fit()
            trials = []
            for result in grid:
                config = dict(result.config or {})
                if not config:
                    continue
                scores, pruned = [], False
                for seed in search["seeds"]:
                    spec = _configured(base, config, seed)
                    rows_file = results.rows_dir(suite.output) / f"{spec.trial_id}.parquet"
                    if not rows_file.exists():      # stopped by ASHA (or never reached this seed)
                        pruned = True
                        last = (result.metrics or {}).get(metric)
                        _write_status_rows(suite, spec, "pruned" if result.error is None else "error",
                                           f"stopped by ASHA after {result.metrics.get('training_iteration', '?')} "
                                           f"evaluation(s), last {metric} {last}" if result.error is None
                                           else str(result.error), search_id=sid)
                        continue
                    table = results._read(rows_file)
                    ok = [r for r in table.to_pylist() if r["status"] == "ok" and r["primary"]]
                    scores += [r["value"] for r in ok]
                    pruned |= not ok
                trials.append({"config": config, "score": sum(scores) / len(scores) if scores and not pruned else None,
                               "pruned": pruned})
            finished = [t for t in trials if t["score"] is not None]
            cell = {"cell": f"{ds}/{teacher}->{student}", "trials": len(trials),
                    "pruned": sum(t["pruned"] for t in trials), "best": None, "suite_file": None}
            if finished:
                best = (max if mode == "max" else min)(finished, key=lambda t: t["score"])
                path = Path(suite.output) / "searches" / sid / f"best-{ds}-{teacher}-{student}.yaml"
                results.write_text_atomic(path, yaml.safe_dump(_best_suite(suite, base, best["config"], sid),
                                                               sort_keys=False))
                cell.update(best=best, suite_file=str(path))
            summary["cells"].append(cell)
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
        _restore(cluster_mode)
    summary["results"] = str(results.consolidate(suite.output) or "")
    return summary

