"""Synthetic datasets written in the real on-disk layouts, deterministic from a seed.

The harness reads them through the same dataset classes as the real data (mmdet's
``CocoDataset`` for the COCO layout), so a run on synthetic data exercises the whole
path. Only numpy and Pillow are used here, so writing data never imports torch.

Detection scenes: a textured background with 1-``max_objects`` objects per image, each
one of :data:`SHAPES` (distinct shape and colour per class), at sizes from about 1/12 to
1/3 of the image side, kept from overlapping heavily so every box is learnable.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from harness.suite.paths import SYNTH_MARKER

def _recorded(writer: Callable[..., Path]) -> Callable[..., Path]:
    """A writer that also records, in the root it wrote, its name and every parameter
    (defaults included): a suite naming the root with other parameters is then refused
    instead of scored on data it did not ask for (``harness.suite.paths.synth_mismatch``)."""
    signature = inspect.signature(writer)

    @functools.wraps(writer)
    def write(root: str | os.PathLike, **params: Any) -> Path:
        out = writer(root, **params)
        bound = signature.bind(root, **params)
        bound.apply_defaults()
        record = {"writer": writer.__name__, **{k: v for k, v in bound.arguments.items() if k != "root"}}
        (Path(out) / SYNTH_MARKER).write_text(json.dumps(record, sort_keys=True))
        return out
    return write


# class name -> RGB colour; the shape is drawn by `_draw`
SHAPES: dict[str, tuple[int, int, int]] = {
    "square": (220, 40, 40),
    "disc": (40, 200, 60),
    "triangle": (50, 80, 230),
    "cross": (235, 200, 30),
}


def _draw(draw: ImageDraw.ImageDraw, cls: str, box: tuple[int, int, int, int]) -> None:
    x1, y1, x2, y2 = box
    colour = SHAPES[cls]
    if cls == "square":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=colour)
    elif cls == "disc":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=colour)
    elif cls == "triangle":
        draw.polygon([((x1 + x2) / 2, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)], fill=colour)
    elif cls == "cross":
        w, h = x2 - x1, y2 - y1
        draw.rectangle([x1 + w // 3, y1, x2 - 1 - w // 3, y2 - 1], fill=colour)
        draw.rectangle([x1, y1 + h // 3, x2 - 1, y2 - 1 - h // 3], fill=colour)


def _iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def _scene(rng: np.random.RandomState, size: int, max_objects: int) -> tuple[Image.Image, list]:
    """One image and its objects [(class_index, (x1, y1, x2, y2))]."""
    base = rng.randint(60, 160, size=3)
    noise = rng.randint(-25, 25, size=(size, size, 3))
    grad = np.linspace(-20, 20, size)[None, :, None]
    pixels = np.clip(base[None, None, :] + noise + grad, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)
    names = list(SHAPES)
    objects: list[tuple[int, tuple[int, int, int, int]]] = []
    for _ in range(rng.randint(1, max_objects + 1)):
        for _attempt in range(20):
            side = int(rng.randint(max(6, size // 12), max(8, size // 3) + 1))
            aspect = rng.uniform(0.7, 1.4)
            w, h = max(4, int(side * aspect)), side
            w = min(w, size - 1)
            x1, y1 = int(rng.randint(0, size - w + 1)), int(rng.randint(0, size - h + 1))
            box = (x1, y1, x1 + w, y1 + h)
            if all(_iou(box, other) < 0.2 for _, other in objects):
                cls = int(rng.randint(len(names)))
                _draw(draw, names[cls], box)
                objects.append((cls, box))
                break
    return img, objects


class _AtomicDir:
    """Write a directory under a temporary sibling name and rename it into place on
    success, so a half-written dataset is never visible at its root."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            if self.root.exists():
                shutil.rmtree(self.root)
            os.replace(self.tmp, self.root)
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


@_recorded
def write_coco(root: str | os.PathLike, train_images: int = 64, val_images: int = 16,
               image_size: int = 128, max_objects: int = 4, seed: int = 0) -> Path:
    """Write a COCO-layout detection dataset to ``root`` and return it.

    Layout: ``root/train2017/*.jpg``, ``root/val2017/*.jpg``,
    ``root/annotations/instances_{train,val}2017.json`` with categories 1..K.
    """
    root = Path(root)
    rng = np.random.RandomState(seed)
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPES)]
    with _AtomicDir(root) as tmp:
        (tmp / "annotations").mkdir()
        ann_id = 1
        for split, count in (("train2017", train_images), ("val2017", val_images)):
            (tmp / split).mkdir()
            images, annotations = [], []
            for i in range(count):
                img, objects = _scene(rng, image_size, max_objects)
                file_name = f"{i:012d}.jpg"
                img.save(tmp / split / file_name, quality=95)
                images.append({"id": i + 1, "file_name": file_name,
                               "width": image_size, "height": image_size})
                for cls, (x1, y1, x2, y2) in objects:
                    w, h = x2 - x1, y2 - y1
                    # the mask of a shape is its box's polygon: enough for instance-segmentation
                    # detectors (Mask R-CNN) to train on the synthetic twin
                    annotations.append({"id": ann_id, "image_id": i + 1, "category_id": cls + 1,
                                        "bbox": [x1, y1, w, h], "area": float(w * h), "iscrowd": 0,
                                        "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]]})
                    ann_id += 1
            with open(tmp / "annotations" / f"instances_{split}.json", "w") as f:
                json.dump({"images": images, "annotations": annotations,
                           "categories": categories}, f)
    return root


def _voc_xml(file_name: str, size: int, objects: list) -> str:
    names = list(SHAPES)
    parts = [f"<annotation><folder>VOC2007</folder><filename>{file_name}</filename>",
             f"<size><width>{size}</width><height>{size}</height><depth>3</depth></size>",
             "<segmented>0</segmented>"]
    for cls, (x1, y1, x2, y2) in objects:
        # VOC boxes are 1-based and inclusive: pixels x1..x2-1 are xmin=x1+1 .. xmax=x2
        parts.append(f"<object><name>{names[cls]}</name><pose>Unspecified</pose><truncated>0</truncated>"
                     f"<difficult>0</difficult><bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin>"
                     f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"


@_recorded
def write_voc(root: str | os.PathLike, train_images: int = 64, val_images: int = 16,
              image_size: int = 128, max_objects: int = 4, seed: int = 0) -> Path:
    """Write a Pascal VOC-layout detection dataset (the ``VOCdevkit`` folder) to ``root``.

    Layout: ``root/VOC2007/{JPEGImages/*.jpg, Annotations/*.xml,
    ImageSets/Main/{train,val,trainval,test}.txt}``; ``trainval`` is the training split
    and ``test`` the evaluation split, as in the VOC07 protocol.
    """
    root = Path(root)
    rng = np.random.RandomState(seed)
    with _AtomicDir(root) as tmp:
        voc = tmp / "VOC2007"
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (voc / sub).mkdir(parents=True)
        ids: dict[str, list[str]] = {"trainval": [], "test": []}
        for split, count in (("trainval", train_images), ("test", val_images)):
            for _ in range(count):
                img_id = f"{len(ids['trainval']) + len(ids['test']):06d}"
                img, objects = _scene(rng, image_size, max_objects)
                img.save(voc / "JPEGImages" / f"{img_id}.jpg", quality=95)
                (voc / "Annotations" / f"{img_id}.xml").write_text(_voc_xml(f"{img_id}.jpg", image_size, objects))
                ids[split].append(img_id)
        half = len(ids["trainval"]) // 2
        lists = {"trainval": ids["trainval"], "train": ids["trainval"][:half], "val": ids["trainval"][half:],
                 "test": ids["test"]}
        for name, items in lists.items():
            (voc / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in items))
    return root


def shape_classes() -> tuple[str, ...]:
    """Class names of the synthetic detection data, in label order."""
    return tuple(SHAPES)


@_recorded
def write_imagenet(root: str | os.PathLike, train_images: int = 16, val_images: int = 4,
                   image_size: int = 64, unlabeled_images: int = 0, seed: int = 0) -> Path:
    """Write an ImageNet-style classification dataset to ``root``.

    Layout: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` (``train_images``
    and ``val_images`` per class), and ``root/unlabeled/*.jpg`` (images of random classes,
    no labels) when ``unlabeled_images`` > 0. Each image shows one shape of its class
    (see :data:`SHAPES`), at a random size and place on a textured background.
    """
    root = Path(root)
    rng = np.random.RandomState(seed)
    names = list(SHAPES)

    def image(cls: int) -> Image.Image:
        base = rng.randint(60, 160, size=3)
        noise = rng.randint(-25, 25, size=(image_size, image_size, 3))
        img = Image.fromarray(np.clip(base[None, None] + noise, 0, 255).astype(np.uint8), "RGB")
        side = int(rng.randint(image_size // 3, image_size * 3 // 4 + 1))
        x1, y1 = int(rng.randint(0, image_size - side + 1)), int(rng.randint(0, image_size - side + 1))
        _draw(ImageDraw.Draw(img), names[cls], (x1, y1, x1 + side, y1 + side))
        return img

    with _AtomicDir(root) as tmp:
        for split, per_class in (("train", train_images), ("val", val_images)):
            for c, name in enumerate(names):
                (tmp / split / name).mkdir(parents=True)
                for i in range(per_class):
                    image(c).save(tmp / split / name / f"{split}_{name}_{i:05d}.jpg", quality=95)
        if unlabeled_images:
            (tmp / "unlabeled").mkdir()
            for i in range(unlabeled_images):
                image(int(rng.randint(len(names)))).save(tmp / "unlabeled" / f"unlabeled_{i:06d}.jpg", quality=95)
    return root


# ------------------------------------------------------------------------- segmentation
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")
VOC_SEG_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
                   "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                   "train", "tvmonitor")


def _seg_scene(rng: np.random.RandomState, h: int, w: int, classes: int, regions: int,
               background: int | None) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image of class-coloured regions and its label map (255 on region borders).

    Each class has a fixed colour (with noise), so the task is learnable; regions are
    rectangles and ellipses of random classes drawn over a background class.
    """
    palette = np.random.RandomState(1234).randint(0, 256, size=(classes, 3))
    label = np.full((h, w), background if background is not None else rng.randint(classes), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(regions):
        c = rng.randint(classes)
        cy, cx = rng.randint(h), rng.randint(w)
        ry, rx = rng.randint(max(2, h // 10), max(3, h // 3)), rng.randint(max(2, w // 10), max(3, w // 3))
        if rng.rand() < 0.5:
            inside = (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)
        else:
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        label[inside] = c
    img = palette[label] + rng.randint(-20, 20, size=(h, w, 3))
    # ignore-label borders: pixels whose 4-neighbourhood holds another class
    edge = np.zeros((h, w), dtype=bool)
    edge[1:, :] |= label[1:, :] != label[:-1, :]
    edge[:-1, :] |= label[1:, :] != label[:-1, :]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[:, :-1] |= label[:, 1:] != label[:, :-1]
    label = np.where(edge, 255, label).astype(np.uint8)
    return np.clip(img, 0, 255).astype(np.uint8), label


@_recorded
def write_cityscapes(root: str | os.PathLike, train_images: int = 8, val_images: int = 4,
                     image_size: int = 64, seed: int = 0) -> Path:
    """Write a Cityscapes-layout dataset: ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png``
    and ``gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png`` (19 train ids, 255 ignore).
    Images are ``image_size`` x 2 ``image_size`` (Cityscapes' 1:2 aspect)."""
    root = Path(root)
    rng = np.random.RandomState(seed)
    with _AtomicDir(root) as tmp:
        for split, count, city in (("train", train_images, "aachen"), ("val", val_images, "frankfurt")):
            (tmp / "leftImg8bit" / split / city).mkdir(parents=True)
            (tmp / "gtFine" / split / city).mkdir(parents=True)
            for i in range(count):
                img, label = _seg_scene(rng, image_size, 2 * image_size, len(CITYSCAPES_CLASSES), 8, background=0)
                stem = f"{city}_{i:06d}_000019"
                Image.fromarray(img).save(tmp / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
                Image.fromarray(label).save(tmp / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png")
    return root


@_recorded
def write_voc_seg(root: str | os.PathLike, train_images: int = 8, val_images: int = 4,
                  image_size: int = 64, aug_images: int = 0, seed: int = 0) -> Path:
    """Write a Pascal VOC 2012 segmentation layout (``root`` = ``VOC2012``): ``JPEGImages``,
    ``SegmentationClass`` (palette PNGs of class indices, 255 on borders) and
    ``ImageSets/Segmentation/{train,val,trainval}.txt``; 21 classes, 0 = background.
    With ``aug_images``, also the augmented set's layout: ``SegmentationClassAug``
    (plain index PNGs) listed in ``ImageSets/Segmentation/aug.txt``."""
    root = Path(root)
    rng = np.random.RandomState(seed)
    voc_palette = np.zeros((256, 3), dtype=np.uint8)        # VOC's bit-interleaved colour map
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        voc_palette[i] = (r, g, b)
    with _AtomicDir(root) as tmp:
        for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (tmp / sub).mkdir(parents=True)
        ids: dict[str, list[str]] = {"train": [], "val": [], "aug": []}
        if aug_images:
            (tmp / "SegmentationClassAug").mkdir()
        for split, count in (("train", train_images), ("val", val_images), ("aug", aug_images)):
            for _ in range(count):
                stem = f"2012_{sum(len(v) for v in ids.values()):06d}"
                img, label = _seg_scene(rng, image_size, image_size, len(VOC_SEG_CLASSES), 4, background=0)
                Image.fromarray(img).save(tmp / "JPEGImages" / f"{stem}.jpg", quality=95)
                if split == "aug":
                    Image.fromarray(label).save(tmp / "SegmentationClassAug" / f"{stem}.png")
                else:
                    png = Image.fromarray(label, mode="P")
                    png.putpalette(voc_palette.flatten().tolist())
                    png.save(tmp / "SegmentationClass" / f"{stem}.png")
                ids[split].append(stem)
        lists = [("train", ids["train"]), ("val", ids["val"]), ("trainval", ids["train"] + ids["val"])]
        for name, items in lists + ([("aug", ids["aug"])] if aug_images else []):
            (tmp / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("".join(f"{i}\n" for i in items))
    return root
