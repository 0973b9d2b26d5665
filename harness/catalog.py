"""Everything the harness knows by name: methods, model architectures, dataset formats
and metrics. Pure data plus lazy targets, so ``harness ls`` and ``harness plan`` run
without importing torch, mmdet or ray.

A method's hyperparameters and the paper's defaults are declared here, once; the
method's class receives the resolved values. Per-family defaults (FGD uses different
weights for one-stage, two-stage, FCOS and RepPoints detectors) are keyed by the
``family`` of the student architecture.
"""
from __future__ import annotations

from typing import Any

from .registry import Registry

METHODS = Registry("method")
ARCHS = Registry("architecture")
DATASET_FORMATS = Registry("dataset format")
METRICS = Registry("metric")

# ---------------------------------------------------------------------------- metrics
METRICS.register(
    "coco_bbox", task="det", primary="bbox_mAP", higher_is_better=True,
    keys=("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l"),
    # CocoMetric returns nothing when the model made no detection at all: AP is then 0
    empty_value=0.0,
    doc="COCO box AP through mmdet's CocoMetric (pycocotools), in [0, 1]",
)

# -------------------------------------------------------------------- dataset formats
DATASET_FORMATS.register(
    "coco", target="harness.data:coco_dataset_cfg", task="det", metric="coco_bbox",
    synth="harness.synth:write_coco",
    synth_params=("train_images", "val_images", "image_size", "max_objects", "seed"),
    doc="COCO layout: <root>/{train2017,val2017}/*.jpg, <root>/annotations/instances_{train,val}2017.json",
)

# ----------------------------------------------------------------------- architectures
# `levels`: strides of the FPN outputs a feature distiller taps, in order.
# `family`: selects a method's per-family defaults.
ARCHS.register(
    "retinanet", task="det", family="one_stage", stages=1,
    config="mmdet::retinanet/retinanet_r50_fpn_1x_coco.py",
    levels=(8, 16, 32, 64, 128),
    doc="RetinaNet with ResNet backbone and FPN (P3-P7)",
)

# ----------------------------------------------------------------------------- methods
METHODS.register(
    "none", target=None, tasks=("det",), params={},
    doc="the student trained alone with the same schedule and seed: the reference for every gain",
)

_FGD_DEFAULTS: dict[str, dict[str, float]] = {
    # (T, alpha, beta, gamma, lambda) from the FGD paper / released configs.
    "one_stage": {"temp": 0.5, "alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lambda": 5e-6},
    "two_stage": {"temp": 0.5, "alpha": 5e-5, "beta": 2.5e-5, "gamma": 5e-5, "lambda": 5e-7},
    "reppoints": {"temp": 0.5, "alpha": 1.6e-3, "beta": 8e-4, "gamma": 8e-4, "lambda": 8e-6},
    "fcos": {"temp": 0.8, "alpha": 1.6e-3, "beta": 8e-4, "gamma": 8e-4, "lambda": 8e-6},
}
METHODS.register(
    "fgd", target="methods.fgd:FGD", tasks=("det",),
    params=dict(_FGD_DEFAULTS["one_stage"]),
    family_params=_FGD_DEFAULTS,
    needs_same_levels=True,
    doc="Focal and Global Distillation (Yang et al., CVPR 2022)",
)


def method_params(method: str, family: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The method's hyperparameters for a student of ``family``: paper defaults, then
    the per-family defaults, then the suite's overrides (already validated)."""
    entry = METHODS.get(method)
    params = dict(entry["params"])
    params.update(entry.get("family_params", {}).get(family, {}))
    params.update(overrides or {})
    return params


def task_metric(task_or_format: str) -> str:
    """The metric name of a dataset format."""
    return DATASET_FORMATS.get(task_or_format)["metric"]
