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


def det_pipeline(train: bool, img_scale: list[int]) -> list[dict[str, Any]]:
    """mmdet's standard detection pipelines (resize keeping the aspect ratio, flip)."""
    pipeline: list[dict[str, Any]] = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True),
                                      dict(type="Resize", scale=tuple(img_scale), keep_ratio=True)]
    if train:
        return pipeline + [dict(type="RandomFlip", prob=0.5), dict(type="PackDetInputs")]
    return pipeline + [dict(type="PackDetInputs", meta_keys=(
        "img_id", "img_path", "ori_shape", "img_shape", "scale_factor"))]


class DatasetFormat:
    """How one on-disk layout becomes mmengine dataset and evaluator configs."""

    def classes(self, ds: dict[str, Any]) -> tuple[str, ...]:
        """The suite's ``classes``, else the synthetic data's, else the format's own."""
        if ds.get("classes"):
            return tuple(ds["classes"])
        if ds.get("synth") is not None:
            from .synth import shape_classes
            return shape_classes()
        return self.default_classes(ds)

    def default_classes(self, ds: dict[str, Any]) -> tuple[str, ...]:
        raise NotImplementedError

    def dataset(self, ds: dict[str, Any], split: str, img_scale: list[int]) -> dict[str, Any]:
        raise NotImplementedError

    def evaluator(self, ds: dict[str, Any]) -> Any:
        raise NotImplementedError


class CocoFormat(DatasetFormat):
    """COCO: ``annotations/instances_{train,val}2017.json`` and the image folders."""

    splits = {"train": ("annotations/instances_train2017.json", "train2017/"),
              "val": ("annotations/instances_val2017.json", "val2017/")}

    def default_classes(self, ds: dict[str, Any]) -> tuple[str, ...]:
        """The categories of the train json, in id order."""
        with open(Path(ds["root"]) / self.splits["train"][0]) as f:
            cats = json.load(f)["categories"]
        return tuple(c["name"] for c in sorted(cats, key=lambda c: c["id"]))

    def dataset(self, ds: dict[str, Any], split: str, img_scale: list[int]) -> dict[str, Any]:
        ann_file, img_dir = self.splits[split]
        train = split == "train"
        return dict(type="CocoDataset", data_root=str(ds["root"]), ann_file=ann_file,
                    data_prefix=dict(img=img_dir), metainfo=dict(classes=self.classes(ds)),
                    filter_cfg=dict(filter_empty_gt=True, min_size=2) if train else None,
                    test_mode=not train, pipeline=det_pipeline(train, img_scale))

    def evaluator(self, ds: dict[str, Any]) -> Any:
        return dict(type="CocoMetric", ann_file=str(Path(ds["root"]) / self.splits["val"][0]),
                    metric="bbox", format_only=False)


class VocFormat(DatasetFormat):
    """Pascal VOC detection, ``root`` being the ``VOCdevkit`` folder: training on the
    ``trainval`` lists of every year present (VOC2007, and VOC2012 when there: the
    07+12 protocol), evaluation on ``VOC2007/ImageSets/Main/test.txt``, by VOC07
    11-point mAP and area mAP at IoU 0.5."""

    def default_classes(self, ds: dict[str, Any]) -> tuple[str, ...]:
        from mmdet.datasets import VOCDataset
        return tuple(VOCDataset.METAINFO["classes"])

    def _one(self, ds: dict[str, Any], year: str, listing: str, train: bool, img_scale: list[int]) -> dict:
        return dict(type="VOCDataset", data_root=str(ds["root"]), ann_file=f"{year}/ImageSets/Main/{listing}.txt",
                    data_prefix=dict(sub_data_root=f"{year}/"), metainfo=dict(classes=self.classes(ds)),
                    filter_cfg=dict(filter_empty_gt=True, min_size=2) if train else None,
                    test_mode=not train, pipeline=det_pipeline(train, img_scale))

    def dataset(self, ds: dict[str, Any], split: str, img_scale: list[int]) -> dict[str, Any]:
        if split != "train":
            return self._one(ds, "VOC2007", "test", False, img_scale)
        years = [y for y in ("VOC2007", "VOC2012")
                 if (Path(ds["root"]) / y / "ImageSets" / "Main" / "trainval.txt").is_file()]
        parts = [self._one(ds, y, "trainval", True, img_scale) for y in years]
        return parts[0] if len(parts) == 1 else dict(type="ConcatDataset", datasets=parts)

    def evaluator(self, ds: dict[str, Any]) -> Any:
        import harness.metrics  # noqa: F401 - registers InProcessVOCMetric
        return [dict(type="InProcessVOCMetric", metric="mAP", eval_mode="11points", prefix="voc07"),
                dict(type="InProcessVOCMetric", metric="mAP", eval_mode="area", prefix="voc_area")]


class ImageNetFormat(DatasetFormat):
    """ImageNet-style folders, read by :class:`harness.cls.ImageFolder` (classification
    trials build their loaders directly, see :mod:`harness.cls`)."""

    def default_classes(self, ds: dict[str, Any]) -> tuple[str, ...]:
        from .cls import folder_classes
        return folder_classes(ds["root"])

    def classes(self, ds: dict[str, Any]) -> tuple[str, ...]:
        # the folders are the labels, synthetic or not
        return tuple(ds["classes"]) if ds.get("classes") else self.default_classes(ds)


def dataset_format(ds: dict[str, Any]) -> DatasetFormat:
    return import_target(catalog.DATASET_FORMATS.get(ds["format"]).target)()


def num_classes(ds: dict[str, Any]) -> int:
    return len(dataset_format(ds).classes(ds))
