"""What a run and a search share on Ray: the session (a local instance on loopback, or an
existing cluster), the driver's bookkeeping fed by Tune's callbacks (rows written as they
arrive, retries counted, the live progress view), resource requests and the concurrency
they allow, where a trial ran, and which trials are still to run.

Ray is imported inside the functions that need it: importing this module is cheap.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harness.store import results, storage
from harness.suite.load import Suite
from harness.suite.spec import TrialSpec

log = logging.getLogger(__name__)


def _placement() -> dict[str, Any]:
    """Where Ray runs this process: node id and IP, and the GPU ids it was given."""
    import ray
    ctx = ray.get_runtime_context()
    return {"node": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "accelerator_ids": [str(i) for i in ctx.get_accelerator_ids().get("GPU", [])]}


def _rows_message(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, default=str)


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


def with_teacher_sha(spec: TrialSpec) -> TrialSpec:
    """A student trial told the sha256 of the weights its teacher trial reported (from the
    store): it checks the file it loads, local or fetched from the run's storage."""
    if spec.role != "student" or not spec.teacher_id or spec.method_name == "none":
        return spec
    from dataclasses import replace
    return replace(spec, teacher_sha256=results.teacher_sha256(spec.output_dir, spec.teacher_id))


def teacher_available(spec: TrialSpec) -> bool:
    """A teacher trial's weights are where students find them: in the run's storage, or
    (without one) in the node-local cache, and they are the weights its rows recorded. A
    cache entry another run replaced (a file whose hash is not the recorded one) is not:
    the teacher trial runs again and, the file being complete (written atomically),
    adopts it: it evaluates the file and records its hash, instead of failing every
    student of every later run."""
    from harness.suite.spec import file_sha256
    want = results.teacher_sha256(spec.output_dir, spec.trial_id)
    if spec.storage:
        have = storage.stored_sha256(storage.teacher_uri(spec.storage, spec.trial_id))
    else:
        path = Path(spec.teacher_checkpoint or "")
        have = file_sha256(path) if path.is_file() else None
    return have is not None and (want is None or have == want)


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
        with_data_warnings(self.suite, rows)
        results.write_trial_rows(self.suite.output, trial_id, rows)
        self.written.add(trial_id)
        if results.failed_rows(rows):
            self.failed.add(trial_id)


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
            name, trial_id = self._ids(trial)
            STARTED.add(trial_id)
            self.view.started(name)

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


def with_data_warnings(suite: Suite, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with the warnings their dataset's check gave before the run."""
    for row in rows:
        row["data_warnings"] = suite.data_checks.get(row["dataset"], {}).get("warnings", "[]")
    return rows


def _write_status_rows(suite: Suite, spec: TrialSpec, status: str, message: str, search_id: str = "") -> None:
    """The one row of a trial that ended without a result (error, interrupted, pruned)."""
    from .trial import result_rows
    rows = with_data_warnings(suite, result_rows(spec, None, message, 0.0, status=status, search_id=search_id))
    results.write_trial_rows(suite.output, spec.trial_id, rows)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT (Ctrl-C) or SIGTERM."""


#: the stop signals received during the running suite (see run_suite)
_STOP: list[str] = []
#: the trial ids whose Tune trial started during the running suite (an interrupted run
#: marks those, not the thousands a large matrix had not reached)
STARTED: set[str] = set()


def pending_trials(suite: Suite, resume: bool = True, dry_run: bool = False,
                   quarantine: bool = False) -> tuple[list[TrialSpec], list[TrialSpec]]:
    """(teacher trials, student trials) still to run; with ``resume`` finished ones are
    skipped (a teacher only while its checkpoint is still there). ``dry_run``: a dry run
    also skips the trials an earlier dry run already went through (a real run redoes
    them), so that an interrupted dry run continues. ``quarantine``: a run's or a search's
    own reading, which moves an unreadable row file aside (``results._read``)."""
    done = results.finished_trials(suite.output, also=("dry_run",) if dry_run else (),
                                   quarantine=quarantine) if resume else set()
    teachers = [t for t in suite.teacher_trials()
                if t.trial_id not in done or (not dry_run and not teacher_available(t))]
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
        nodes = "; ".join(f"{n.get('CPU', 0):g} CPU" + (f", {n['GPU']:g} GPU" if "GPU" in n else "")
                          for n in available) or "none"
        per = "each of its workers" if int(res.get("workers", 1)) > 1 else "it"
        raise SuiteError(f"{suite.where.get('resources', suite.file)}: resources: trial {spec.name}: {per} asks for "
                         f"{res['cpu']:g} CPU and {res['gpu']:g} GPU, but no node of the cluster has that much "
                         f"(nodes: {nodes}); lower 'resources' (of the suite or of model "
                         f"'{spec.model['name']}') or add nodes")


def _alive_nodes() -> list[dict[str, float]]:
    """Each live node's total resources, of the Ray instance this process is connected to."""
    import ray
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def local_capacity(num_cpus: int | None = None, count_gpus: bool = True) -> list[dict[str, float]]:
    """What a local Ray instance would have: this machine's CPUs (or ``--num-cpus``) and,
    with ``count_gpus``, its GPUs (counting them imports torch: a suite that asks for
    none need not wait for it)."""
    node = {"CPU": float(num_cpus or os.cpu_count() or 1)}
    if count_gpus:
        import torch
        node["GPU"] = float(torch.cuda.device_count())
    return [node]


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


#: seconds to wait for a cluster's address to answer before saying it does not
CONNECT_TIMEOUT_S = float(os.environ.get("KD_HARNESS_CONNECT_TIMEOUT_S", "10"))


class Unreachable(ConnectionError):
    """The Ray cluster named by ``--address`` / ``RAY_ADDRESS`` does not answer."""


def probe_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise :class:`Unreachable` unless something accepts a connection at a cluster
    address (``host:port`` or ``ray://host:port``) within ``timeout`` seconds: Ray itself
    would wait for it for minutes. ``auto`` and ``local`` are Ray's own and not probed."""
    import socket
    from urllib.parse import urlsplit
    if address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise Unreachable(f"Ray address '{address}' is not host:port (or ray://host:port for Ray Client)")
    if parts.scheme == "ray":
        try:
            import ray.util.client  # noqa: F401
            import grpc  # noqa: F401
        except ImportError as exc:
            raise Unreachable(f"Ray address '{address}' needs Ray Client, which this environment lacks ({exc}); "
                              f"install it with: pip install 'ray[client]' (the same version as the cluster's "
                              f"Ray), or give the head node's GCS address host:6379 from a machine in the "
                              f"cluster") from None
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise Unreachable(f"Ray address '{address}' does not answer ({exc.strerror or exc}; waited at most "
                          f"{timeout:g} s): check that the cluster is up (ray status on its head node), that "
                          f"host and port are the head's ({'Ray Client: 10001' if parts.scheme == 'ray' else 'GCS: 6379'}"
                          f" by default) and that no firewall is in between; or leave --address and RAY_ADDRESS "
                          f"unset to run on this machine") from None


@contextlib.contextmanager
def _ray_session(address: str | None, num_cpus: int | None, verbose: bool,
                 alongside: Callable[[], None] | None = None) -> Iterator[None]:
    """Ray for one ``run`` or ``tune``: the cluster at ``address`` (or ``RAY_ADDRESS``), else
    a local instance on loopback only (an exposed Ray runs any code it is sent). What it
    started it shuts down on leaving, and the mode is restored. Tune writes no result
    files of its own: the rows store is the record.

    ``alongside`` (the data and model checks before any trial) runs in a thread while a
    local Ray starts, its processes taking the other cores: the first trial starts seconds
    sooner. Its error is raised here, before any trial, and what Ray started is shut down.
    Before joining an existing cluster the checks simply come first."""
    import threading

    if address or os.environ.get("RAY_ADDRESS"):
        probe_address(address or os.environ["RAY_ADDRESS"])
    ray, mode = _loopback_ray(local=not (address or os.environ.get("RAY_ADDRESS")))
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)    # (so no result.json)
    if not verbose:     # Tune's tracebacks of what the harness reports itself (a trial's error row, a full disk)
        for name in ("ray.tune.execution.experiment_state", "ray.tune.execution.tune_controller", "ray.tune.tune"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    started = not ray.is_initialized()
    failure: list[BaseException] = []

    def side() -> None:
        try:
            alongside()
            import ray.tune  # noqa: F401 - Tune's import (a second or more) also overlaps Ray's start
        except BaseException as exc:       # raised again in the caller's thread
            failure.append(exc)
    worker = threading.Thread(target=side, name="kd-harness-checks", daemon=True) if alongside else None
    if worker is not None and (address or os.environ.get("RAY_ADDRESS") or not started):
        alongside()              # joining a cluster is quick (and may fail): the checks come first
        worker = None
    try:
        if worker is not None:
            worker.start()
        if started:
            ray.init(address=address, include_dashboard=False, num_cpus=None if address else num_cpus,
                     logging_level=logging.WARNING, log_to_driver=verbose)
        if worker is not None:
            worker.join()
            if failure:
                raise failure[0]
        yield
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
        _restore(mode)
