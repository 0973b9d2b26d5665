"""The checks of the segmentation layouts (Cityscapes, Pascal VOC 2012) before anything
trains: every listed image exists and has a label map of its size, with one channel,
holding only class indices or the ignore value (a stray value is scored as a class that
does not exist: mIoU changes with no warning). See :mod:`harness.data.checks`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .checks import Findings, check_label_maps, read_listing

#: the label value mmseg ignores (its datasets' ``ignore_index``)
IGNORE = 255


def check_cityscapes(ds: dict[str, Any], classes: tuple[str, ...], findings: Findings) -> None:
    root = Path(ds["root"])
    valid = set(range(len(classes)))
    for split in ("train", "val"):
        img_dir, seg_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        if not img_dir.is_dir():
            findings.error("missing-split", img_dir, split, "the image folder does not exist")
            continue
        pairs = [(img, seg_dir / (img.relative_to(img_dir).as_posix()[:-len("_leftImg8bit.png")]
                                  + "_gtFine_labelTrainIds.png"))
                 for img in sorted(img_dir.rglob("*_leftImg8bit.png"))]
        check_label_maps(pairs, img_dir, valid, IGNORE, findings, split)


def check_voc_seg(ds: dict[str, Any], classes: tuple[str, ...], findings: Findings) -> None:
    root = Path(ds["root"])
    valid = set(range(len(classes)))
    sets = [("train", "SegmentationClass"), ("val", "SegmentationClass")]
    if ds.get("aug"):
        sets.append(("aug", "SegmentationClassAug"))
    for split, seg_dir in sets:
        path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
        try:
            ids = read_listing(path)
        except OSError:
            findings.error("missing-listing", path, split, "the image list does not exist")
            continue
        pairs = [(root / "JPEGImages" / f"{i}.jpg", root / seg_dir / f"{i}.png") for i in ids]
        check_label_maps(pairs, path, valid, IGNORE, findings, split)
