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

from harness import catalog
from harness.registry import import_target

from .synth import CITYSCAPES_CLASSES, VOC_SEG_CLASSES


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
    for one (``synth:``) and it is absent (the writer records how, ``harness.suite.paths.SYNTH_MARKER``). Safe
    when several trials race for it."""
    root = Path(ds["root"])
    if ds.get("synth") is None or root.exists():
        return root
    with _lock(root.parent / f".{root.name}.lock"):
        if not root.exists():
            import_target(catalog.DATASET_FORMATS.get(ds["format"])["synth"])(root, **ds["synth"])   # (and its record)
    return root


def det_pipeline(train: bool, img_scale: list[int], with_mask: bool = False) -> list[dict[str, Any]]:
    """mmdet's standard detection pipelines (resize keeping the aspect ratio, flip);
    ``with_mask``: the instances' masks too, for training a detector with a mask head."""
    pipeline: list[dict[str, Any]] = [dict(type="LoadImageFromFile"),
                                      dict(type="LoadAnnotations", with_bbox=True, with_mask=with_mask and train),
                                      dict(type="Resize", scale=tuple(img_scale), keep_ratio=True)]
    if train:
        return pipeline + [dict(type="RandomFlip", prob=0.5), dict(type="PackDetInputs")]
    return pipeline + [dict(type="PackDetInputs", meta_keys=(
        "img_id", "img_path", "ori_shape", "img_shape", "scale_factor"))]


class DatasetFormat:
    """How one on-disk layout becomes mmengine dataset and evaluator configs."""

    #: the format's own class list comes from mmdet / mmseg (importing them imports torch)
    classes_from_library = False

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

    def check_classes(self, ds: dict[str, Any]) -> None:
        """Raise ``ValueError`` when the suite's ``classes`` name a class the data does not
        have: the libraries' datasets drop such a name silently and train a model with
        fewer classes than the suite says (a misspelt class is then a model that never
        sees it)."""
        wanted = ds.get("classes") or []
        if not wanted:
            return
        have = self.default_classes(ds)
        unknown = [c for c in wanted if c not in have]
        if unknown:
            from harness.registry import preview, suggest
            raise ValueError(f"classes: {', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} "
                             f"not among the {len(have)} classes of the data{suggest(unknown[0], list(have))}; "
                             f"the data has: {preview(have, 12)}")

    def dataset(self, ds: dict[str, Any], split: str, img_scale: list[int],
                crop: list[int] | None = None) -> dict[str, Any]:
        """The dataset config of a split; ``crop`` is the training crop [h, w] where the
        format's pipeline has one (segmentation), ignored otherwise."""
        raise NotImplementedError

    def evaluator(self, ds: dict[str, Any]) -> Any:
        raise NotImplementedError


class CocoFormat(DatasetFormat):
    """COCO: ``annotations/instances_{train,val}2017.json`` and the image folders."""

    splits = {"train": ("annotations/instances_train2017.json", "train2017/"),
              "val": ("annotations/instances_val2017.json", "val2017/")}

    def default_classes(self, ds: dict[str, Any]) -> tuple[str, ...]:
        """The categories of the train json, in id order."""
        cats = _read_json(Path(ds["root"]) / self.splits["train"][0])["categories"]
        return tuple(c["name"] for c in sorted(cats, key=lambda c: c["id"]))

    def dataset(self, ds: dict[str, Any], split: str, img_scale: list[int],
                crop: list[int] | None = None, with_mask: bool = False) -> dict[str, Any]:
        ann_file, img_dir = self.splits[split]
        train = split == "train"
        return dict(type="CocoDataset", data_root=str(ds["root"]), ann_file=ann_file,
                    data_prefix=dict(img=img_dir), metainfo=dict(classes=self.classes(ds)),
                    filter_cfg=dict(filter_empty_gt=True, min_size=2) if train else None,
                    test_mode=not train, pipeline=det_pipeline(train, img_scale, with_mask))

    def evaluator(self, ds: dict[str, Any]) -> Any:
        return dict(type="CocoMetric", ann_file=str(Path(ds["root"]) / self.splits["val"][0]),
                    metric="bbox", format_only=False)


class VocFormat(DatasetFormat):
    """Pascal VOC detection, ``root`` being the ``VOCdevkit`` folder: training on the
    ``trainval`` lists of every year present (VOC2007, and VOC2012 when there: the
    07+12 protocol), evaluation on ``VOC2007/ImageSets/Main/test.txt``, by VOC07
    11-point mAP and area mAP at IoU 0.5."""

    classes_from_library = True

    def default_classes(self, ds: dict[str, Any]) -> tuple[str, ...]:
        from mmdet.datasets import VOCDataset
        return tuple(VOCDataset.METAINFO["classes"])

    def _one(self, ds: dict[str, Any], year: str, listing: str, train: bool, img_scale: list[int]) -> dict:
        return dict(type="VOCDataset", data_root=str(ds["root"]), ann_file=f"{year}/ImageSets/Main/{listing}.txt",
                    data_prefix=dict(sub_data_root=f"{year}/"), metainfo=dict(classes=self.classes(ds)),
                    filter_cfg=dict(filter_empty_gt=True, min_size=2) if train else None,
                    test_mode=not train, pipeline=det_pipeline(train, img_scale))

    def dataset(self, ds: dict[str, Any], split: str, img_scale: list[int],
                crop: list[int] | None = None) -> dict[str, Any]:
        if split != "train":
            return self._one(ds, "VOC2007", "test", False, img_scale)
        years = [y for y in ("VOC2007", "VOC2012")
                 if (Path(ds["root"]) / y / "ImageSets" / "Main" / "trainval.txt").is_file()]
        parts = [self._one(ds, y, "trainval", True, img_scale) for y in years]
        return parts[0] if len(parts) == 1 else dict(type="ConcatDataset", datasets=parts)

    def evaluator(self, ds: dict[str, Any]) -> Any:
        import harness.data.metrics  # noqa: F401 - registers InProcessVOCMetric
        return [dict(type="InProcessVOCMetric", metric="mAP", eval_mode="11points", prefix="voc07"),
                dict(type="InProcessVOCMetric", metric="mAP", eval_mode="area", prefix="voc_area")]


class ImageNetFormat(DatasetFormat):
    """ImageNet-style folders, read by :class:`harness.data.folders.ImageFolder` (classification
    trials build their loaders directly, see :mod:`harness.tasks.cls`)."""

    def default_classes(self, ds: dict[str, Any]) -> tuple[str, ...]:
        from .folders import folder_classes
        return folder_classes(ds["root"])

    def classes(self, ds: dict[str, Any]) -> tuple[str, ...]:
        # the folders are the labels, synthetic or not
        return tuple(ds["classes"]) if ds.get("classes") else self.default_classes(ds)


def seg_pipeline(train: bool, img_scale: list[int], crop: list[int] | None) -> list[dict[str, Any]]:
    """mmseg's standard pipelines: random rescale (0.5-2x), crop, flip, photometric
    distortion for training; a keep-ratio resize for evaluation."""
    if not train:
        return [dict(type="LoadImageFromFile"), dict(type="Resize", scale=tuple(img_scale), keep_ratio=True),
                dict(type="LoadAnnotations"), dict(type="PackSegInputs")]
    steps = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"),
             dict(type="RandomResize", scale=tuple(img_scale), ratio_range=(0.5, 2.0), keep_ratio=True)]
    if crop:
        steps.append(dict(type="RandomCrop", crop_size=tuple(crop), cat_max_ratio=0.75))
    return steps + [dict(type="RandomFlip", prob=0.5), dict(type="PhotoMetricDistortion"), dict(type="PackSegInputs")]


class SegFormat(DatasetFormat):
    """Segmentation formats share mmseg's IoU metric (mIoU, mAcc, aAcc)."""

    dataset_type = ""
    classes_from_library = True
    #: mmseg's class list of ``dataset_type`` (its METAINFO, which a test compares), kept
    #: here so that the data check and ``plan`` need not import mmseg
    library_classes: tuple[str, ...] = ()

    def default_classes(self, ds: dict[str, Any]) -> tuple[str, ...]:
        return self.library_classes

    def classes(self, ds: dict[str, Any]) -> tuple[str, ...]:
        # synthetic segmentation data uses the real class lists
        return tuple(ds["classes"]) if ds.get("classes") else self.default_classes(ds)

    def evaluator(self, ds: dict[str, Any]) -> Any:
        return dict(type="IoUMetric", iou_metrics=["mIoU"])


class CityscapesFormat(SegFormat):
    """Cityscapes: ``leftImg8bit/{train,val}`` and ``gtFine/{train,val}`` with
    ``*_gtFine_labelTrainIds.png`` (19 train ids)."""

    dataset_type = "CityscapesDataset"
    library_classes = CITYSCAPES_CLASSES

    def dataset(self, ds: dict[str, Any], split: str, img_scale: list[int], crop: list[int] | None = None) -> dict:
        return dict(type="CityscapesDataset", data_root=str(ds["root"]),
                    data_prefix=dict(img_path=f"leftImg8bit/{split}", seg_map_path=f"gtFine/{split}"),
                    metainfo=dict(classes=self.classes(ds)), test_mode=split != "train",
                    pipeline=seg_pipeline(split == "train", img_scale, crop))


class VocSegFormat(SegFormat):
    """Pascal VOC 2012 segmentation (``root`` = the VOC2012 folder): ``JPEGImages``,
    ``SegmentationClass``, ``ImageSets/Segmentation/{train,val}.txt``, 21 classes. With
    ``aug: true`` the training set adds the augmented annotations (``SegmentationClassAug``
    listed in ``ImageSets/Segmentation/aug.txt``), as mmseg's voc12aug configs do."""

    dataset_type = "PascalVOCDataset"
    library_classes = VOC_SEG_CLASSES

    def _one(self, ds: dict[str, Any], listing: str, seg_dir: str, train: bool, img_scale: list[int],
             crop: list[int] | None) -> dict:
        return dict(type="PascalVOCDataset", data_root=str(ds["root"]),
                    data_prefix=dict(img_path="JPEGImages", seg_map_path=seg_dir),
                    ann_file=f"ImageSets/Segmentation/{listing}.txt", metainfo=dict(classes=self.classes(ds)),
                    test_mode=not train, pipeline=seg_pipeline(train, img_scale, crop))

    def dataset(self, ds: dict[str, Any], split: str, img_scale: list[int], crop: list[int] | None = None) -> dict:
        if split != "train":
            return self._one(ds, "val", "SegmentationClass", False, img_scale, None)
        train = self._one(ds, "train", "SegmentationClass", True, img_scale, crop)
        if not ds.get("aug"):
            return train
        aug = self._one(ds, "aug", "SegmentationClassAug", True, img_scale, crop)
        return dict(type="ConcatDataset", datasets=[train, aug])


def _read_json(path: Path) -> Any:
    """A JSON file; an error names the file (and says where it broke)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: missing; the dataset's layout needs it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    return doc


#: files whose content is hashed into a dataset's fingerprint (annotations, split lists);
#: the other files (images) enter it by relative path and size
_ANNOTATION_SUFFIXES = {".json", ".txt", ".csv", ".xml", ".lst"}


def fingerprint(ds: dict[str, Any]) -> str:
    """sha256 of a dataset as a trial sees it: the content of its annotation and list
    files, and the relative path and size of every other file (the image list)."""
    import hashlib
    root = Path(ds["root"])
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = path.relative_to(root).as_posix()
        size = path.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        if path.suffix.lower() in _ANNOTATION_SUFFIXES and size < (256 << 20):
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()


def dataset_format(ds: dict[str, Any]) -> DatasetFormat:
    return import_target(catalog.DATASET_FORMATS.get(ds["format"]).target)()


def num_classes(ds: dict[str, Any]) -> int:
    return len(dataset_format(ds).classes(ds))


def config_loaders(spec: Any, val_batch_size: int | None = None) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """Train and val loader configs and the evaluator of a task whose datasets are built
    from mmengine configs (detection, segmentation). Training samples an infinite
    stream for iteration-based schedules, epochs otherwise."""
    fmt, sched = dataset_format(spec.dataset), spec.schedule
    loader = dict(batch_size=sched["batch_size"], num_workers=sched["num_workers"],
                  persistent_workers=sched["num_workers"] > 0, pin_memory=bool(sched.get("pin_memory")))
    val_loader = dict(loader, drop_last=False, sampler=dict(type="DefaultSampler", shuffle=False),
                      dataset=fmt.dataset(spec.dataset, "val", sched["img_scale"]))
    if val_batch_size:
        val_loader["batch_size"] = val_batch_size
    sampler = dict(type="InfiniteSampler" if sched.get("iters") else "DefaultSampler", shuffle=True)
    # a detector with a mask head (Mask R-CNN) trains on the instances' masks too
    masks = {"with_mask": True} if "roi_head.mask_head" in (catalog.arch_of(spec.model).get("class_heads") or ()) \
        else {}
    train_loader = dict(loader, sampler=sampler,
                        dataset=fmt.dataset(spec.dataset, "train", sched["img_scale"], sched.get("crop_size"), **masks))
    return train_loader, val_loader, fmt.evaluator(spec.dataset)
