"""Datasets checked before anything trains.

Each dataset format registers a check (``catalog.DATASET_FORMATS``, key ``check``): a
function ``check(ds, classes, findings)`` that reads the annotations, the image headers
(size, not a full decode) and the label maps, and adds what it finds to a
:class:`Findings`. A finding is an **error** (the data would train or score a wrong
model: a missing image, a box of no size, a category nobody declared, a label value
that is no class) or a **warning** (what a user may want to keep, counted and recorded
in the rows: a box partly outside its image, which the pipeline clips). Findings of the
same kind in the same file are one line with a count and the first entry.

The result is cached under ``<teacher_cache>/datachecks/`` by the dataset's fingerprint
(and the check's version), so a second run pays nothing. Imports numpy and Pillow only.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

#: bump when a check changes what it finds: cached results of older checks are ignored
CHECK_VERSION = 3       # 3: truncated images, non-images in class folders a warning


@dataclass
class Finding:
    """Every entry of one kind of problem in one file: the first one and how many."""

    severity: str        # "error" | "warning"
    kind: str            # a short name, e.g. "missing-image"
    file: str            # the file the entries are in (relative to the dataset root)
    entry: str           # the first entry, e.g. "annotations[17] (id 18, image 5)"
    what: str            # what is wrong with it
    count: int = 1

    def line(self) -> str:
        more = f" ({self.count} entries like it)" if self.count > 1 else ""
        return f"{self.file}: {self.entry}: {self.what}{more}"


class Findings:
    """What a dataset check found, grouped by (severity, kind, file)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._by: dict[tuple[str, str, str], Finding] = {}
        self.stats: dict[str, int] = {}

    def rel(self, file: str | os.PathLike) -> str:
        """A path as the findings name it: relative to the dataset root where it lies inside."""
        try:
            return Path(file).relative_to(self.root).as_posix()
        except ValueError:
            return str(file)

    def add(self, severity: str, kind: str, file: str | os.PathLike, entry: str, what: str) -> None:
        key = (severity, kind, self.rel(file))
        if key in self._by:
            self._by[key].count += 1
        else:
            self._by[key] = Finding(severity, kind, key[2], entry, what)

    def error(self, kind: str, file: str | os.PathLike, entry: str, what: str) -> None:
        self.add("error", kind, file, entry, what)

    def warning(self, kind: str, file: str | os.PathLike, entry: str, what: str) -> None:
        self.add("warning", kind, file, entry, what)

    def count(self, what: str, n: int = 1) -> None:
        """Tally what was checked (images, annotations, labels), for the summary line."""
        self.stats[what] = self.stats.get(what, 0) + n

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self._by.values() if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self._by.values() if f.severity == "warning"]

    def summary(self) -> str:
        checked = ", ".join(f"{n} {what}" for what, n in self.stats.items()) or "nothing"
        return (f"checked {checked}: {len(self.errors)} error kind(s), "
                f"{sum(f.count for f in self.warnings)} warning(s)")

    def to_json(self) -> dict[str, Any]:
        return {"root": str(self.root), "stats": self.stats, "findings": [asdict(f) for f in self._by.values()]}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> "Findings":
        out = cls(doc["root"])
        out.stats = dict(doc.get("stats") or {})
        for f in doc.get("findings") or []:
            finding = Finding(**f)
            out._by[(finding.severity, finding.kind, finding.file)] = finding
        return out


# ------------------------------------------------------------------------- helpers
def _header_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the first bytes of a PNG or a baseline / progressive JPEG, or
    None (another format, or a JPEG whose frame header lies further on)."""
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:                     # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):     # a start-of-frame
            return int.from_bytes(head[i + 7:i + 9], "big"), int.from_bytes(head[i + 5:i + 7], "big")
        i += 2 + int.from_bytes(head[i + 2:i + 4], "big")
    return None


#: the marker a complete file of each kind ends with (JPEG's end of image, PNG's IEND chunk)
_END_MARKERS = {b"\xff\xd8": b"\xff\xd9", b"\x89PNG": b"IEND"}


def _truncated(f: Any, head: bytes) -> str | None:
    """Why a JPEG or PNG file is cut short (its end marker is not in its last KiB: a copy
    or download that stopped; its pixels cannot all be decoded, and a loader either
    fails on it or fills the rest with grey), or None. Reads only the file's tail."""
    end = next((marker for start, marker in _END_MARKERS.items() if head.startswith(start)), None)
    if end is None:
        return None
    f.seek(0, os.SEEK_END)
    f.seek(max(0, f.tell() - 1024))
    if end not in f.read():
        return f"truncated: it has no end-of-image marker ({end!r}); its pixels cannot all be decoded"
    return None


def image_size(path: Path) -> tuple[int, int] | str:
    """(width, height) of an image from its header (read from its first bytes for PNG
    and JPEG, else by Pillow, which reads no pixel data for this), or why it cannot be
    read: 'missing', or the reader's message."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
            size = _header_size(head)
            cut = _truncated(f, head)
        if cut:
            return cut
        if size is not None and size[0] > 0 and size[1] > 0:
            return size
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, SyntaxError) as exc:     # Pillow's "cannot identify image file", ...
        return f"not a readable image ({type(exc).__name__}: {exc})"


def image_sizes(paths: Iterable[Path], threads: int = 4) -> list[tuple[int, int] | str]:
    """:func:`image_size` of each path (threads overlap the file system's waits)."""
    paths = list(paths)
    if len(paths) < 256:
        return [image_size(p) for p in paths]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        chunks = [paths[i:i + 2048] for i in range(0, len(paths), 2048)]
        return [size for chunk in pool.map(lambda c: [image_size(p) for p in c], chunks) for size in chunk]


def label_facts(path: Path) -> tuple[tuple[int, int], int, list[int]] | str:
    """A label map's (width, height), channel count and distinct values (a full decode:
    a label's values decide the score), or why it cannot be read."""
    import numpy as np
    from PIL import Image
    try:
        with Image.open(path) as img:
            size, bands = img.size, len(img.getbands())
            values = np.unique(np.asarray(img)).tolist() if bands == 1 else []
        return size, bands, values
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, SyntaxError) as exc:
        return f"not a readable image ({type(exc).__name__}: {exc})"


def read_listing(path: Path) -> list[str]:
    """The ids of an image list (``ImageSets/...txt``): the first word of each line."""
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def check_label_maps(pairs: list[tuple[Path, Path]], source: Path, valid: set[int], ignore: int,
                     findings: Findings, split: str, threads: int = 4) -> None:
    """Segmentation: each (image, label) pair's label exists, has one channel, the image's
    size and only values among ``valid`` or ``ignore``. The findings of a split are
    counted under ``source`` (its image list or folder), one line per kind."""
    if not pairs:
        findings.error("empty-split", source, f"split '{split}'", "lists no image: nothing to train or score on")
        return
    sizes = image_sizes([img for img, _ in pairs])
    with ThreadPoolExecutor(max_workers=threads) as pool:     # (Pillow's decoder releases the GIL)
        facts = list(pool.map(label_facts, [label for _, label in pairs], chunksize=16))
    findings.count(f"{split} images", len(pairs))
    for (img, label), size, fact in zip(pairs, sizes, facts):
        image, entry = findings.rel(img), findings.rel(label)
        if isinstance(size, str):
            findings.error("missing-image" if size == "missing" else "bad-image", source, image,
                           "does not exist" if size == "missing" else size)
            continue
        if isinstance(fact, str):
            findings.error("missing-label" if fact == "missing" else "bad-label", source, entry,
                           f"the label of {image} does not exist" if fact == "missing" else fact)
            continue
        (w, h), bands, values = fact
        if bands != 1:
            findings.error("label-channels", source, entry,
                           f"has {bands} channels; a label map holds one class index per pixel")
            continue
        if (w, h) != size:
            findings.error("label-size", source, entry,
                           f"is {w}x{h} but its image {image} is {size[0]}x{size[1]} "
                           f"(the pipeline would resize one of them: every pixel's class would move)")
        bad = sorted(set(values) - valid - {ignore})
        if bad:
            findings.error("label-values", source, entry,
                           f"holds value(s) {bad[:8]} that are neither a class index (0-{max(valid)}) nor the "
                           f"ignore value {ignore}: they would be scored as classes that do not exist")


# --------------------------------------------------------------------------- cache
def cache_key(ds: dict[str, Any]) -> str:
    """The dataset's fingerprint, with its annotation files' modification times (the
    fingerprint hashes files over 256 MiB by size only) and what the check depends on."""
    from .formats import fingerprint
    root = Path(ds["root"])
    stamps = sorted((p.relative_to(root).as_posix(), p.stat().st_mtime_ns)
                    for p in root.rglob("*.json") if p.is_file())
    extra = json.dumps([CHECK_VERSION, ds["format"], ds.get("classes"), ds.get("aug"), ds.get("unlabeled"), stamps])
    return hashlib.sha256(f"{fingerprint(ds)}\0{extra}".encode()).hexdigest()[:32]


def check_dataset(ds: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> tuple[Findings, bool]:
    """Run the format's check on a dataset (or read its cached result from ``cache_dir``,
    where it is cached). Returns the findings and whether they came from the cache."""
    from harness import catalog
    from harness.registry import import_target

    from .formats import dataset_format
    key = cache_key(ds) if cache_dir is not None else ""
    cached = Path(cache_dir) / f"{ds['name']}-{key}.json" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        try:
            return Findings.from_json(json.loads(cached.read_text())), True
        except (OSError, ValueError, KeyError, TypeError):
            pass                                     # a damaged cache entry: check again
    findings = Findings(ds["root"])
    target = catalog.DATASET_FORMATS.get(ds["format"]).get("check")
    if target is None:                  # a format registered without one: said, never silently passed
        findings.warning("unchecked", ds["root"], ds["format"], "this dataset format registers no check: its "
                                                               "data was not read before the run")
        return findings, False
    check: Callable[..., None] = import_target(target)
    try:
        classes = dataset_format(ds).classes(ds)
    except (ValueError, OSError) as exc:          # the file that lists the classes cannot be read
        findings.error("unreadable-classes", ds["root"], "classes", str(exc))
        return findings, False
    check(ds, classes, findings)
    if cached is not None:
        from harness.store.results import write_text_atomic
        write_text_atomic(cached, json.dumps(findings.to_json()))
    return findings, False


def report_lines(name: str, findings: Findings) -> list[str]:
    """One line per kind of finding, errors first, each naming the dataset and file."""
    return [f"datasets.{name}: {f.severity}: {f.line()}" for f in findings.errors + findings.warnings]


def warnings_json(findings: Findings) -> str:
    """The warnings as the rows record them: JSON [{kind, file, entry, what, count}]."""
    return json.dumps([{k: v for k, v in asdict(f).items() if k != "severity"} for f in findings.warnings])
