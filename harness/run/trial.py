"""One trial: an mmengine ``Runner`` training (or, for a teacher given as a checkpoint,
only evaluating) a :class:`~harness.tasks.det.wrapper.DistillationModel`.

``run_trial(spec)`` works without Ray, for debugging; ``execute_trial(spec)`` wraps it
so that a failure becomes an error row instead of an exception that takes a whole run
down, and writes the trial's rows to the results store either way.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import traceback
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness import catalog
from harness.data.formats import ensure_dataset
from harness.store import results, storage
from harness.suite.spec import TrialSpec

from .export import export_config, write_config
from .hooks import Diverged, Reporter, _trial_hook
from .rows import TrialResult, result_rows
from .states import (_remove_training_states, _state_sync_hook, fetch_state, keep_logs, last_checkpoint, teacher_file,
                     teacher_lock)
from .weights import _checkpoint_globals, harden_loading, load_weights, non_finite, save_weights, weights_hash


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

    harden_loading()          # on a cluster's node too: every torch.load weights-only, whatever its environment
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
    # the complete OpenMMLab config of the trained model and its data, beside its weights
    train_cfg, param_scheduler = _loop_cfgs(sched)
    exported = None if evaluate_only else export_config(parts, scope, spec.seed, train_cfg, param_scheduler,
                                                        _optim_cfg(sched))

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
            # (the full config of what is trained, which mmengine dumps as <timestamp>.py)
            cfg=dict(exported or {}, **(dict(model_wrapper_cfg=dict(
                type="MMDistributedDataParallel", find_unused_parameters=True,
                # on the CPU, DDP takes no device ids (mmengine's default is LOCAL_RANK)
                **({} if torch.cuda.is_available() else {"device_ids": None}))) if distributed else {})) or None,
            env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend="gloo")),
            log_level=log_level or os.environ.get("KD_HARNESS_LOG_LEVEL", "INFO"),
        )

    def resume_args(stage_dir: Path, stage: str) -> dict[str, Any]:
        found = last_checkpoint(stage_dir) or (fetch_state(spec, stage_dir, stage) if spec.storage and resume else None)
        return dict(resume=True, load_from=str(found)) if found else {}

    # resuming loads a training state with torch.load(weights_only=True): allow its types
    # (mmengine's message hub pickles getattr(HistoryBuffer, <method>): only that is given)
    resumable = _checkpoint_globals()

    stamp = time.strftime("%Y%m%d_%H%M%S")
    if evaluate_only:
        load_weights(model.student, spec.teacher_checkpoint)
        Runner(**common(work_dir, "val"), experiment_name=f"{spec.trial_id}-{stamp}").val()
    else:
        with torch.serialization.safe_globals(resumable):
            Runner(**common(work_dir, "train"), **resume_args(work_dir, "train"), experiment_name=f"{spec.trial_id}-{stamp}",
                   train_cfg=train_cfg, param_scheduler=param_scheduler, optim_wrapper=_optim_cfg(sched),
                   train_dataloader=train_loader).train()
        if finetune_loader is not None:     # SSLD's second stage: labelled data, reduced lr
            ft = dict(sched, epochs=int(spec.params["finetune_epochs"]), iters=None, warmup_iters=0,
                      lr=sched["lr"] * float(spec.params["finetune_lr_factor"]),
                      val_interval=int(spec.params["finetune_epochs"]))
            clock["epoch_offset"] = history[-1]["epoch"] if history else 0
            clock["iters_before"] = clock.get("iters", 0)
            ft_cfg, ft_sched = _loop_cfgs(ft)
            ft_dir = work_dir / "finetune"
            with torch.serialization.safe_globals(resumable):
                Runner(**common(ft_dir, "finetune"), **resume_args(ft_dir, "finetune"),
                       experiment_name=f"{spec.trial_id}-{stamp}-finetune", train_cfg=ft_cfg, param_scheduler=ft_sched,
                       optim_wrapper=_optim_cfg(ft), train_dataloader=finetune_loader).train()
    if not history:
        raise RuntimeError("the trial finished without an evaluation")
    final = {k: v for k, v in history[-1].items() if k != "epoch"}
    unreal = sorted(k for k, v in final.items() if not math.isfinite(float(v)))
    if unreal:             # a NaN score is no score: the trial is not 'ok' (and a teacher's students wait for none)
        raise RuntimeError(f"the evaluation gave values that are not finite: "
                           f"{', '.join(f'{k}={final[k]}' for k in unreal)}")
    student_state = model.student_state_dict()
    bad = non_finite(student_state) if spec.role == "teacher" else []
    if bad:
        raise RuntimeError(f"the teacher's weights are not finite (NaN or infinite) in {len(bad)} tensor(s), "
                           f"e.g. {bad[:3]}; its students would learn from nothing real")
    meta = {"arch": spec.model["arch"], "model_cfg": model_cfg, "trial_id": spec.trial_id,
            "method": spec.method, "dataset": spec.dataset["name"], "code_version": results.code_version()}
    if not is_main_process():       # one worker exports; every worker holds the same weights
        ckpt = None
    elif spec.role == "teacher":
        ckpt = spec.teacher_checkpoint
        if not evaluate_only:
            save_weights(student_state, ckpt, meta)
            if exported is not None:
                write_config(exported, Path(ckpt).with_suffix(".py"))
        if spec.storage:            # where the students, on any node, fetch it from
            storage.put(ckpt, storage.teacher_uri(spec.storage, spec.trial_id))
    else:
        ckpt = str(save_weights(student_state, work_dir / "student.pth", meta))
        if exported is not None:
            write_config(exported, work_dir / "student.py")
    if is_main_process():
        _remove_training_states(spec)
    device = str(next(model.student.parameters()).device)
    peak = _peak_memory_mb(device)
    if device.startswith("cuda"):
        device += f" ({torch.cuda.get_device_name()})"
    images, seconds = clock.get("images", 0), clock.get("seconds", 0.0)
    teacher_s = float(getattr(model, "teacher_seconds", 0.0))
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
                       resumed_from=int(clock.get("resumed_from", 0)), workers=get_world_size(),
                       train_iters=int(clock.get("iters", 0)))


def disk_full_note(trial_dir: Path, error: BaseException) -> str:
    """When a trial failed because its disk is full (the error says so, or its disk has
    under 1 MiB left): what was being written (the trial's newest file) and what was
    removed, the training states cut short (a resume reads the newest complete one; a
    cut file only takes the room a rerun needs). Empty otherwise."""
    import errno

    from .states import DISK_FULL_BELOW, _complete, _saved_states, free_bytes
    said = f"{type(error).__name__}: {error}"
    free = free_bytes(trial_dir) if trial_dir.exists() else None
    if not (getattr(error, "errno", None) == errno.ENOSPC or "No space left" in said or "file write failed" in said
            or (free is not None and free < DISK_FULL_BELOW)):
        return ""
    files = [p for p in trial_dir.rglob("*") if p.is_file()] if trial_dir.exists() else []
    newest = max(files, key=lambda p: p.stat().st_mtime_ns, default=None)
    cut = [f for stage in (trial_dir, trial_dir / "finetune") for f in _saved_states(stage) if not _complete(f)]
    for f in cut:
        f.unlink(missing_ok=True)
    return (f"; the disk is full ({free if free is not None else '?'} bytes free at {trial_dir})"
            + (f": {newest} was being written" if newest is not None else "")
            + (f"; removed the training state(s) cut short: {', '.join(f.name for f in cut)}" if cut else ""))


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
                  resume: bool = True, dry_run: bool = False, progress: Reporter | None = None,
                  lock: bool = True) -> tuple[list[dict[str, Any]], BaseException | None]:
    """Run a trial and make its rows (ok or error); never raises for a failure of the
    trial itself, returns it instead. ``write``: write the rows to the store here (without
    Ray); under Ray the driver writes them. ``dry_run``: train nothing, return one
    well-formed row with status ``dry_run``. ``lock``: hold the teacher cache entry's lock
    (:func:`~harness.run.states.teacher_lock`) while a teacher trial trains or evaluates
    it (False on Ray Train's workers, whose trial holds it)."""
    start, started = time.perf_counter(), datetime.now(timezone.utc)
    outcome, error, exc, status = None, "", None, "error"
    if dry_run:      # $KD_HARNESS_DRY_RUN_SECONDS: hold the trial's resources that long (to see packing)
        time.sleep(float(os.environ.get("KD_HARNESS_DRY_RUN_SECONDS", "0")))
        status, error = "dry_run", "run --dry-run: nothing was trained"
    else:
        (spec.trial_dir / "error.txt").unlink(missing_ok=True)        # an earlier attempt's
        try:
            with teacher_lock(spec) if lock else contextlib.nullcontext():
                outcome = run_trial(spec, report=report, log_level=log_level, resume=resume, progress=progress)
        except Exception as e:   # a failing trial must not take the others down
            exc = e
            error = f"{type(e).__name__}: {e}"
            status = "diverged" if isinstance(e, Diverged) else "error"
            full = disk_full_note(spec.trial_dir, e)
            error += full
            try:
                (spec.trial_dir).mkdir(parents=True, exist_ok=True)
                (spec.trial_dir / "error.txt").write_text(traceback.format_exc() + full)
            except OSError as write_error:    # a full disk: the row still says why
                (spec.trial_dir / "error.txt").unlink(missing_ok=True)      # (not an empty or cut one)
                error += f" (and its error.txt could not be written: {write_error.strerror or write_error})"
        finally:
            release_runner_state(spec.trial_id)
    rows = result_rows(spec, outcome, error, time.perf_counter() - start, status, started, search_id, placement)
    if not dry_run:
        try:
            keep_logs(spec)
        except OSError as copy_error:         # the storage full or gone: the rows still travel to the driver
            for row in rows:
                row["error"] = (row["error"] + "; " if row["error"] else "") + \
                    f"its logs could not be kept: {copy_error.strerror or copy_error}"
    if write:
        results.write_trial_rows(spec.output_dir, spec.trial_id, rows)
    return rows, exc
