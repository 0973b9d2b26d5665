"""The hook every trial's Runner carries: keeps the distiller's epoch current, measures
training throughput, stops a trial whose loss is not finite (:class:`Diverged`), sends
live progress ticks and reports every evaluation (to Ray Tune when running under it)."""
from __future__ import annotations

import math
import numbers
import os
import time
from pathlib import Path
from typing import Any, Callable

from .states import _read_progress, _write_progress

Reporter = Callable[[dict[str, Any]], None]


class Diverged(RuntimeError):
    """A loss became NaN or infinite: the trial stops and its rows say ``diverged``."""



#: seconds between two progress ticks of a running trial
TICK_S = float(os.environ.get("KD_HARNESS_PROGRESS_S", "5"))


def trained_model(runner: Any) -> Any:
    """The trial's own model (student, teacher, distiller) inside the Runner: with several
    workers mmengine wraps it in its DistributedDataParallel, whose attributes are the
    wrapper's, not the model's (``runner.model.distiller`` is then not found, and a
    distiller's epoch and per-epoch step silently never happen). Every place that reaches
    into the trained model goes through this."""
    from mmengine.model import is_model_wrapper
    model = runner.model
    return model.module if is_model_wrapper(model) else model


def one_worker_view(loader: Any) -> Any:
    """The training data as one worker iterates it this epoch: every image once, in the
    order a single worker's sampler gives, in global batches (the workers' batch size
    times their number). A per-epoch step that learns from the data (GKP's prototypes)
    runs over this on every worker, so that it finds on n workers what it finds on one
    instead of what one shard holds; an iteration-based schedule's endless stream gives
    one pass (its first images). One worker of an epoch-based schedule: the loader."""
    import copy
    import itertools

    import torch
    from mmengine.dataset import DefaultSampler, InfiniteSampler
    from mmengine.dist import get_world_size
    world, sampler = get_world_size(), loader.sampler
    if world == 1 and not isinstance(sampler, InfiniteSampler):
        return loader
    if not isinstance(sampler, (DefaultSampler, InfiniteSampler)):
        raise TypeError(f"a per-epoch step on {world} workers needs mmengine's DefaultSampler or InfiniteSampler "
                        f"to see the whole data as one worker would, not {type(sampler).__name__}")
    if isinstance(sampler, DefaultSampler):
        whole = copy.copy(sampler)           # the same seed and epoch, as the first of one worker
        whole.rank, whole.world_size = 0, 1
        whole.num_samples = whole.total_size = len(sampler.dataset)
        order: Any = whole
    else:       # a fresh stream from the same seed (the sampler's own is the training's: not consumed here)
        order = list(itertools.islice(sampler._infinite_indices(), len(sampler.dataset)))
    return torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size * world, sampler=order,
                                       collate_fn=loader.collate_fn, num_workers=0)


def data_epochs(runner: Any, by_iter: bool) -> tuple[int, int]:
    """(epoch, max_epochs) as a distiller sees them, counted from 0: the Runner's for an
    epoch-based schedule; for an iteration-based one, passes over the training data
    (images seen by all workers // the dataset's size, of as many as the schedule's
    iterations make): mmengine's IterBasedTrainLoop says epoch 0 of 1 throughout, which
    froze every epoch-dependent weight (ICSD's ALW, GKP's decay) at its start."""
    if not by_iter:
        return runner.epoch, runner.max_epochs
    from mmengine.dist import get_world_size
    loader = runner.train_dataloader
    per_iter, size = loader.batch_size * get_world_size(), max(1, len(loader.dataset))
    return runner.iter * per_iter // size, max(1, -(-runner.max_iters * per_iter // size))


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

        def _new_epoch(self, runner: Any) -> None:
            """The distiller's epoch made current and, at a new one, its per-epoch step."""
            model = trained_model(runner)
            distiller = getattr(model, "distiller", None)
            if distiller is None:
                return
            epoch, total = data_epochs(runner, by_iter)
            if clock.get("distiller_epoch") == (id(runner), epoch):     # (a fine-tune stage's Runner is another)
                return
            clock["distiller_epoch"] = (id(runner), epoch)
            distiller.epoch, distiller.max_epochs = epoch, total
            if hasattr(model, "prepare_epoch"):     # PGM; not timed as training
                model.prepare_epoch(one_worker_view(runner.train_dataloader))

        def before_train_epoch(self, runner: Any) -> None:
            if not by_iter:
                self._new_epoch(runner)
            clock["start"] = time.perf_counter()

        def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
            if by_iter:       # every pass over the data an epoch (the PGM step is not timed)
                paused = time.perf_counter()
                self._new_epoch(runner)
                if "start" in clock:
                    clock["start"] += time.perf_counter() - paused
            if "start" not in clock:
                clock["start"] = time.perf_counter()

        def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None,
                             outputs: Any = None) -> None:
            world = get_world_size()
            clock["images"] = clock.get("images", 0) + len(data_batch["inputs"]) * world
            clock["iters"] = clock.get("iters_before", 0) + runner.iter + 1     # (a resumed runner's too)
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
