"""``harness tune``: a hyperparameter search per (dataset, pair) of the searched method,
on Ray Tune (Optuna or random search, ASHA early stopping), after the suite's teachers;
the best configuration of each cell is written as a suite ready for ``harness run``.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import catalog
from harness.store import results, storage
from harness.suite.load import Suite
from harness.suite.spec import TrialSpec

from .matrix import _fit
from .session import (LastPoint, RunState, _alive_nodes, _callbacks, _concurrency, _placement, _ray_session,
                      _resources, _rows_message, _write_status_rows, check_resources, pending_trials,
                      teacher_available, with_teacher_sha)


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


def _search_trainable(config: dict[str, Any], base: dict[str, Any], seeds: list[int], sid: str,
                      metric: str) -> None:
    """One configuration, trained on each of the search's seeds in turn, reporting every
    evaluation (ASHA compares configurations at the same seed and evaluation). After
    each seed its rows, for the driver to write, with that seed's last value of the
    searched metric (every configuration reports the same number of results, so ASHA's
    rungs still line up). A model with ``resources.workers > 1`` trains each seed on
    that many Ray Train workers, as in ``run``."""
    from ray import tune

    from .trial import execute_trial

    spec = TrialSpec.from_dict(base)
    for seed in seeds:
        trial = _configured(spec, config, seed)
        if int(trial.resources.get("workers", 1)) > 1:
            from .workers import train_on_workers
            rows = train_on_workers(trial, search_id=sid, metric=metric)    # its workers report the rows
            failed = results.failed_rows(rows)
            if failed or not rows:      # as a single-process trial that raised: the configuration ends here
                raise RuntimeError(failed[0].get("error") if failed else "the workers reported no rows")
            continue
        report = LastPoint(tune.report)
        rows, exc = execute_trial(trial, report=report, search_id=sid, write=False, placement=_placement())
        tune.report(report.rows_result(_rows_message(rows), metric))
        if exc is not None:
            raise exc


def search_id(suite: Suite) -> str:
    from harness.suite.spec import content_hash
    labels = suite.doc["search"]["methods"]
    base = [t.trial_id for t in suite.student_trials() if t.method in labels]
    return content_hash([suite.doc["search"], base], n=10)


def _method_search(search: dict[str, Any], method_name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The space and the start points of one searched method: the schedule keys and its
    own parameters (a point left empty by that is dropped)."""
    params = catalog.METHODS.get(method_name)["params"]
    space = {k: v for k, v in search["space"].items() if k.startswith("schedule.") or k in params}
    points = [{k: v for k, v in p.items() if k in space} for p in search["start_from"]]
    return space, [p for p in points if p]


def _best_suite(suite: Suite, pair: tuple[str, str, str], bests: dict[str, dict[str, Any]],
                sid: str) -> dict[str, Any]:
    """A ready-to-run suite re-evaluating each searched method's best configuration on the
    search's fresh seeds, with the suite's teachers: the student alone on its tuned
    schedule when it was searched (else on the suite's), each distiller with its tuned
    parameters and schedule keys; ``tuned`` names what a search chose."""
    doc = suite.doc
    search = doc["search"]
    plain = json.loads(json.dumps({k: doc[k] for k in ("datasets", "teachers", "students")}, default=str))
    ds, teacher, student = pair
    dataset = plain["datasets"][ds]
    dataset["root"] = next(t.dataset["root"] for t in suite.trials if t.dataset["name"] == ds)  # absolute, as searched
    s_entry = plain["students"][student]
    methods: dict[str, Any] = {}
    tuned: dict[str, str] = {}
    for label, config in bests.items():
        schedule_over = {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith("schedule.")}
        if search["methods"][label] == "none":
            if schedule_over:
                s_entry["schedule"] = {**(s_entry.get("schedule") or {}), **schedule_over}
            tuned["none"] = sid
            continue
        entry: dict[str, Any] = {"method": search["methods"][label],
                                 "params": {k: v for k, v in config.items() if not k.startswith("schedule.")}}
        if schedule_over:               # over the student's schedule (the student alone's best, if searched)
            entry["schedule"] = schedule_over
        methods[f"{label}-best"] = entry
        tuned[f"{label}-best"] = sid
    searched = ", ".join(search["methods"])
    out = {
        "name": f"{suite.name}-best-{sid}-{ds}-{teacher}-{student}",
        "description": f"best configurations of search {sid} of suite {suite.name} ({searched} on {ds}, "
                       f"{teacher} -> {student}), re-evaluated on fresh seeds",
        "datasets": {ds: dataset},
        "teachers": {teacher: plain["teachers"][teacher]},
        "students": {student: s_entry},
        "pairs": [{"teacher": teacher, "student": student}],
        "methods": methods or ["none"],
        "seeds": list(search["final_seeds"]),
        "schedule": {k: v for k, v in doc["schedule"].items()},
        "resources": dict(doc["resources"]),
        "output": doc["output"],
        "teacher_cache": doc["teacher_cache"],
        "teacher_seed": int(doc.get("teacher_seed", 0)),
        "tuned": tuned,
    }
    if "pretrained" in doc:
        out["pretrained"] = doc["pretrained"]
    return out


def run_search(suite: Suite, address: str | None = None, num_cpus: int | None = None,
               verbose: bool = False, prepare: Callable[[], None] | None = None) -> dict[str, Any]:
    """``harness tune``: the suite's teachers (trained once, or reused), then per (dataset,
    pair) of the searched method a Ray Tune search (Optuna or random, ASHA early stopping
    on the validation metric); every search trial's rows go to the store with the search's
    id; the best configuration per cell is written as a suite file."""
    import yaml

    search = suite.doc["search"]
    sid = search_id(suite)
    teachers, _ = pending_trials(suite, quarantine=True)     # (the search holds the run lock)
    bases = {}
    for t in suite.student_trials():    # one base trial per (dataset, pair, method); the student alone's per student
        if t.method in search["methods"]:
            bases.setdefault((t.dataset["name"], t.teacher["name"] if t.teacher else "", t.model["name"], t.method), t)
    pairs = sorted({(t.dataset["name"], t.teacher["name"], t.model["name"]) for t in suite.student_trials()
                    if t.teacher and (t.method in search["methods"] or "none" in search["methods"])})
    needed = {b.teacher_id for b in bases.values() if b.teacher_id}
    teachers = [t for t in teachers if t.trial_id in needed]
    summary: dict[str, Any] = {"search_id": sid, "cells": []}

    with _ray_session(address, num_cpus, verbose, alongside=prepare):     # checks run while Ray starts
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler
        check_resources(suite, _alive_nodes())
        if teachers:
            _fit(suite, teachers, multi_node=bool(address))
        bests: dict[tuple[str, str, str], dict[str, Any]] = {}
        for (ds, teacher, student, label), base in bases.items():
            res = base.resources
            name = f"{label} on {ds}/{teacher}->{student}" if teacher else f"{label} on {ds}/{student}"
            teacher_spec = next((t for t in suite.teacher_trials() if t.trial_id == base.teacher_id), None)
            if teacher and (teacher_spec is None or not teacher_available(teacher_spec)):
                summary["cells"].append({"cell": name, "error": "the teacher failed"})
                continue
            space, points = _method_search(search, search["methods"][label])
            metric_entry = catalog.METRICS.get(catalog.task_metric(base.dataset["format"]))
            metric, mode = metric_entry["primary"], "max" if metric_entry["higher_is_better"] else "min"
            evals = max(1, int(base.schedule["epochs"]) // int(base.schedule["val_interval"])) \
                if not base.schedule.get("iters") else max(1, int(base.schedule["iters"]) // int(base.schedule["val_interval"]))
            scheduler = ASHAScheduler(time_attr="training_iteration", grace_period=search["grace_period"],
                                      reduction_factor=search["reduction_factor"],
                                      # past the last evaluation: ASHA stops a trial that reaches
                                      # max_t, which would cut it before it writes its rows
                                      # (each seed reports its evaluations, then its rows)
                                      max_t=(evals + 1) * len(search["seeds"]) + 1) if search["scheduler"] == "asha" else None
            if search["searcher"] == "optuna":
                from ray.tune.search.optuna import OptunaSearch
                searcher = OptunaSearch(seed=0, points_to_evaluate=points or None)
            else:
                from ray.tune.search import BasicVariantGenerator
                searcher = BasicVariantGenerator(points_to_evaluate=points or None, random_state=0)
            trainable = tune.with_parameters(_search_trainable, base=with_teacher_sha(base).to_dict(),
                                             seeds=list(search["seeds"]), sid=sid, metric=metric)
            tuner = tune.Tuner(
                tune.with_resources(trainable, _resources(res)),
                param_space=_search_space(space),
                tune_config=tune.TuneConfig(metric=metric, mode=mode, search_alg=searcher, scheduler=scheduler,
                                            num_samples=search["budget"],
                                            # (multi-worker configurations: as many as their workers fit)
                                            max_concurrent_trials=min(search["concurrency"],
                                                                      _concurrency([res], _alive_nodes())),
                                            reuse_actors=False),
                run_config=tune.RunConfig(name=f"search-{sid}-{ds}-{teacher}-{student}-{label}",
                                          storage_path=storage.ray_path(suite.doc.get("storage"), suite.output),
                                          failure_config=tune.FailureConfig(max_failures=0), verbose=0,
                                          callbacks=_callbacks(RunState(suite), search["budget"],
                                                               rows_end_trial=False)))
            print(f"search {sid}: {name}: {search['budget']} "
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
            cell = {"cell": name, "trials": len(trials), "pruned": sum(t["pruned"] for t in trials), "best": None}
            if finished:
                cell["best"] = (max if mode == "max" else min)(finished, key=lambda t: t["score"])
                for pair in pairs:          # the student alone's best serves every pair of its student
                    if pair[0] == ds and pair[2] == student and (not teacher or pair[1] == teacher):
                        bests.setdefault(pair, {})[label] = cell["best"]["config"]
            summary["cells"].append(cell)
    summary["suites"] = []
    for pair, configs in bests.items():       # one suite per (dataset, pair): every searched method's best
        path = Path(suite.output) / "searches" / sid / f"best-{'-'.join(pair)}.yaml"
        results.write_text_atomic(path, yaml.safe_dump(_best_suite(suite, pair, configs, sid), sort_keys=False))
        missing = [label for label in search["methods"] if label not in configs]
        summary["suites"].append({"pair": pair, "file": str(path), "missing": missing})
    summary["results"] = str(results.consolidate(suite.output) or "")
    return summary
