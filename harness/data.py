"""Dataset configs for mmengine's loaders, by format, and making sure data exists.

Datasets are read through the libraries' own dataset classes (mmdet ``CocoDataset``),
exactly as the real data would be. This module imports no backend at import time.
"""
from __future__ import annotations

import fcntl
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from . import catalog
from .registry import import_target


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_dataset(ds: dict[str, Any]) -> Path:
    """Return the dataset root, writing the synthetic dataset first when the suite asks
    for one (``synth:``) and it is absent. Safe when several trials race for it."""
    root = Path(ds["root"])
    if ds.get("synth") is None or root.exists():
        return root
    with _lock(root.parent / f".{root.name}.lock"):
        if not root.exists():
            import_target(catalog.DATASET_FORMATS.get(ds["format"])["synth"])(root, **ds["synth"])
    return root


COCO_SPLITS = {"train": ("annotations/instances_train2017.json", "train2017/"),
               "val": ("annotations/instances_val2017.json", "val2017/")}


def coco_classes(ds: dict[str, Any]) -> tuple[str, ...]:
    """Class names: the suite's ``classes``, else the categories of the train json in id order."""
    if ds.get("classes"):
        return tuple(ds["classes"])
    with open(Path(ds["root"]) / COCO_SPLITS["train"][0]) as f:
        cats = json.load(f)["categories"]
    return tuple(c["name"] for c in sorted(cats, key=lambda c: c["id"]))


def coco_dataset_cfg(ds: dict[str, Any], split: str, img_scale: list[int]) -> dict[str, Any]:
    """An mmdet ``CocoDataset`` config for one split, with the standard pipelines."""
    ann_file, img_dir = COCO_SPLITS[split]
    train = split == "train"
    pipeline: list[dict[str, Any]] = [dict(type="LoadImageFromFile"),
                                      dict(type="LoadAnnotations", with_bbox=True),
                                      dict(type="Resize", scale=tuple(img_scale), keep_ratio=True)]
    if train:
        pipeline.append(dict(type="RandomFlip", prob=0.5))
        pipeline.append(dict(type="PackDetInputs"))
    else:
        pipeline.append(dict(type="PackDetInputs", meta_keys=(
            "img_id", "img_path", "ori_shape", "img_shape", "scale_factor")))
    return dict(
        type="CocoDataset", data_root=str(ds["root"]), ann_file=ann_file,
        data_prefix=dict(img=img_dir), metainfo=dict(classes=coco_classes(ds)),
        filter_cfg=dict(filter_empty_gt=True, min_size=2) if train else None,
        test_mode=not train, pipeline=pipeline)


def evaluator_cfg(ds: dict[str, Any]) -> dict[str, Any]:
    """The metric config of a dataset's format."""
    if ds["format"] == "coco":
        return dict(type="CocoMetric", ann_file=str(Path(ds["root"]) / COCO_SPLITS["val"][0]),
                    metric="bbox", format_only=False)
    raise ValueError(f"no evaluator for dataset format '{ds['format']}'")


def num_classes(ds: dict[str, Any]) -> int:
    return len(coco_classes(ds))
