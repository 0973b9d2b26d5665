"""One trial: an mmengine ``Runner`` training (or, for a teacher given as a checkpoint,
only evaluating) a :class:`~harness.tasks.det.wrapper.DistillationModel`.

``run_trial(spec)`` works without Ray, for debugging; ``execute_trial(spec)`` wraps it
so that a failure becomes an error row instead of an exception that takes a whole run
down, and writes the trial's rows to the results store either way.
"""
from __future__ import annotations

import math
import numbers
import os
import platform
import time
import traceback
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from harness import catalog
from harness.store import results, storage
from harness.data.formats import ensure_dataset
from harness.suite.spec import TrialSpec, content_hash

Reporter = Callable[[dict[str, Any]], None]


class Diverged(RuntimeError):
    """A loss became NaN or infinite: the trial stops and its rows say ``diverged``."""


@dataclass
class TrialResult:
    """What a finished trial measured."""

    metrics: dict[str, float]
    epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    train_images_per_s: float = float("nan")
    device: str = "cpu"
    checkpoint: str | None = None
    #: provenance and cost (results schema v2)
    device_count: int = 0
    peak_memory_mb: float = float("nan")
    train_images_per_s_no_teacher: float = float("nan")
    teacher_time_share: float = float("nan")
    teacher_sha256: str = ""
    teacher_weights_hash: str = ""
    dataset_fingerprint: str = ""
    #: epoch (or iteration) the trial resumed from after a crash; 0 when it started afresh
    resumed_from: int = 0
    workers: int = 1


def weights_hash(state: dict[str, Any]) -> str:
    """sha256 over a state dict's names and tensor bytes (order-independent of devices)."""
    import hashlib

    import torch
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update((t.float() if t.dtype == torch.bfloat16 else t).numpy().tobytes())   # numpy has no bfloat16
    return h.hexdigest()


def _reset_peak_memory() -> None:
    """Start this trial's peak-memory count afresh: a Ray worker process is reused for
    trial after trial, and a process-lifetime peak would carry one trial's into the next."""
    import torch
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")      # Linux: resets VmHWM, the peak resident size
    except OSError:
        pass


def _peak_memory_mb(device: str) -> float:
    import resource

    import torch
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    try:            # since _reset_peak_memory (Linux)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # the process's peak (KiB on Linux)


# ------------------------------------------------------------------------ checkpoints
def save_weights(state_dict: dict[str, Any], path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Save ``{'state_dict', 'meta'}`` atomically (a reader never sees half a file)."""
    import torch
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"state_dict": state_dict, "meta": meta}, tmp)
        os.replace(tmp, path)
    finally:              # a full disk must not leave half a checkpoint behind
        tmp.unlink(missing_ok=True)
    return path


def _checkpoint_globals() -> list[Any]:
    """The non-tensor types mmengine's training checkpoints pickle (its message hub's
    buffers, numpy scalars): allowed one by one for ``torch.load(weights_only=True)``."""
    import numpy as np
    from mmengine.logging import HistoryBuffer
    return [HistoryBuffer, np.ndarray, np.dtype, np.core.multiarray._reconstruct, np.core.multiarray.scalar,
            type(np.dtype(np.float64)), type(np.dtype(np.int64)), type(np.dtype(np.float32)),
            type(np.dtype(np.int32))]


def load_weights(model: Any, path: str | os.PathLike) -> None:
    """Load a checkpoint's weights strictly, with ``torch.load(weights_only=True)``.

    mmengine training checkpoints also pickle a few numpy and mmengine objects; those
    types are allowed explicitly rather than turning the safety check off.
    """
    import torch
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"cannot load checkpoint '{path}': {exc}") from exc
    state = ckpt.get("state_dict", ckpt)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint '{path}' does not fit the model: missing keys "
                           f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                           f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")


# ------------------------------------------------------------------------------ hooks
def _write_progress(work_dir: Path, history: list[dict[str, Any]], stage: str, losses: list[float]) -> None:
    """The evaluations so far, next to the checkpoints: a resumed trial's curve starts
    with the evaluations made before the crash. Also the training loss of every step
    (of the global batch) since the trial (re)started, and the pid of the process."""
    import json
    results.write_text_atomic(work_dir / "progress.json", json.dumps(
        {"stage": stage, "pid": os.getpid(), "history": history, "losses": losses}))


def _read_progress(work_dir: Path) -> list[dict[str, Any]]:
    import json
    try:
        return list(json.loads((work_dir / "progress.json").read_text())["history"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _complete(path: Path) -> bool:
    """Whether a state file was written to its end: torch.save writes a zip archive whose
    directory comes last, so one cut short by a crash is not a readable archive."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def last_checkpoint(work_dir: Path) -> Path | None:
    """The newest complete training state mmengine's CheckpointHook saved in ``work_dir``,
    or None. The hook names it in ``last_checkpoint`` after saving, but a crash while it
    saves the next one can leave that name on a removed file (the hook removes the state
    past ``max_keep_ckpts`` first), a half-written name file, or a half-written state: the
    newest complete ``epoch_*`` / ``iter_*`` file is then the one to resume from."""
    try:
        named = (work_dir / "last_checkpoint").read_text().strip()
    except OSError:
        named = ""
    if named and Path(named).is_file() and _complete(Path(named)):
        return Path(named)
    saved = [(int(f.stem.split("_")[1]), f) for f in _saved_states(work_dir) if f.stem.split("_")[1].isdigit()]
    return next((f for _, f in sorted(saved, reverse=True) if _complete(f)), None)


def _saved_states(work_dir: Path) -> list[Path]:
    """The training states mmengine's CheckpointHook saved in ``work_dir``."""
    return [*work_dir.glob("epoch_*.pth"), *work_dir.glob("iter_*.pth")]


#: seconds between two progress ticks of a running trial
TICK_S = float(os.environ.get("KD_HARNESS_PROGRESS_S", "5"))


def _trial_hook(report: Reporter | None, history: list[dict[str, Any]], clock: dict[str, float],
               by_iter: bool, metric: Any, work_dir: Path | None = None, stage: str = "train",
               progress: Reporter | None = None) -> Any:
    import torch
    from mmengine.dist import all_reduce, get_world_size, is_main_process
    from mmengine.hooks import Hook

    class TrialHook(Hook):
        """Keeps the distiller's epoch current, measures training throughput and reports
        every evaluation (to Ray Tune when running under it)."""

        priority = "LOW"

        def before_train(self, runner: Any) -> None:
            # after the Runner resumed (if it did): where training starts
            start = runner.iter if by_iter else runner.epoch
            clock["resumed_from"] = clock.get("resumed_from", 0) or start
            if start and work_dir is not None:
                saved = [p for p in _read_progress(work_dir) if p["epoch"] <= clock["epoch_offset"] + start]
                if saved:
                    history[:] = saved
                # the state is saved before the evaluation that follows it: a crash in
                # between lost that evaluation, so it is made now (not skipped)
                total = runner.max_iters if by_iter else runner.max_epochs
                if (start % int(runner.train_loop.val_interval) == 0 or start == total) and \
                        not any(p["epoch"] == clock["epoch_offset"] + start for p in history):
                    runner.val_loop.run()

        def before_train_epoch(self, runner: Any) -> None:
            distiller = getattr(runner.model, "distiller", None)
            if distiller is not None:
                distiller.epoch, distiller.max_epochs = runner.epoch, runner.max_epochs
                if hasattr(runner.model, "prepare_epoch"):
                    runner.model.prepare_epoch(runner.train_dataloader)     # PGM; not timed as training
            clock["start"] = time.perf_counter()

        def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
            if "start" not in clock:
                clock["start"] = time.perf_counter()

        def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None,
                             outputs: Any = None) -> None:
            world = get_world_size()
            clock["images"] = clock.get("images", 0) + len(data_batch["inputs"]) * world
            now = time.perf_counter()
            tick = progress is not None and now - clock.get("tick", 0.0) >= TICK_S
            diverged = ""
            for name, value in (outputs or {}).items():     # the loss terms of this step
                value = float(value.detach().float().mean()) if hasattr(value, "detach") else value
                if isinstance(value, numbers.Real) and not math.isfinite(value):
                    diverged = diverged or f"{name} became {value}"
            loss = outputs.get("loss") if outputs else None
            loss = loss.detach().float().reshape(()) if hasattr(loss, "detach") else None
            if world > 1:
                # one collective: the global batch's loss (mean over workers), and whether
                # any worker's clock says tick or any worker's loss diverged: the workers
                # act together (a tick is Ray Train's report, a barrier; a worker that
                # stopped alone would leave the others waiting in the next collective)
                device = loss.device if loss is not None else None     # mmengine moves it to the backend's
                flags = torch.tensor([float(tick), float(bool(diverged))], device=device)
                both = torch.cat([loss.reshape(1) if loss is not None else torch.zeros(1, device=device), flags])
                all_reduce(both, op="sum")
                loss = both[0] / world if loss is not None else None
                tick, others_diverged = bool(both[1] > 0), bool(both[2] > 0)
                diverged = diverged or ("a loss term became non-finite on another worker" if others_diverged else "")
            if diverged:
                raise Diverged(f"{diverged} at iteration {runner.iter + 1} (epoch {runner.epoch + 1}); "
                               f"the trial was stopped there")
            if loss is not None:
                clock.setdefault("losses", []).append(float(loss))
            if tick:
                clock["tick"] = now
                seconds = clock.get("seconds", 0.0) + now - clock.get("start", now)
                progress({"progress": runner.iter + 1 if by_iter else runner.epoch + 1,
                          "of": runner.max_iters if by_iter else runner.max_epochs,
                          "unit": "iter" if by_iter else "epoch",
                          "images_per_s": clock.get("images", 0) / seconds if seconds > 0 else 0.0})

        def _stop_clock(self) -> None:
            if "start" in clock:   # iteration-based loops validate mid-"epoch", then end the "epoch"
                clock["seconds"] = clock.get("seconds", 0.0) + time.perf_counter() - clock.pop("start")

        def after_train_epoch(self, runner: Any) -> None:
            self._stop_clock()

        def before_val_epoch(self, runner: Any) -> None:
            self._stop_clock()

        def after_val_epoch(self, runner: Any, metrics: dict[str, float] | None = None) -> None:
            rename, scale = metric.get("rename", {}), float(metric.get("value_scale", 1.0))
            clean = {rename.get(k, k.split("/", 1)[-1]): float(v) * scale for k, v in (metrics or {}).items()
                     if isinstance(v, numbers.Real)}      # numpy scalars included (mmseg's)
            if not clean and metric.get("empty_value") is not None:
                runner.logger.warning("no predictions to evaluate: every %s is %s", metric.name,
                                      metric["empty_value"])
                clean = {k: float(metric["empty_value"]) for k in metric["keys"]}
            point = {"epoch": int(clock["epoch_offset"]) + (runner.iter if by_iter else runner.epoch), **clean}
            history.append(point)
            if work_dir is not None and is_main_process():
                _write_progress(work_dir, history, stage, clock.get("losses", []))
            if report is not None:     # every worker (Ray Train's report is a barrier); Tune takes the first's
                report(dict(point))

    return TrialHook()


# ------------------------------------------------------------------------ resumption
def _remove_training_states(spec: TrialSpec) -> None:
    """A finished trial keeps its exported weights and logs, not its resumable states
    (in its directory, and their copies in the run's storage)."""
    for stage_dir in (spec.trial_dir, spec.trial_dir / "finetune"):
        for f in [*_saved_states(stage_dir), stage_dir / FETCHED_STATE]:
            f.unlink(missing_ok=True)
        (stage_dir / "last_checkpoint").unlink(missing_ok=True)
    if spec.storage:
        storage.delete(storage.trial_uri(spec.storage, spec.trial_id), tree=True)


def keep_logs(spec: TrialSpec, sent: dict[Path, tuple[int, int]] | None = None) -> None:
    """Copy the trial's logs to ``<storage>/logs/<trial id>/`` (mmengine's log and scalars,
    the config it ran, its evaluations, ``error.txt``), so that they outlive the node it
    ran on; weights and states are not logs. Called with every training state saved and
    when the trial ends; ``sent``: what an earlier call copied (file: size, mtime), not
    copied again. Every attempt's logs stay (mmengine names them by time); an earlier
    attempt's ``error.txt`` does not. A copy that fails is a warning, not a failed trial:
    its rows still say how it went. One worker of a data-parallel trial copies."""
    import sys
    if not spec.storage or not spec.trial_dir.is_dir():
        return
    from mmengine.dist import is_main_process
    if not is_main_process():
        return
    sent = {} if sent is None else sent
    where = storage.logs_uri(spec.storage, spec.trial_id)
    try:
        if not (spec.trial_dir / "error.txt").is_file():
            storage.delete(storage.join(where, "error.txt"))
        for f in sorted(spec.trial_dir.rglob("*")):
            if not f.is_file() or f.suffix in (".pth", ".partial") or f.name == "last_checkpoint":
                continue
            stat = f.stat()
            if sent.get(f) != (stat.st_size, stat.st_mtime_ns):
                storage.put(f, storage.join(where, f.relative_to(spec.trial_dir).as_posix()), checksum=False)
                sent[f] = (stat.st_size, stat.st_mtime_ns)
    except OSError as exc:
        print(f"warning: trial {spec.trial_id}: its logs did not all reach the storage {where}: {exc}",
              file=sys.stderr)


#: the name a training state fetched from the run's storage gets in the trial's directory
FETCHED_STATE = "fetched_state.pth"


def _state_sync_hook(spec: TrialSpec, stage_dir: Path, stage: str, by_iter: bool, interval: int) -> Any:
    """Copies each training state the CheckpointHook saves (every ``interval`` epochs or
    iterations, and the last), and the evaluations so far, to the run's storage (one
    worker does): a trial resumed on another node, or after its node's disk is gone,
    continues from there. The trial's logs go with each state."""
    from mmengine.dist import is_main_process
    from mmengine.hooks import Hook

    class StateSyncHook(Hook):
        priority = "LOWEST"          # after the CheckpointHook (VERY_LOW) saved, and the TrialHook

        def __init__(self) -> None:
            self.sent: Path | None = None
            self.logs_sent: dict[Path, tuple[int, int]] = {}

        def _send_state(self) -> None:
            found = last_checkpoint(stage_dir)
            if found is not None and found != self.sent and is_main_process():
                storage.put(found, storage.state_uri(spec.storage, spec.trial_id, stage))
                self.sent = found
                keep_logs(spec, self.logs_sent)      # a node that dies now leaves its logs so far

        def after_train_epoch(self, runner: Any) -> None:
            if not by_iter:
                self._send_state()

        def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None,
                             outputs: Any = None) -> None:
            if by_iter and (self.every_n_train_iters(runner, interval) or self.is_last_train_iter(runner)):
                self._send_state()

        def after_val_epoch(self, runner: Any, metrics: dict[str, float] | None = None) -> None:
            if (stage_dir / "progress.json").is_file() and is_main_process():
                storage.put(stage_dir / "progress.json",
                            storage.state_uri(spec.storage, spec.trial_id, stage, "progress.json"))

    return StateSyncHook()


def fetch_state(spec: TrialSpec, stage_dir: Path, stage: str) -> Path | None:
    """The trial's last training state from the run's storage (sha256-checked), with its
    evaluations so far, into ``stage_dir``; None when the storage holds none."""
    uri = storage.state_uri(spec.storage, spec.trial_id, stage)
    if storage.stored_sha256(uri) is None:
        return None
    progress_uri = storage.state_uri(spec.storage, spec.trial_id, stage, "progress.json")
    if storage.stored_sha256(progress_uri) is not None:
        storage.fetch(progress_uri, stage_dir / "progress.json")
    return storage.fetch(uri, stage_dir / FETCHED_STATE)


def teacher_file(spec: TrialSpec) -> str:
    """The local file of a student's teacher weights, checked against the sha256 its
    teacher trial reported: the node-local checkpoint when it is that file, else fetched
    from the run's storage (into the trial's output, checked on arrival)."""
    from harness.suite.spec import file_sha256
    ckpt, want = spec.teacher_checkpoint, spec.teacher_sha256
    if ckpt and Path(ckpt).is_file() and (not want or file_sha256(ckpt) == want):
        return ckpt
    teacher = f"the teacher trial for '{spec.teacher['name']}' on '{spec.dataset['name']}'"
    if spec.storage:
        local = Path(spec.output_dir) / "teachers" / f"{spec.teacher_id}.pth"
        if local.is_file() and (not want or file_sha256(local) == want):
            return str(local)
        uri = storage.teacher_uri(spec.storage, str(spec.teacher_id))
        try:
            return str(storage.fetch(uri, local, want))
        except storage.StorageError as exc:
            raise FileNotFoundError(f"teacher weights: {exc}; {teacher} failed, has not run, or its "
                                    f"storage was changed") from None
    if ckpt and Path(ckpt).is_file():
        raise RuntimeError(f"teacher checkpoint '{ckpt}' has sha256 {file_sha256(ckpt)[:16]}… but {teacher} "
                           f"wrote {want[:16]}…: the file was changed since; delete it and run the suite again "
                           f"(the teacher is retrained)")
    raise FileNotFoundError(f"teacher checkpoint '{ckpt}' is missing: {teacher} failed or has not run")


# ------------------------------------------------------------------------------ build
def _optim_cfg(schedule: dict[str, Any]) -> dict[str, Any]:
    if schedule["optimizer"] == "sgd":
        opt = dict(type="SGD", lr=schedule["lr"], momentum=schedule["momentum"],
                   weight_decay=schedule["weight_decay"])
    else:
        opt = dict(type="AdamW", lr=schedule["lr"], weight_decay=schedule["weight_decay"])
    clip = dict(max_norm=schedule["grad_clip"], norm_type=2) if schedule.get("grad_clip") else None
    if schedule.get("amp"):     # autocast covers the whole forward, the teacher's included
        return dict(type="AmpOptimWrapper", optimizer=opt, clip_grad=clip,
                    dtype=schedule.get("amp_dtype", "float16"))
    return dict(type="OptimWrapper", optimizer=opt, clip_grad=clip)


def _loop_cfgs(schedule: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """train_cfg and param_scheduler: linear warm-up, then (policy "step") steps
    at 2/3 and 11/12 of training (mmdet's 1x: epochs 8 and 11 of 12; 2x: 16 and 22 of
    24), (policy "cosine") cosine annealing to zero, or (policy "poly") DeepLab's poly 0.9."""
    if schedule.get("iters"):
        total = int(schedule["iters"])
        train_cfg = dict(type="IterBasedTrainLoop", max_iters=total, val_interval=schedule["val_interval"])
        by_epoch = False
    else:
        total = int(schedule["epochs"])
        train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=total, val_interval=schedule["val_interval"])
        by_epoch = True
    if schedule.get("policy", "step") == "cosine":
        sched = [dict(type="CosineAnnealingLR", by_epoch=by_epoch, begin=0, end=total, T_max=total, eta_min=0.0)]
    elif schedule.get("policy") == "poly":      # DeepLab's lr * (1 - t/T)^0.9
        sched = [dict(type="PolyLR", by_epoch=by_epoch, begin=0, end=total, power=0.9, eta_min=1e-4 * schedule["lr"])]
    else:
        milestones = sorted({max(1, total * 2 // 3), max(1, total * 11 // 12)})
        sched = [dict(type="MultiStepLR", by_epoch=by_epoch, begin=0, end=total, milestones=milestones, gamma=0.1)]
    if schedule.get("warmup_iters"):
        sched.insert(0, dict(type="LinearLR", start_factor=1e-3, by_epoch=False, begin=0,
                             end=int(schedule["warmup_iters"])))
    return train_cfg, sched


def seed_trial(spec: TrialSpec) -> None:
    """Seed Python, numpy and torch from the trial's seed. The Runner seeds again when
    it starts, but models and distillers (adapters, GcBlocks, torchvision classifiers)
    are initialised before it: without this their initial weights were unseeded and
    runs of the same trial differed."""
    from mmengine.runner import set_random_seed
    set_random_seed(spec.seed)


def run_trial(spec: TrialSpec, report: Reporter | None = None, log_level: str | None = None,
              resume: bool = True, progress: Reporter | None = None) -> TrialResult:
    """Train and evaluate one trial; returns the final metrics. Raises on failure.

    The training state is saved every epoch (or ``checkpoint_interval``) in the trial's
    directory; with ``resume`` a trial whose directory holds one (a crash, a killed
    worker) continues from it, its earlier evaluations included, instead of starting
    afresh. Under Ray Train (a process group of several workers) it trains data-parallel,
    one shard of every batch per worker; the first worker reports and exports."""
    import torch
    from mmengine.dist import get_world_size, is_main_process
    from mmengine.runner import Runner

    torch.set_num_threads(max(1, int(spec.resources.get("cpu", 1))))
    _reset_peak_memory()
    seed_trial(spec)    # before any model or distiller part is initialised, not only in the Runner
    if spec.role == "student" and spec.method_name != "none":
        spec = replace(spec, teacher_checkpoint=teacher_file(spec))
    ensure_dataset(spec.dataset)
    sched = spec.schedule
    work_dir = spec.trial_dir
    work_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        _remove_training_states(spec)
    history: list[dict[str, Any]] = []
    clock: dict[str, float] = {"epoch_offset": 0}
    # the task's module builds the model (teacher loaded), the loaders and the evaluator
    parts = catalog.TASKS.load(spec.task)(spec, load_weights)
    model, model_cfg = parts["model"], parts["model_cfg"]
    train_loader, val_loader, evaluator = parts["train_loader"], parts["val_loader"], parts["evaluator"]
    finetune_loader, scope = parts.get("finetune_loader"), catalog.TASKS.get(spec.task).get("scope")
    evaluate_only = spec.role == "teacher" and spec.teacher_checkpoint and Path(spec.teacher_checkpoint).is_file()
    distributed = get_world_size() > 1          # under Ray Train: its workers' process group
    by_iter = bool(sched.get("iters"))
    metric = catalog.METRICS.get(catalog.task_metric(spec.dataset["format"]))

    def common(stage_dir: Path, stage: str) -> dict[str, Any]:
        interval = int(sched.get("checkpoint_interval") or (sched["val_interval"] if by_iter else 1))
        return dict(
            model=model, work_dir=str(stage_dir), val_dataloader=val_loader,
            val_evaluator=evaluator, val_cfg=dict(type="ValLoop"),
            default_hooks=dict(timer=dict(type="IterTimerHook"), logger=dict(type="LoggerHook", interval=50),
                               param_scheduler=dict(type="ParamSchedulerHook"),
                               sampler_seed=dict(type="DistSamplerSeedHook"),
                               # the training state, for resumption after a crash (kept: the last two,
                               # since the hook removes the older one before the new one is saved)
                               checkpoint=None if evaluate_only else dict(
                                   type="CheckpointHook", interval=interval, by_epoch=not by_iter,
                                   max_keep_ckpts=2, save_last=True)),
            custom_hooks=[_trial_hook(report, history, clock, by_iter=by_iter, metric=metric,
                                      work_dir=stage_dir, stage=stage, progress=progress)]
            + ([_state_sync_hook(spec, stage_dir, stage, by_iter, interval)] if spec.storage and not evaluate_only else []),
            randomness=dict(seed=spec.seed), default_scope=scope,
            # under Ray Train the process group exists already: mmengine uses it (and wraps
            # the model in its DistributedDataParallel) instead of starting its own
            launcher="pytorch" if distributed else "none",
            # (mmengine reads the wrapper from ``cfg``; a frozen teacher and unused branches
            # need find_unused_parameters)
            cfg=dict(model_wrapper_cfg=dict(type="MMDistributedDataParallel", find_unused_parameters=True,
                                            # on the CPU, DDP takes no device ids (mmengine's default is LOCAL_RANK)
                                            **({} if torch.cuda.is_available() else {"device_ids": None})))
            if distributed else None,
            env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend="gloo")),
            log_level=log_level or os.environ.get("KD_HARNESS_LOG_LEVEL", "INFO"),
        )

    def resume_args(stage_dir: Path, stage: str) -> dict[str, Any]:
        found = last_checkpoint(stage_dir) or (fetch_state(spec, stage_dir, stage) if spec.storage and resume else None)
        return dict(resume=True, load_from=str(found)) if found else {}

    # resuming loads a training state with torch.load(weights_only=True): allow its types.
    # (mmengine's state also pickles a getattr reference; allowed here only, for the
    # states this trial wrote into its own directory, never for a checkpoint a suite names)
    resumable = _checkpoint_globals() + [getattr]

    stamp = time.strftime("%Y%m%d_%H%M%S")
    if evaluate_only:
        load_weights(model.student, spec.teacher_checkpoint)
        Runner(**common(work_dir, "val"), experiment_name=f"{spec.trial_id}-{stamp}").val()
    else:
        train_cfg, param_scheduler = _loop_cfgs(sched)
        with torch.serialization.safe_globals(resumable):
            Runner(**common(work_dir, "train"), **resume_args(work_dir, "train"), experiment_name=f"{spec.trial_id}-{stamp}",
                   train_cfg=train_cfg, param_scheduler=param_scheduler, optim_wrapper=_optim_cfg(sched),
                   train_dataloader=train_loader).train()
        if finetune_loader is not None:     # SSLD's second stage: labelled data, reduced lr
            ft = dict(sched, epochs=int(spec.params["finetune_epochs"]), iters=None, warmup_iters=0,
                      lr=sched["lr"] * float(spec.params["finetune_lr_factor"]),
                      val_interval=int(spec.params["finetune_epochs"]))
            clock["epoch_offset"] = history[-1]["epoch"] if history else 0
            ft_cfg, ft_sched = _loop_cfgs(ft)
            ft_dir = work_dir / "finetune"
            with torch.serialization.safe_globals(resumable):
                Runner(**common(ft_dir, "finetune"), **resume_args(ft_dir, "finetune"),
                       experiment_name=f"{spec.trial_id}-{stamp}-finetune", train_cfg=ft_cfg, param_scheduler=ft_sched,
                       optim_wrapper=_optim_cfg(ft), train_dataloader=finetune_loader).train()
    if not history:
        raise RuntimeError("the trial finished without an evaluation")
    meta = {"arch": spec.model["arch"], "model_cfg": model_cfg, "trial_id": spec.trial_id,
            "method": spec.method, "dataset": spec.dataset["name"], "code_version": results.code_version()}
    student_state = model.student_state_dict()
    if not is_main_process():       # one worker exports; every worker holds the same weights
        ckpt = None
    elif spec.role == "teacher":
        ckpt = spec.teacher_checkpoint
        if not evaluate_only:
            save_weights(student_state, ckpt, meta)
        if spec.storage:            # where the students, on any node, fetch it from
            storage.put(ckpt, storage.teacher_uri(spec.storage, spec.trial_id))
    else:
        ckpt = str(save_weights(student_state, work_dir / "student.pth", meta))
    if is_main_process():
        _remove_training_states(spec)
    device = str(next(model.student.parameters()).device)
    peak = _peak_memory_mb(device)
    if device.startswith("cuda"):
        device += f" ({torch.cuda.get_device_name()})"
    images, seconds = clock.get("images", 0), clock.get("seconds", 0.0)
    teacher_s = float(getattr(model, "teacher_seconds", 0.0))
    final = {k: v for k, v in history[-1].items() if k != "epoch"}
    from harness.suite.spec import file_sha256
    if spec.role == "teacher" and ckpt:     # the weights it wrote (or evaluated), as a student will load them
        t_sha, t_hash = file_sha256(ckpt), weights_hash(model.student_state_dict())
    elif getattr(model, "teacher", None) is not None:
        t_sha, t_hash = file_sha256(spec.teacher_checkpoint), weights_hash(model.teacher.state_dict())
    else:
        t_sha, t_hash = "", ""
    from harness.data.formats import fingerprint
    return TrialResult(metrics=final, epoch=int(history[-1]["epoch"]), history=history,
                       train_images_per_s=images / seconds if seconds > 0 else float("nan"),
                       device=device, checkpoint=ckpt, device_count=torch.cuda.device_count() if "cuda" in device else 0,
                       peak_memory_mb=peak,
                       train_images_per_s_no_teacher=images / (seconds - teacher_s) if seconds > teacher_s else float("nan"),
                       teacher_time_share=teacher_s / seconds if seconds > 0 else float("nan"),
                       teacher_sha256=t_sha, teacher_weights_hash=t_hash, dataset_fingerprint=fingerprint(spec.dataset),
                       resumed_from=int(clock.get("resumed_from", 0)), workers=get_world_size())


# ------------------------------------------------------------------------------- rows
def result_rows(spec: TrialSpec, outcome: TrialResult | None, error: str, wall: float,
                status: str = "error", started: datetime | None = None,
                search_id: str = "", placement: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The trial's rows in the store's schema: one per metric, or one row with
    ``status`` (error, diverged, interrupted, pruned, dry_run) and the message.
    ``placement``: where Ray ran it (node, node_ip, accelerator_ids, attempts)."""
    import json
    metric_entry = catalog.METRICS.get(catalog.task_metric(spec.dataset["format"]))
    now = datetime.now(timezone.utc)
    started = started or now
    res = spec.resources
    workers = outcome.workers if outcome is not None else int(res.get("workers", 1))
    devices = (float(res.get("gpu") or 0) or float(res.get("cpu") or 1)) * workers
    o = outcome or TrialResult(metrics={}, epoch=-1)
    where = {"node": "", "node_ip": "", "accelerator_ids": [], "attempts": 1, **(placement or {})}
    base = {
        "node": str(where["node"]), "node_ip": str(where["node_ip"]),
        "accelerator_ids": json.dumps([str(i) for i in where["accelerator_ids"]]),
        "workers": workers, "resumed_from": o.resumed_from, "attempts": int(where["attempts"]),
        "versions": json.dumps(results.package_versions(), sort_keys=True),
        "dataset_fingerprint": o.dataset_fingerprint, "schedule_hash": content_hash(spec.schedule),
        "teacher_sha256": o.teacher_sha256, "teacher_weights_hash": o.teacher_weights_hash,
        "device_count": o.device_count, "started_at": started.isoformat(timespec="seconds"),
        "ended_at": now.isoformat(timespec="seconds"), "device_hours": wall / 3600 * devices,
        "peak_memory_mb": o.peak_memory_mb, "train_images_per_s_no_teacher": o.train_images_per_s_no_teacher,
        "teacher_time_share": o.teacher_time_share, "search_id": search_id,
        "schema_version": results.SCHEMA_VERSION, "suite": spec.suite, "trial_id": spec.trial_id,
        "trial_name": spec.name, "task": spec.task, "dataset": spec.dataset["name"], "role": spec.role,
        "teacher": spec.model["name"] if spec.role == "teacher" else (spec.teacher or {}).get("name", ""),
        "student": "" if spec.role == "teacher" else spec.model["name"],
        "method": spec.method, "method_name": spec.method_name, "params": results.params_json(spec.params),
        "seed": spec.seed, "higher_is_better": metric_entry["higher_is_better"],
        "wall_time_s": wall, "code_version": results.code_version(),
        "config_hash": content_hash(spec.to_dict()),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    def best(name: str) -> tuple[float, int, str]:
        curve = [(int(p["epoch"]), float(p[name])) for p in outcome.history if name in p]
        pick = max if metric_entry["higher_is_better"] else min
        b_epoch, b_value = pick(curve, key=lambda c: c[1]) if curve else (-1, float("nan"))
        return b_value, b_epoch, json.dumps(curve)

    rows = [] if outcome is None else [
        dict(base, metric=name, value=value, primary=name == metric_entry["primary"], epoch=outcome.epoch,
             status="ok", error="", train_images_per_s=outcome.train_images_per_s, device=outcome.device,
             **dict(zip(("best_value", "best_epoch", "curve"), best(name))))
        for name, value in outcome.metrics.items() if name in metric_entry["keys"]]
    if outcome is not None and not rows:
        error = (f"the evaluation gave none of {metric_entry.name}'s metrics "
                 f"({', '.join(metric_entry['keys'])}); it gave {sorted(outcome.metrics)}")
    return rows or [dict(base, metric=metric_entry["primary"] if status == "dry_run" else "", value=float("nan"),
                         primary=False, epoch=-1, status=status,
                         error=error, train_images_per_s=float("nan"), device=platform.node(),
                         best_value=float("nan"), best_epoch=-1, curve="[]")]


def release_runner_state(trial_id: str) -> None:
    """Drop what mmengine keeps per Runner after a trial (its logger, with the open log
    file, message hub, visualizer, scope; named after the trial): Ray reuses a trial's
    process for later trials, and a long suite would otherwise pile them up."""
    from mmengine.logging import MessageHub, MMLogger
    from mmengine.registry import DefaultScope
    from mmengine.visualization import Visualizer
    for manager in (MMLogger, MessageHub, Visualizer, DefaultScope):
        for name in [n for n in manager._instance_dict if n.startswith(trial_id)]:
            instance = manager._instance_dict.pop(name)
            for handler in list(getattr(instance, "handlers", [])):
                handler.close()
                instance.removeHandler(handler)


def execute_trial(spec: TrialSpec, report: Reporter | None = None, log_level: str | None = None,
                  search_id: str = "", placement: dict[str, Any] | None = None, write: bool = True,
                  resume: bool = True, dry_run: bool = False,
                  progress: Reporter | None = None) -> tuple[list[dict[str, Any]], BaseException | None]:
    """Run a trial and make its rows (ok or error); never raises for a failure of the
    trial itself, returns it instead. ``write``: write the rows to the store here (without
    Ray); under Ray the driver writes them. ``dry_run``: train nothing, return one
    well-formed row with status ``dry_run``."""
    start, started = time.perf_counter(), datetime.now(timezone.utc)
    outcome, error, exc, status = None, "", None, "error"
    if dry_run:      # $KD_HARNESS_DRY_RUN_SECONDS: hold the trial's resources that long (to see packing)
        time.sleep(float(os.environ.get("KD_HARNESS_DRY_RUN_SECONDS", "0")))
        status, error = "dry_run", "run --dry-run: nothing was trained"
    else:
        (spec.trial_dir / "error.txt").unlink(missing_ok=True)        # an earlier attempt's
        try:
            outcome = run_trial(spec, report=report, log_level=log_level, resume=resume, progress=progress)
        except Exception as e:   # a failing trial must not take the others down
            exc = e
            tb = traceback.format_exc()
            (spec.trial_dir).mkdir(parents=True, exist_ok=True)
            (spec.trial_dir / "error.txt").write_text(tb)
            error = f"{type(e).__name__}: {e}"
            status = "diverged" if isinstance(e, Diverged) else "error"
        finally:
            release_runner_state(spec.trial_id)
    rows = result_rows(spec, outcome, error, time.perf_counter() - start, status, started, search_id, placement)
    if not dry_run:
        keep_logs(spec)
    if write:
        results.write_trial_rows(spec.output_dir, spec.trial_id, rows)
    return rows, exc
