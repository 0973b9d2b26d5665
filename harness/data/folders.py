"""Image-folder datasets: ``<root>/<split>/<class>/*.jpg`` (classes in sorted folder
order, torchvision's convention), plus optionally an unlabeled folder whose images get
the label -1. Read by the classification task's loaders; torch and torchvision are
imported when a dataset is built, not with this module."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def folder_classes(root: str | Path) -> tuple[str, ...]:
    """Class names: the sub-folders of ``root/train``, sorted (torchvision's convention)."""
    return tuple(sorted(p.name for p in (Path(root) / "train").iterdir() if p.is_dir()))


class ImageFolder:
    """Samples ``{'inputs': uint8 3xHxW, 'data_samples': label}`` from class folders."""

    def __init__(self, root: str | Path, split: str, classes: Sequence[str], size: int, train: bool,
                 unlabeled: str | None = None, files: Sequence[Path] | None = None) -> None:
        from torchvision.transforms import v2

        split_dir = Path(root) / split
        self.items: list[tuple[Path, int]] = [
            (p, c) for c, name in enumerate(classes) for p in sorted((split_dir / name).iterdir())
            if p.suffix.lower() in IMAGE_SUFFIXES]
        if unlabeled is not None:
            extra = files if files is not None else unlabeled_files(root, unlabeled)
            self.items += [(p, -1) for p in extra]
        if train:
            self.transform = v2.Compose([v2.RandomResizedCrop(size, scale=(0.35, 1.0), antialias=True),
                                         v2.RandomHorizontalFlip()])
        else:
            self.transform = v2.Compose([v2.Resize(int(round(size * 256 / 224)), antialias=True),
                                         v2.CenterCrop(size)])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        from torchvision.io import ImageReadMode, decode_image

        path, label = self.items[idx]
        img = decode_image(str(path), mode=ImageReadMode.RGB)
        return {"inputs": self.transform(img), "data_samples": label}


def unlabeled_files(root: str | Path, folder: str) -> list[Path]:
    return sorted(p for p in (Path(root) / folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
