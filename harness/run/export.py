"""The complete OpenMMLab config of what a trial trained, written next to its weights.

Every exported student (``student.pth``) and harness-trained teacher gets a config file
beside it (``student.py``, ``<teacher>.py``) that mmdet's and mmseg's own
``tools/test.py`` and ``tools/train.py`` accept: the model as built (the suite's
overrides and the dataset's class count applied), the data pipelines and loaders
pointing at the suite's dataset exactly as the trial evaluated it (same batch size,
same pipeline), the evaluator, the schedule and the seed. ``tools/test.py <config>
<weights>`` then scores the weights as the trial did. The same config is what mmengine
dumps into the trial's own directory (``<timestamp>.py``).

Metrics the harness registers for itself are written as the library's own (the
in-process VOC metric is mmdet's ``VOCMetric``, computed in one process instead of a
pool: the same numbers), so the file needs nothing of the harness.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

#: metric types of the harness's own -> the library's type that computes the same
LIBRARY_METRICS = {"InProcessVOCMetric": "VOCMetric"}


def _library_metrics(evaluator: Any) -> Any:
    if isinstance(evaluator, list):
        return [_library_metrics(e) for e in evaluator]
    if isinstance(evaluator, dict) and evaluator.get("type") in LIBRARY_METRICS:
        return dict(evaluator, type=LIBRARY_METRICS[evaluator["type"]])
    return evaluator


def export_config(parts: dict[str, Any], scope: str | None, seed: int, train_cfg: dict[str, Any] | None = None,
                  param_scheduler: list[dict[str, Any]] | None = None,
                  optim_wrapper: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The full config of a trial's model and data (``parts`` as the task's
    ``prepare_trial`` gave them), or None for a task whose models are not built from an
    OpenMMLab config (classification's torchvision models)."""
    loaders = [parts.get("val_loader"), parts.get("train_loader")]
    if scope is None or not all(isinstance(x, dict) for x in loaders + [parts.get("model_cfg")]):
        return None
    val_loader, train_loader = (copy.deepcopy(x) for x in loaders)
    evaluator = _library_metrics(copy.deepcopy(parts["evaluator"]))
    cfg: dict[str, Any] = dict(
        default_scope=scope,
        model=copy.deepcopy(parts["model_cfg"]),
        val_dataloader=val_loader, val_evaluator=evaluator, val_cfg=dict(type="ValLoop"),
        test_dataloader=val_loader, test_evaluator=evaluator, test_cfg=dict(type="TestLoop"),
        default_hooks=dict(timer=dict(type="IterTimerHook"), logger=dict(type="LoggerHook", interval=50),
                           param_scheduler=dict(type="ParamSchedulerHook"),
                           checkpoint=dict(type="CheckpointHook", interval=1),
                           sampler_seed=dict(type="DistSamplerSeedHook")),
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="nccl")),
        log_processor=dict(type="LogProcessor", window_size=50, by_epoch=not bool((train_cfg or {}).get("max_iters"))),
        log_level="INFO", load_from=None, resume=False, randomness=dict(seed=seed))
    if train_cfg is not None:
        cfg.update(train_dataloader=train_loader, train_cfg=copy.deepcopy(train_cfg),
                   param_scheduler=copy.deepcopy(param_scheduler), optim_wrapper=copy.deepcopy(optim_wrapper))
    return cfg


def write_config(cfg: dict[str, Any], path: str | os.PathLike) -> Path:
    """``cfg`` as a config file mmengine's ``Config.fromfile`` reads (Python syntax, as
    the libraries' own configs), written atomically."""
    from mmengine.config import Config

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        Config(copy.deepcopy(cfg)).dump(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
