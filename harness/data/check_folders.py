"""The check of image-folder datasets before anything trains (see
:mod:`harness.data.checks`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .checks import Findings, image_sizes
from .folders import IMAGE_SUFFIXES


def check_image_folders(ds: dict[str, Any], classes: tuple[str, ...], findings: Findings) -> None:
    """Before anything trains: every class folder is non-empty in each split and holds
    only images (readable headers), the splits have the same classes, and the
    unlabeled folder (if any) holds images (:mod:`harness.data.checks`)."""
    root = Path(ds["root"])
    train_classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir()) \
        if (root / "train").is_dir() else []
    if not train_classes:
        findings.error("missing-split", root / "train", "train", "no class folder: nothing to train on")
        return
    for split in ("train", "val"):
        split_dir = root / split
        if not split_dir.is_dir():
            findings.error("missing-split", split_dir, split, "the split's folder does not exist")
            continue
        here = {p.name for p in split_dir.iterdir() if p.is_dir()}
        for extra in sorted(here - set(train_classes)):
            findings.error("extra-class", split_dir / extra, extra, f"is a class folder of '{split}' that 'train' "
                                                                    f"lacks: its images would be dropped")
        images = []
        for name in classes:
            folder = split_dir / name
            if not folder.is_dir():
                findings.error("missing-class", folder, name, f"the class has no folder in '{split}'")
                continue
            files = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
            others = [p for p in files if p.is_dir() or p.suffix.lower() not in IMAGE_SUFFIXES]
            for p in others:            # (counted per split, one line per kind): notes.txt, Thumbs.db
                findings.warning("not-an-image", split_dir, findings.rel(p),
                                 f"is not an image ({', '.join(sorted(IMAGE_SUFFIXES))}): ignored, the loader "
                                 f"reads only images")
            kept = [p for p in files if p not in others]
            if not kept:
                findings.error("empty-class", folder, name, f"the class has no image in '{split}' (a classifier "
                                                            f"would get an output for a class it never sees)")
            images += kept
        findings.count(f"{split} images", len(images))
        for path, got in zip(images, image_sizes(images)):
            if isinstance(got, str):
                findings.error("bad-image", split_dir, findings.rel(path), got)
    if ds.get("unlabeled"):
        folder = root / ds["unlabeled"]
        n = sum(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*")) if folder.is_dir() else 0
        if n == 0:
            findings.error("empty-unlabeled", folder, ds["unlabeled"], "the unlabeled folder holds no image")
        findings.count("unlabeled images", n)
