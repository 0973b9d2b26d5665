"""The checks of the detection layouts (COCO, Pascal VOC) before anything trains: the
annotations parse, every image they name exists and has the size they say (read from its
header), every box has a positive size and lies in its image (partly outside: a
warning, the pipeline clips it; wholly outside: an error), every category is declared,
and the train split has at least one instance. See :mod:`harness.data.checks`."""
from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .checks import Findings, image_sizes, read_listing


def _box(findings: Findings, file: Path, entry: str, x1: float, y1: float, x2: float, y2: float,
         width: int, height: int) -> bool:
    """Check one box (corners) against its image; True when it counts as an instance."""
    if not all(map(math.isfinite, (x1, y1, x2, y2))):
        findings.error("box-not-finite", file, entry, "has a coordinate that is not a finite number")
        return False
    if x2 - x1 <= 0 or y2 - y1 <= 0:
        findings.error("box-size", file, entry, f"has a width or height of zero or less "
                                                f"({x2 - x1:g} x {y2 - y1:g})")
        return False
    if x1 >= width or y1 >= height or x2 <= 0 or y2 <= 0:
        findings.error("box-outside", file, entry, f"lies wholly outside its {width}x{height} image "
                                                   f"([{x1:g}, {y1:g}, {x2:g}, {y2:g}])")
        return False
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        findings.warning("box-clipped", file, entry, f"lies partly outside its {width}x{height} image; the "
                                                     f"pipeline clips it to the image")
    return True


def _sizes(findings: Findings, file: Path, entries: list[tuple[str, Path, tuple[int, int] | None]]) -> dict[str, tuple[int, int]]:
    """Header sizes of the entries' images (entry, image path, declared size or None);
    missing or unreadable images, and declared sizes the file contradicts, are errors."""
    out = {}
    for (entry, path, declared), got in zip(entries, image_sizes([e[1] for e in entries])):
        if isinstance(got, str):
            findings.error("missing-image" if got == "missing" else "bad-image", file, entry,
                           f"its image '{findings.rel(path)}' "
                           + ("does not exist" if got == "missing" else f"is {got}"))
            continue
        if declared is not None and tuple(declared) != tuple(got):
            findings.error("image-size", file, entry, f"says {declared[0]}x{declared[1]} but its image "
                                                      f"'{findings.rel(path)}' is {got[0]}x{got[1]}: every box "
                                                      f"would be scaled wrongly")
            continue
        out[entry] = got
    return out


def check_coco(ds: dict[str, Any], classes: tuple[str, ...], findings: Findings) -> None:
    from .formats import CocoFormat
    root = Path(ds["root"])
    for split, (ann_file, img_dir) in CocoFormat.splits.items():
        path = root / ann_file
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except FileNotFoundError:
            findings.error("missing-annotations", path, split, "the annotation file does not exist")
            continue
        except (OSError, ValueError) as exc:
            findings.error("bad-annotations", path, split, f"cannot be read as JSON ({exc})")
            continue
        lists = {k: doc.get(k) if isinstance(doc, dict) else None for k in ("images", "annotations", "categories")}
        if not all(isinstance(v, list) for v in lists.values()):
            findings.error("bad-annotations", path, split, "not a COCO annotation file (needs lists 'images', "
                                                           "'annotations' and 'categories')")
            continue
        cats: dict[Any, str] = {}
        for i, c in enumerate(lists["categories"]):
            if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
                findings.error("bad-category", path, f"categories[{i}]", "needs an integer 'id' and a 'name'")
            elif c["id"] in cats:
                findings.error("duplicate-category", path, f"categories[{i}] (id {c['id']})", "repeats an id")
            else:
                cats[c["id"]] = c["name"]
        absent = [c for c in classes if c not in cats.values()]
        if absent:
            findings.error("undeclared-class", path, "categories",
                           f"declares no category {absent[0]!r} ({len(absent)} of the {len(classes)} classes "
                           f"missing): its boxes could never be {'learnt' if split == 'train' else 'scored'}")
        kept_ids = {i for i, n in cats.items() if n in classes}
        images: dict[Any, tuple[str, Path, tuple[int, int] | None]] = {}
        for i, im in enumerate(lists["images"]):
            entry = f"images[{i}] (id {im.get('id') if isinstance(im, dict) else '?'})"
            if not isinstance(im, dict) or not isinstance(im.get("file_name"), str) or "id" not in im:
                findings.error("bad-image-entry", path, entry, "needs an 'id' and a 'file_name'")
                continue
            if im["id"] in images:
                findings.error("duplicate-image", path, entry, "repeats an image id")
                continue
            declared = (im.get("width"), im.get("height"))
            ok = all(isinstance(v, int) and v > 0 for v in declared)
            images[im["id"]] = (entry, root / img_dir / im["file_name"], declared if ok else None)
            if not ok:
                findings.error("image-size", path, entry, "needs positive integer 'width' and 'height'")
        findings.count(f"{split} images", len(images))
        sizes = _sizes(findings, path, list(images.values()))
        instances = 0
        for i, a in enumerate(lists["annotations"]):
            entry = f"annotations[{i}] (id {a.get('id') if isinstance(a, dict) else '?'})"
            if not isinstance(a, dict):
                findings.error("bad-annotation", path, entry, "is not an object")
                continue
            if a.get("image_id") not in images:
                findings.error("orphan-annotation", path, entry, f"refers to image id {a.get('image_id')!r}, "
                                                                 f"which '{ann_file}' does not list")
                continue
            if a.get("category_id") not in cats:
                findings.error("unknown-category", path, entry, f"has category_id {a.get('category_id')!r}, "
                                                                f"which 'categories' does not declare "
                                                                f"(declared: {sorted(cats)[:10]})")
                continue
            box = a.get("bbox")
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                findings.error("bad-box", path, entry, f"has bbox {box!r}; COCO boxes are [x, y, width, height]")
                continue
            size = sizes.get(images[a["image_id"]][0])
            if size is None:
                continue                      # its image is missing or wrong: reported once there
            x, y, w, h = map(float, box)
            if _box(findings, path, entry, x, y, x + w, y + h, *size) and not a.get("iscrowd") \
                    and a["category_id"] in kept_ids:
                instances += 1
        findings.count(f"{split} boxes", len(lists["annotations"]))
        if split == "train" and instances == 0:
            findings.error("no-instances", path, "annotations", "the train split has no usable annotated "
                                                                "instance of the suite's classes")


def _voc_objects(xml_path: Path) -> tuple[tuple[int, int] | None, list[tuple[str, list[float]]]]:
    """(declared size or None, [(name, [xmin, ymin, xmax, ymax])]) of one VOC annotation."""
    tree = ET.parse(xml_path)
    size = tree.find("size")
    declared = None
    if size is not None and size.findtext("width") and size.findtext("height"):
        declared = (int(float(size.findtext("width"))), int(float(size.findtext("height"))))
    objects = []
    for obj in tree.findall("object"):
        bb = obj.find("bndbox")
        coords = [float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")] if bb is not None else []
        objects.append((obj.findtext("name") or "", coords))
    return declared, objects


def check_voc(ds: dict[str, Any], classes: tuple[str, ...], findings: Findings) -> None:
    from .synth import VOC_SEG_CLASSES
    known = set(VOC_SEG_CLASSES[1:]) | set(classes)            # VOC's 20 detection classes
    root = Path(ds["root"])
    listings = [("train", root / y / "ImageSets/Main/trainval.txt", root / y) for y in ("VOC2007", "VOC2012")
                if (root / y / "ImageSets/Main/trainval.txt").is_file()]
    listings.append(("val", root / "VOC2007/ImageSets/Main/test.txt", root / "VOC2007"))
    if not any(split == "train" for split, _, _ in listings):
        findings.error("missing-listing", root / "VOC2007/ImageSets/Main/trainval.txt", "train",
                       "no VOC2007 or VOC2012 trainval list: nothing to train on")
    instances = 0
    for split, listing, year in listings:
        try:
            ids = read_listing(listing)
        except OSError:
            findings.error("missing-listing", listing, split, "the image list does not exist")
            continue
        entries, boxes = [], {}
        for img_id in ids:
            xml_path = year / "Annotations" / f"{img_id}.xml"
            try:
                declared, objects = _voc_objects(xml_path)
            except FileNotFoundError:
                findings.error("missing-annotation", listing, img_id, f"its annotation "
                                                                      f"'{findings.rel(xml_path)}' does not exist")
                continue
            except (ET.ParseError, ValueError, TypeError, OSError) as exc:
                findings.error("bad-annotation", xml_path, img_id, f"cannot be read ({type(exc).__name__}: {exc})")
                continue
            entries.append((img_id, year / "JPEGImages" / f"{img_id}.jpg", declared))
            boxes[img_id] = (xml_path, objects)
        findings.count(f"{split} images", len(ids))
        sizes = _sizes(findings, listing, entries)
        for img_id, size in sizes.items():
            xml_path, objects = boxes[img_id]
            for k, (name, coords) in enumerate(objects):      # (one line per kind for the whole listing)
                entry = f"object {k} of {img_id} ({findings.rel(xml_path)})"
                if name not in known:
                    findings.error("unknown-category", listing, entry, f"is a {name!r}, which is not a VOC class "
                                                                       f"(mmdet would drop it silently)")
                    continue
                if len(coords) != 4:
                    findings.error("bad-box", listing, entry, "has no complete bndbox")
                    continue
                # mmdet reads VOC's 1-based corners minus one
                ok = _box(findings, listing, entry, coords[0] - 1, coords[1] - 1, coords[2] - 1, coords[3] - 1,
                          *size)
                instances += ok and split == "train" and name in classes
    if instances == 0 and any(split == "train" for split, _, _ in listings):
        findings.error("no-instances", root, "train", "the train split has no usable annotated instance of the "
                                                      "suite's classes")
