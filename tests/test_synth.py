"""Synthetic detection data: the real COCO layout, deterministic, readable by mmdet."""
from __future__ import annotations

import hashlib
import json

from harness.data.synth import SHAPES, write_coco


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_layout_and_annotations(tmp_path):
    root = write_coco(tmp_path / "c", train_images=6, val_images=3, image_size=96, max_objects=4, seed=3)
    assert sorted(p.name for p in root.iterdir()) == [".kd-synth.json", "annotations", "train2017", "val2017"]
    assert json.loads((root / ".kd-synth.json").read_text()) == {          # how it was written
        "writer": "write_coco", "train_images": 6, "val_images": 3, "image_size": 96, "max_objects": 4, "seed": 3}
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
    from .conftest import coco_dataset
    dataset = coco_dataset(synth_coco)
    assert len(dataset) == 8
    assert dataset.metainfo["classes"] == tuple(SHAPES)
    sample = dataset[0]
    assert sample["inputs"].shape[0] == 3
    assert len(sample["data_samples"].gt_instances.bboxes) >= 1


def test_voc_layout_read_through_mmdet_voc_dataset(tmp_path):
    from mmdet.datasets import VOCDataset
    from mmdet.utils import register_all_modules

    from harness.data.formats import VocFormat
    from harness.data.synth import write_voc
    register_all_modules()
    root = write_voc(tmp_path / "VOCdevkit", train_images=5, val_images=3, image_size=64, seed=2)
    main = root / "VOC2007" / "ImageSets" / "Main"
    assert sorted(p.name for p in main.iterdir()) == ["test.txt", "train.txt", "trainval.txt", "val.txt"]
    assert len(main.joinpath("trainval.txt").read_text().split()) == 5
    ds = {"root": str(root), "classes": None, "synth": {}}
    for split, count in (("train", 5), ("val", 3)):
        cfg = VocFormat().dataset(ds, split, [64, 64])
        cfg.pop("type")
        dataset = VOCDataset(**cfg)
        assert len(dataset) == count and dataset.metainfo["classes"] == tuple(SHAPES)
        assert dataset.metainfo["dataset_type"] == "VOC2007"
    info = dataset.get_data_info(0)
    assert info["instances"] and all(0 <= v <= 64 for inst in info["instances"] for v in inst["bbox"])
    # the XML's 1-based inclusive box comes back as the drawn pixels' box minus one at the far edge
    xml = (root / "VOC2007" / "Annotations" / f"{info['img_id']}.xml").read_text()
    xmin = int(xml.split("<xmin>")[1].split("<")[0])
    assert info["instances"][0]["bbox"][0] == xmin - 1
