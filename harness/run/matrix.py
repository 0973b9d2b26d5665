"""Scheduling a suite's trials on Ray Tune: the only module that imports Ray.

One Tune run per suite: a searcher hands out the trials in dependency order (the
teachers first, each student as soon as its own teacher ended), each with its model's
resources (a trial with ``workers > 1`` trains on Ray Train workers, see
:mod:`harness.run.workers`). Trial processes are reused for later trials with the same
resources. A trial reports its rows as its last result and the driver writes them (no
shared filesystem needed for results); teacher weights and resumable states go through
the run's storage (:mod:`harness.store.storage`). A failed trial leaves an error row and the
others go on; a re-run skips the trials whose rows say ``ok``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harness import catalog
from harness.store import results, storage
from harness.suite.spec import TrialSpec
from harness.suite.load import Suite

log = logging.getLogger(__name__)


def _placement() -> dict[str, Any]:
    """Where Ray runs this process: node id and IP, and the GPU ids it was given."""
    import ray
    ctx = ray.get_runtime_context()
    return {"node": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "accelerator_ids": [str(i) for i in ctx.get_accelerator_ids().get("GPU", [])]}


def _rows_message(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, default=str)


def _trainable(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one trial spec in; metrics reported at each
    evaluation, then the trial's rows (the driver writes them: no shared filesystem).
    A trial with ``resources.workers > 1`` trains on that many Ray Train workers."""
    from ray import tune

    from .trial import execute_trial

    spec = TrialSpec.from_dict(config["trial"])
    if int(spec.resources.get("workers", 1)) > 1 and not config.get("dry_run"):
        from .workers import train_on_workers
        train_on_workers(spec, resume=config.get("resume", True))      # its workers report the rows
        return
    rows, _ = execute_trial(spec, report=tune.report, placement=_placement(), write=False,
                            resume=config.get("resume", True), dry_run=bool(config.get("dry_run")),
                            progress=tune.report)
    tune.report({ROWS_KEY: _rows_message(rows)})


#: the key of the last result of a trial: its rows, as JSON
ROWS_KEY = "kd_rows"


class LastPoint:
    """A trial's reporter that also remembers the latest value of every key it sent: a
    search's scheduler reads its metric in every result, so the rows, sent last, carry
    the metric's last value (``rows_result``)."""

    def __init__(self, send: Callable[[dict[str, Any]], None]) -> None:
        self.send, self.last = send, {}

    def __call__(self, point: dict[str, Any]) -> None:
        self.last.update(point)
        self.send(point)

    def rows_result(self, rows_message: str, metric: str | None) -> dict[str, Any]:
        return {**({metric: self.last[metric]} if metric in self.last else {}), ROWS_KEY: rows_message}


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


def with_teacher_sha(spec: TrialSpec) -> TrialSpec:
    """A student trial told the sha256 of the weights its teacher trial reported (from the
    store): it checks the file it loads, local or fetched from the run's storage."""
    if spec.role != "student" or not spec.teacher_id or spec.method_name == "none":
        return spec
    from dataclasses import replace
    return replace(spec, teacher_sha256=results.teacher_sha256(spec.output_dir, spec.teacher_id))


def teacher_available(spec: TrialSpec) -> bool:
    """A teacher trial's weights are where students find them: in the run's storage, or
    (without one) in the node-local cache."""
    if spec.storage:
        return storage.stored_sha256(storage.teacher_uri(spec.storage, spec.trial_id)) is not None
    return Path(spec.teacher_checkpoint or "").is_file()


class RunState:
    """What the driver knows of a run, fed by Tune's callbacks: it writes each trial's
    rows as they arrive and counts retries and failures."""

    def __init__(self, suite: Suite) -> None:
        self.suite = suite
        self.written: set[str] = set()
        self.failed: set[str] = set()
        self.retries: dict[str, int] = {}
        self.errors: dict[str, str] = {}

    def write_rows(self, trial_id: str, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            row["attempts"] = 1 + self.retries.get(trial_id, 0)
        results.write_trial_rows(self.suite.output, trial_id, rows)
        self.written.add(trial_id)
        if results.failed_rows(rows):
            self.failed.add(trial_id)


def _trial_dirname(trial: Any) -> str:
    spec = TrialSpec.from_dict(trial.config["trial"])
    return f"{spec.role}-{spec.method}-s{spec.seed}-{spec.trial_id}"


def _callbacks(state: RunState | None, total: int, rows_end_trial: bool = True) -> list[Any]:
    """The driver's Tune callback: rows written as they arrive, retries counted, and the
    live progress view fed. ``rows_end_trial``: a Tune trial is one harness trial, its
    rows its last word (a search's trial reports rows per seed, and ends on its own)."""
    from ray import tune

    from .progress import Progress

    class Driver(tune.Callback):
        def __init__(self) -> None:
            self.view = Progress(total)

        @staticmethod
        def _ids(trial: Any) -> tuple[str, str]:
            name = trial.custom_trial_name or str(trial)
            config = trial.config or {}
            return name, TrialSpec.from_dict(config["trial"]).trial_id if "trial" in config else name

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.view.started(self._ids(trial)[0])

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            name, trial_id = self._ids(trial)
            if result.get(ROWS_KEY) and state is not None:   # the rows, written here atomically
                rows = json.loads(result[ROWS_KEY])
                trial_id = rows[0]["trial_id"] if rows else trial_id
                state.write_rows(trial_id, rows)
                if rows_end_trial:
                    self.view.ended(name, failed=trial_id in state.failed)
                return
            self.view.result(name, result)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            if state is None or not rows_end_trial:
                self.view.ended(self._ids(trial)[0], failed=False)

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            name, trial_id = self._ids(trial)
            if state is not None:
                state.retries[trial_id] = state.retries.get(trial_id, 0) + 1
            self.view.retried(name)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            name, trial_id = self._ids(trial)
            if state is not None:
                state.errors[trial_id] = f"its worker or node died ({trial.num_failures} time(s)); " \
                                         f"max_failures allows {getattr(trial, 'max_failures', 0)} retries"
            self.view.ended(name, failed=True)

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            if _STOP:          # a stop signal Tune swallowed where it landed
                raise Interrupted(_STOP[0])
            self.view.tick(trials)

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self.view.close()

    return [Driver()]


def _resources(spec_resources: dict[str, Any]) -> Any:
    """The Tune trial's resource request: the trial itself, or for Ray Train a small
    driver (the workers ask for theirs when the Train run starts)."""
    if int(spec_resources.get("workers", 1)) > 1:
        from ray import tune        # no CPU: all of a node's CPUs may go to the workers
        return tune.PlacementGroupFactory([{"memory": 64 * 2 ** 20}])
    return {"cpu": float(spec_resources["cpu"]), "gpu": float(spec_resources["gpu"])}


def _concurrency(requests: list[dict[str, Any]], nodes: list[dict[str, float]]) -> int:
    """How many trials may run at once: Ray Tune's concurrency limit (and with it how
    many trials it keeps pending, one by default with a searcher of one's own: short
    trials would then run one after the other). Single-process trials: as many as the
    cluster's totals hold of the smallest request (Ray's scheduler packs them onto
    nodes). Trials on Ray Train workers: as many as the largest of those requests fits;
    Tune cannot see what their workers will ask for, and without a bound every trial's
    Train run would wait for workers that the others hold."""
    def fits(res: dict[str, Any], workers: int) -> int:
        counts = [int(sum(n.get(key, 0.0) for n in nodes) // (per * workers))
                  for key, per in (("CPU", float(res["cpu"])), ("GPU", float(res["gpu"]))) if per > 0]
        return max(1, min(counts)) if counts else 1
    multi = [fits(r, int(r["workers"])) for r in requests if int(r.get("workers", 1)) > 1]
    if multi:
        return min(multi)
    return max([fits(r, 1) for r in requests] or [1])


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
    tuner.fit()
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


def _write_status_rows(suite: Suite, spec: TrialSpec, status: str, message: str, search_id: str = "") -> None:
    """The one row of a trial that ended without a result (error, interrupted, pruned)."""
    from .trial import result_rows
    rows = result_rows(spec, None, message, 0.0, status=status, search_id=search_id)
    results.write_trial_rows(suite.output, spec.trial_id, rows)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT (Ctrl-C) or SIGTERM."""


#: the stop signals received during the running suite (see run_suite)
_STOP: list[str] = []


def pending_trials(suite: Suite, resume: bool = True) -> tuple[list[TrialSpec], list[TrialSpec]]:
    """(teacher trials, student trials) still to run; with ``resume`` finished ones are
    skipped (a teacher only while its checkpoint is still there)."""
    done = results.finished_trials(suite.output) if resume else set()
    teachers = [t for t in suite.teacher_trials() if t.trial_id not in done or not teacher_available(t)]
    students = [t for t in suite.student_trials() if t.trial_id not in done]
    return teachers, students


def check_resources(suite: Suite, available: list[dict[str, float]]) -> None:
    """Refuse a per-trial request that no node of the cluster can ever satisfy (Tune
    would wait for it forever). ``available`` holds each node's total resources."""
    from harness.suite.yamlio import SuiteError
    for spec in suite.trials:
        res = spec.resources
        need = {"CPU": float(res["cpu"]), "GPU": float(res["gpu"])}
        if any(all(node.get(k, 0.0) >= v for k, v in need.items() if v > 0) for node in available):
            continue
        nodes = "; ".join(f"{n.get('CPU', 0):g} CPU, {n.get('GPU', 0):g} GPU" for n in available) or "none"
        per = "each of its workers" if int(res.get("workers", 1)) > 1 else "it"
        raise SuiteError(f"{suite.where.get('resources', suite.file)}: resources: trial {spec.name}: {per} asks for "
                         f"{res['cpu']:g} CPU and {res['gpu']:g} GPU, but no node of the cluster has that much "
                         f"(nodes: {nodes}); lower 'resources' (of the suite or of model "
                         f"'{spec.model['name']}') or add nodes")


def _alive_nodes() -> list[dict[str, float]]:
    """Each live node's total resources, of the Ray instance this process is connected to."""
    import ray
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def local_capacity(num_cpus: int | None = None) -> list[dict[str, float]]:
    """What a local Ray instance would have: this machine's CPUs (or ``--num-cpus``) and GPUs."""
    import torch
    return [{"CPU": float(num_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]


_MODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _loopback_ray(local: bool) -> tuple[Any, tuple[bool, str | None]]:
    """Import Ray; a local instance (no address) runs in Ray's own single-machine mode (its
    default on macOS and Windows): the node's address is loopback, so every Ray process
    listens on 127.0.0.1 only. Returns (ray, the previous mode) for :func:`_restore`."""
    env = os.environ.get(_MODE_ENV)
    if local:
        os.environ[_MODE_ENV] = "0"       # for the processes this one starts
    import ray
    from ray._private import ray_constants
    previous = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = not local     # read at import; ray may be imported already
    return ray, (previous, env)


def _restore(previous: tuple[bool, str | None]) -> None:
    """Undo :func:`_loopback_ray`: the mode, and the environment later processes inherit."""
    from ray._private import ray_constants
    ray_constants.ENABLE_RAY_CLUSTER, env = previous
    if env is None:
        os.environ.pop(_MODE_ENV, None)
    else:
        os.environ[_MODE_ENV] = env


@contextlib.contextmanager
def _ray_session(address: str | None, num_cpus: int | None, verbose: bool) -> Iterator[None]:
    """Ray for one ``run`` or ``tune``: the cluster at ``address`` (or ``RAY_ADDRESS``), else
    a local instance on loopback only (an exposed Ray runs any code it is sent). What it
    started it shuts down on leaving, and the mode is restored. Tune writes no result
    files of its own: the rows store is the record."""
    ray, mode = _loopback_ray(local=not (address or os.environ.get("RAY_ADDRESS")))
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)    # (so no result.json)
    started = not ray.is_initialized()
    try:
        if started:
            ray.init(address=address, include_dashboard=False, num_cpus=None if address else num_cpus,
                     logging_level=logging.WARNING, log_to_driver=verbose)
        yield
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
        _restore(mode)


def run_suite(suite: Suite, address: str | None = None, resume: bool = True,
              num_cpus: int | None = None, verbose: bool = False, dry_run: bool = False) -> dict[str, Any]:
    """Run every pending trial of a validated suite on Ray Tune and consolidate the store.

    One Tune run for the whole suite: teachers first, each student as soon as its own
    teacher has ended. The driver writes each trial's rows as it ends. ``verbose``
    forwards the trials' own output (mmengine logs) to this console; it is always in each
    trial's directory. A local Ray instance listens on loopback only. SIGINT and SIGTERM
    stop the run: the running trials are stopped, get rows with status ``interrupted`` (a
    later run resumes them from their last checkpoint), and :class:`Interrupted` is raised
    after the store is consolidated. ``dry_run``: every trial an instant no-op through
    the same path, with ``dry_run`` rows.
    """
    import signal

    out = Path(suite.output)
    out.mkdir(parents=True, exist_ok=True)
    results.write_text_atomic(out / "suite.json", json.dumps(
        {"suite": suite.doc, "trial_ids": [t.trial_id for t in suite.trials],
         "trials": [t.to_dict() for t in suite.trials]}, indent=1, default=str))
    teachers, students = pending_trials(suite, resume)
    skipped = len(suite.trials) - len(teachers) - len(students)
    summary: dict[str, Any] = {"skipped": skipped, "trials": [], "interrupted": []}
    specs = teachers + students
    if specs:
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"     # Ctrl-C reaches us, not Tune's own handler
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        received = _STOP
        received.clear()

        def on_term(signum: int, frame: Any) -> None:
            # (Tune may re-raise it as a plain KeyboardInterrupt, or swallow it where it
            # lands: the driver's callback raises it again at Tune's next step)
            name = "SIGTERM" if signum == signal.SIGTERM else "SIGINT (Ctrl-C)"
            received.append(name)
            raise Interrupted(name)
        try:
            with _ray_session(address, num_cpus, verbose):
                for sig in previous:        # after ray.init, which installs its own (sys.exit)
                    signal.signal(sig, on_term)
                check_resources(suite, _alive_nodes())
                summary["trials"] = _fit(suite, specs, multi_node=bool(address), dry_run=dry_run, resume=resume)
        except KeyboardInterrupt as exc:
            # (leaving the session shut Ray down: the running trials stopped before their rows are judged)
            signal_name = received[0] if received else \
                exc.args[0] if isinstance(exc, Interrupted) and exc.args else "SIGINT (Ctrl-C)"
            for spec in specs:
                if not (results.rows_dir(suite.output) / f"{spec.trial_id}.parquet").exists():
                    _write_status_rows(suite, spec, "interrupted",
                                       f"interrupted by {signal_name} before it finished; the next run "
                                       f"resumes it from its last checkpoint")
                    summary["interrupted"].append(spec.name)
            summary["results"] = str(results.consolidate(out) or "")
            raise Interrupted(signal_name, summary) from None
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            _STOP.clear()
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

    with _ray_session(address, num_cpus, verbose):
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler
        check_resources(suite, _alive_nodes())
        if teachers:
            _fit(suite, teachers, multi_node=bool(address))
        for (ds, teacher, student), base in bases.items():
            res = base.resources
            teacher_spec = next((t for t in suite.teacher_trials() if t.trial_id == base.teacher_id), None)
            if teacher_spec is None or not teacher_available(teacher_spec):
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
                                      # (each seed reports its evaluations, then its rows)
                                      max_t=(evals + 1) * len(search["seeds"]) + 1) if search["scheduler"] == "asha" else None
            points = [dict(p) for p in search["start_from"]] or None
            if search["searcher"] == "optuna":
                from ray.tune.search.optuna import OptunaSearch
                searcher = OptunaSearch(seed=0, points_to_evaluate=points)
            else:
                from ray.tune.search import BasicVariantGenerator
                searcher = BasicVariantGenerator(points_to_evaluate=points, random_state=0)
            trainable = tune.with_parameters(_search_trainable, base=with_teacher_sha(base).to_dict(),
                                             seeds=list(search["seeds"]), sid=sid, metric=metric)
            tuner = tune.Tuner(
                tune.with_resources(trainable, _resources(res)),
                param_space=_search_space(search["space"]),
                tune_config=tune.TuneConfig(metric=metric, mode=mode, search_alg=searcher, scheduler=scheduler,
                                            num_samples=search["budget"],
                                            # (multi-worker configurations: as many as their workers fit)
                                            max_concurrent_trials=min(search["concurrency"],
                                                                      _concurrency([res], _alive_nodes())),
                                            reuse_actors=False),
                run_config=tune.RunConfig(name=f"search-{sid}-{ds}-{teacher}-{student}",
                                          storage_path=storage.ray_path(suite.doc.get("storage"), suite.output),
                                          failure_config=tune.FailureConfig(max_failures=0), verbose=0,
                                          callbacks=_callbacks(RunState(suite), search["budget"],
                                                               rows_end_trial=False)))
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
    summary["results"] = str(results.consolidate(suite.output) or "")
    return summary

