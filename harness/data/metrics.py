"""Metric classes the harness registers with mmdet.

:class:`InProcessVOCMetric` is mmdet's ``VOCMetric`` evaluated in the calling process.
mmdet's ``eval_map`` defaults to a pool of 4 worker processes; forked inside a Ray
trial (a threaded process) that pool deadlocked here after the first evaluation, and a
trial never finished. The computation is the same, one process instead of four.
"""
from __future__ import annotations

import functools
from typing import Any
from unittest import mock

from mmdet.evaluation.functional import eval_map
from mmdet.evaluation.metrics import VOCMetric
from mmdet.evaluation.metrics import voc_metric as _voc_module
from mmdet.registry import METRICS


@METRICS.register_module(force=True)
class InProcessVOCMetric(VOCMetric):
    """``VOCMetric`` whose ``eval_map`` runs with ``nproc=1`` (see the module docstring)."""

    def compute_metrics(self, results: list) -> dict[str, Any]:
        with mock.patch.object(_voc_module, "eval_map", functools.partial(eval_map, nproc=1)):
            return super().compute_metrics(results)
