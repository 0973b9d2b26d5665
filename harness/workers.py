"""Data-parallel trials: one trial trained on ``resources.workers`` Ray Train workers.

The Tune trial (a small driver) starts a Ray Train ``TorchTrainer`` whose workers each
run the same :func:`~harness.trial.execute_trial`: Ray sets up the process group (gloo
on the CPU, NCCL on GPUs), mmengine's Runner finds it, shards every batch across the
workers and synchronises the gradients (its DistributedDataParallel wrapper). Every
worker reports each evaluation (Ray Train's report is a barrier); Ray forwards the first
worker's to Tune, and with it, at the end, the trial's rows.
"""
from __future__ import annotations

from typing import Any

from . import storage
from .spec import TrialSpec


def _worker_loop(config: dict[str, Any]) -> None:
    import ray.train

    from .trial import execute_trial
    from .tune import ROWS_KEY, _placement, _rows_message

    spec = TrialSpec.from_dict(config["trial"])
    ctx = ray.train.get_context()
    rows, _ = execute_trial(spec, report=lambda point: ray.train.report(point), placement=_placement(),
                            write=False, resume=config.get("resume", True))
    # the first worker's rows are the trial's; the others report too (a barrier)
    ray.train.report({ROWS_KEY: _rows_message(rows) if ctx.get_world_rank() == 0 else ""})


def train_on_workers(spec: TrialSpec, resume: bool = True) -> None:
    """Train ``spec`` on its workers from inside a Tune trial; their reports reach Tune
    (evaluations, then the rows) through Ray's TuneReportCallback."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = spec.resources
    gpu = float(res.get("gpu") or 0)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"trial": spec.to_dict(), "resume": resume},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=int(res["workers"]), use_gpu=gpu > 0,
                                     resources_per_worker={"CPU": float(res["cpu"]), **({"GPU": gpu} if gpu else {})}),
        run_config=RunConfig(name=f"train-{spec.trial_id}",
                             storage_path=storage.join(storage.ray_path(spec.storage, spec.output_dir), "train"),
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()
