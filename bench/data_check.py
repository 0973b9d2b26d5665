"""How long the dataset check before a run takes on a COCO-sized dataset.

Writes a COCO-layout dataset the size of COCO train2017 (118,287 images, 860,001 boxes,
80 categories; every image a hard link to one small JPEG, so the header reads are real
but the disk holds one image), then times the check (``harness.data.checks``) three
ways: cold, and a second time from its cache (keyed by the dataset's fingerprint), and
prints the figures with the machine they came from.

    .venv/bin/python bench/data_check.py               # COCO train2017's size
    .venv/bin/python bench/data_check.py --images 5000 --boxes 36000
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write(root: Path, images: int, boxes: int, size: int = 640) -> None:
    rng = np.random.default_rng(0)
    for split in ("train2017", "val2017"):
        (root / split).mkdir(parents=True)
    (root / "annotations").mkdir()
    one = root / "one.jpg"
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(one, quality=50)
    cats = [{"id": i + 1, "name": f"class{i}", "supercategory": "x"} for i in range(80)]
    for split, n_img, n_box in (("train2017", images, boxes), ("val2017", max(1, images // 24), max(1, boxes // 24))):
        imgs = []
        for i in range(n_img):
            name = f"{i:012d}.jpg"
            source = root / f"one-{i // 60000}.jpg"          # (a filesystem allows ~65,000 links to a file)
            if not source.exists():
                shutil.copy(one, source)
            os.link(source, root / split / name)
            imgs.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        xy = rng.uniform(0, size * 0.8, (n_box, 2)).round(2)
        wh = rng.uniform(2, size * 0.2, (n_box, 2)).round(2)
        img_ids = rng.integers(1, n_img + 1, n_box)
        cat_ids = rng.integers(1, 81, n_box)
        anns = [{"id": j + 1, "image_id": int(img_ids[j]), "category_id": int(cat_ids[j]),
                 "bbox": [float(xy[j, 0]), float(xy[j, 1]), float(wh[j, 0]), float(wh[j, 1])],
                 "area": float(wh[j, 0] * wh[j, 1]), "iscrowd": 0} for j in range(n_box)]
        with open(root / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump({"images": imgs, "annotations": anns, "categories": cats}, f)
    for source in root.glob("one*.jpg"):
        source.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=118_287)
    ap.add_argument("--boxes", type=int, default=860_001)
    ap.add_argument("--keep", default=None, help="write the dataset here and keep it (default: a temporary dir)")
    args = ap.parse_args()
    from harness.data.checks import check_dataset

    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kd-datacheck-"))
    root = base / "coco"
    try:
        if not root.exists():
            t = time.perf_counter()
            write(root, args.images, args.boxes)
            print(f"wrote {args.images} + {max(1, args.images // 24)} images, {args.boxes} boxes in "
                  f"{time.perf_counter() - t:.1f} s")
        ann = root / "annotations" / "instances_train2017.json"
        print(f"machine: {platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
              f"train annotations {ann.stat().st_size / 2**20:.0f} MiB")
        ds = {"name": "coco", "format": "coco", "root": str(root), "synth": None, "classes": None,
              "unlabeled": None, "aug": False}
        cache = base / "cache"
        shutil.rmtree(cache, ignore_errors=True)
        t = time.perf_counter()
        findings, cached = check_dataset(ds, cache)
        cold = time.perf_counter() - t
        print(f"check, cold: {cold:.1f} s ({findings.summary()})")
        t = time.perf_counter()
        again, cached = check_dataset(ds, cache)
        print(f"check, second run (cached={cached}): {time.perf_counter() - t:.2f} s "
              f"(the dataset fingerprint: every file's name and size, the annotations' content)")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
