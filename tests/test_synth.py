"""Synthetic detection data: the real COCO layout, deterministic, readable by mmdet."""
from __future__ import annotations

import hashlib
import json

from harness.synth import SHAPES, write_coco


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_layout_and_annotations(tmp_path):
    root = write_coco(tmp_path / "c", train_images=6, val_images=3, image_size=96, max_objects=4, seed=3)
    assert sorted(p.name for p in root.iterdir()) == ["annotations", "train2017", "val2017"]
    train = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    assert [c["name"] for c in train["categories"]] == list(SHAPES)
    assert len(train["images"]) == 6 and len(list((root / "train2017").glob("*.jpg"))) == 6
    per_image = {}
    for a in train["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 96 and y + h <= 96 and w > 0 and h > 0
        assert a["area"] == w * h and a["iscrowd"] == 0
        per_image.setdefault(a["image_id"], []).append(a)
    assert len(per_image) == 6                       # every image has at least one object
    assert max(len(v) for v in per_image.values()) > 1
    sides = [a["bbox"][2] for a in train["annotations"]]
    assert max(sides) > 2 * min(sides)               # varied sizes
    assert len({a["category_id"] for a in train["annotations"]}) > 1


def test_deterministic_from_seed(tmp_path):
    a = write_coco(tmp_path / "a", train_images=4, val_images=2, image_size=64, seed=5)
    b = write_coco(tmp_path / "b", train_images=4, val_images=2, image_size=64, seed=5)
    c = write_coco(tmp_path / "c", train_images=4, val_images=2, image_size=64, seed=6)
    assert _digest(a) == _digest(b) != _digest(c)


def test_read_through_mmdet_coco_dataset(synth_coco):
    from mmdet.datasets import CocoDataset
    from mmdet.utils import register_all_modules

    from harness.data import coco_dataset_cfg
    register_all_modules()
    ds_cfg = coco_dataset_cfg({"root": str(synth_coco), "classes": None}, "train", [64, 64])
    ds_cfg.pop("type")
    dataset = CocoDataset(**ds_cfg)
    assert len(dataset) == 8
    assert dataset.metainfo["classes"] == tuple(SHAPES)
    sample = dataset[0]
    assert sample["inputs"].shape[0] == 3
    assert len(sample["data_samples"].gt_instances.bboxes) >= 1
