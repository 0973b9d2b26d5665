"""Datasets are checked before anything trains (harness.data.checks): each kind of
problem is one line naming the file, the first entry and how many share it; errors stop
``run`` and ``plan`` before any trial, warnings are counted and recorded in the rows."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.cli import main
from harness.data import synth
from harness.data.checks import check_dataset

from .conftest import TINY_SUITE

WRITERS = {"coco": synth.write_coco, "voc": synth.write_voc, "cityscapes": synth.write_cityscapes,
           "voc_seg": synth.write_voc_seg, "imagenet": synth.write_imagenet}


def _ds(fmt: str, root: Path, **extra) -> dict:
    return {"name": "d", "format": fmt, "root": str(root), "synth": None, "classes": None, "unlabeled": None,
            "aug": False, **extra}


def _write(fmt: str, root: Path, **kw) -> Path:
    kw = {"train_images": 4, "val_images": 2, "image_size": 32, **kw}
    return WRITERS[fmt](root, **kw)


def _kinds(findings) -> dict[str, tuple[str, int]]:
    return {f.kind: (f.severity, f.count) for f in findings.errors + findings.warnings}


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_every_synthetic_twin_passes_its_check(tmp_path, fmt):
    root = _write(fmt, tmp_path / fmt)
    findings, cached = check_dataset(_ds(fmt, root, synth={}))       # (synthetic: the shapes' classes)
    assert not findings.errors, [f.line() for f in findings.errors]
    assert not cached and findings.stats


def _coco(tmp_path: Path) -> tuple[Path, dict]:
    root = _write("coco", tmp_path / "coco", train_images=6, max_objects=2)
    doc = json.loads((root / "annotations/instances_train2017.json").read_text())
    return root, doc


def _save(root: Path, doc: dict) -> None:
    (root / "annotations/instances_train2017.json").write_text(json.dumps(doc))


def test_coco_problems_are_named_with_file_entry_and_count(tmp_path):
    root, doc = _coco(tmp_path)
    (root / "train2017" / doc["images"][0]["file_name"]).unlink()          # an image that is not there
    first = [a for a in doc["annotations"] if a["image_id"] != doc["images"][0]["id"]]
    first[0]["bbox"][2] = -3                                                 # negative width
    first[1]["bbox"] = [1000, 1000, 5, 5]                                    # wholly outside its 32x32 image
    first[2]["category_id"] = 99                                             # not among the categories
    first[3]["bbox"] = [-4, 2, 10, 10]                                       # partly outside: clipped, a warning
    _save(root, doc)
    findings, _ = check_dataset(_ds("coco", root))
    kinds = _kinds(findings)
    assert kinds["missing-image"] == ("error", 1)
    assert kinds["box-size"][0] == kinds["box-outside"][0] == kinds["unknown-category"][0] == "error"
    assert kinds["box-clipped"] == ("warning", 1)
    lines = {f.kind: f.line() for f in findings.errors}
    assert lines["missing-image"].startswith("annotations/instances_train2017.json: images[0] (id 1): its image "
                                             "'train2017/000000000000.jpg' does not exist")
    assert "category_id 99" in lines["unknown-category"] and "annotations[" in lines["unknown-category"]


def test_many_entries_of_one_kind_are_one_line_with_a_count(tmp_path):
    root, doc = _coco(tmp_path)
    for a in doc["annotations"]:
        a["category_id"] = 7
    _save(root, doc)
    findings, _ = check_dataset(_ds("coco", root))
    [line] = [f for f in findings.errors if f.kind == "unknown-category"]
    assert line.count == len(doc["annotations"]) and f"({line.count} entries like it)" in line.line()


def test_a_train_split_without_annotations_and_a_header_size_that_contradicts_the_json(tmp_path):
    root, doc = _coco(tmp_path)
    doc["annotations"] = []
    doc["images"][1]["width"] = 64
    _save(root, doc)
    kinds = _kinds(check_dataset(_ds("coco", root))[0])
    assert kinds["no-instances"][0] == "error" and kinds["image-size"][0] == "error"


def test_voc_an_object_of_no_voc_class_and_a_missing_annotation(tmp_path):
    root = _write("voc", tmp_path / "VOCdevkit")
    xml = sorted((root / "VOC2007/Annotations").glob("*.xml"))
    xml[0].write_text(xml[0].read_text().replace("<name>", "<name>x", 1))
    xml[1].unlink()
    kinds = _kinds(check_dataset(_ds("voc", root, synth={}))[0])
    assert kinds["unknown-category"][0] == "error" and kinds["missing-annotation"][0] == "error"


def _label(root: Path, split: str) -> Path:
    return sorted((root / "gtFine" / split).rglob("*_labelTrainIds.png"))[0]


def test_segmentation_labels_with_a_stray_value_or_another_size_are_errors(tmp_path):
    root = _write("cityscapes", tmp_path / "cs")
    val = _label(root, "val")
    label = np.asarray(Image.open(val)).copy()
    label[0, 0] = 30                                       # neither a train id (0-18) nor 255
    Image.fromarray(label).save(val)
    train = _label(root, "train")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(train)
    findings, _ = check_dataset(_ds("cityscapes", root))
    lines = {f.kind: f.line() for f in findings.errors}
    assert "value(s) [30]" in lines["label-values"] and "gtFine/val/" in lines["label-values"]
    assert "is 8x8 but its image" in lines["label-size"]


def test_voc_seg_a_missing_label_and_an_rgb_label(tmp_path):
    root = _write("voc_seg", tmp_path / "VOC2012")
    labels = sorted((root / "SegmentationClass").glob("*.png"))
    labels[0].unlink()
    Image.new("RGB", Image.open(labels[1]).size).save(labels[1])
    kinds = _kinds(check_dataset(_ds("voc_seg", root))[0])
    assert kinds["missing-label"][0] == "error" and kinds["label-channels"][0] == "error"


def test_image_folders_missing_empty_and_foreign_files(tmp_path):
    root = _write("imagenet", tmp_path / "inet")
    classes = sorted(p.name for p in (root / "train").iterdir())
    shutil.rmtree(root / "val" / classes[0])                               # val lacks a class folder
    for p in (root / "train" / classes[1]).iterdir():                      # a class with no training image
        p.unlink()
    (root / "train" / classes[2] / "notes.txt").write_text("x")           # not an image
    (root / "val" / "extra").mkdir()
    kinds = _kinds(check_dataset(_ds("imagenet", root))[0])
    assert {"missing-class", "empty-class", "not-an-image", "extra-class"} <= set(kinds)
    assert kinds["not-an-image"][0] == "warning"


def test_files_that_are_not_images_in_a_class_folder_are_ignored_with_a_warning(tmp_path):
    """notes.txt, Thumbs.db (and the hidden .DS_Store) beside the images: a warning naming
    them, no error, and the loader reads the images alone (a run used to stop)."""
    from harness.data.folders import ImageFolder
    root = _write("imagenet", tmp_path / "inet")
    classes = sorted(p.name for p in (root / "train").iterdir())
    before = len(ImageFolder(root, "train", classes, 32, train=True))
    for name in ("notes.txt", "Thumbs.db", ".DS_Store"):
        (root / "train" / classes[0] / name).write_text("x")
    findings = check_dataset(_ds("imagenet", root))[0]
    assert not findings.errors
    warning = next(f for f in findings.warnings if f.kind == "not-an-image")
    assert warning.count == 2 and "ignored" in warning.what          # the hidden file is not even listed
    assert len(ImageFolder(root, "train", classes, 32, train=True)) == before


def test_the_result_is_cached_by_fingerprint(tmp_path):
    root, doc = _coco(tmp_path)
    cache = tmp_path / "cache"
    first, cached = check_dataset(_ds("coco", root), cache)
    assert not cached and not first.errors
    again, cached = check_dataset(_ds("coco", root), cache)
    assert cached and again.summary() == first.summary()
    doc["annotations"][0]["category_id"] = 99                             # the data changed: checked again
    _save(root, doc)
    third, cached = check_dataset(_ds("coco", root), cache)
    assert not cached and third.errors


def _suite(tmp_path: Path, root: Path) -> Path:
    text = re.sub(r"\n    synth: .*", "", TINY_SUITE.format(root=root, output=tmp_path / "out"))
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return path


def test_run_refuses_bad_data_before_anything_trains_and_plan_shows_it(tmp_path, capsys):
    root, doc = _coco(tmp_path)
    for name in [im["file_name"] for im in doc["images"][:3]]:
        (root / "train2017" / name).unlink()
    path = _suite(tmp_path, root)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "datasets.shapes: error: annotations/instances_train2017.json: images[0] (id 1): its image" in err
    assert "(3 entries like it)" in err and "nothing was trained" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "rows").exists()
    assert main(["plan", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "data shapes: checked" in out and "(3 entries like it)" in err


def test_warnings_are_printed_and_recorded_in_the_rows(tmp_path, capsys):
    from harness.run.preflight import check_data
    from harness.run.session import with_data_warnings
    from harness.suite.load import load_suite
    root, doc = _coco(tmp_path)
    doc["annotations"][0]["bbox"][0] = -2                                   # partly outside: clipped
    _save(root, doc)
    suite = load_suite(_suite(tmp_path, root))
    check_data(suite)
    assert "warning: datasets.shapes: warning:" in capsys.readouterr().err
    [row] = with_data_warnings(suite, [{"dataset": "shapes"}])
    [warning] = json.loads(row["data_warnings"])
    assert warning["kind"] == "box-clipped" and warning["count"] == 1


def test_a_synthetic_root_written_with_other_parameters_is_refused(tmp_path, capsys):
    """A suite asking for 64 validation images scored on the 32 an earlier suite wrote
    to the same root: the writer records its parameters there, and another set (or no
    record) is an error naming the key, before anything runs."""
    root = tmp_path / "data" / "shapes"
    synth.write_coco(root, train_images=8, val_images=3, image_size=64, max_objects=3, seed=1)
    path = tmp_path / "suite.yaml"
    path.write_text(TINY_SUITE.format(root=root, output=tmp_path / "out"))          # asks val_images: 4
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert "datasets.shapes.synth" in err and "val_images: 3 there, 4 asked" in err
    (root / ".kd-synth.json").unlink()
    assert main(["plan", str(path)]) == 2
    assert "holds no record of how it was written" in capsys.readouterr().err
    shutil.rmtree(root)
    synth.write_coco(root, train_images=8, val_images=4, image_size=64, max_objects=3, seed=1)   # the same
    assert main(["plan", str(path)]) == 0


def test_a_problem_shared_by_many_label_maps_is_one_line_with_a_count(tmp_path):
    root = _write("cityscapes", tmp_path / "cs", val_images=3)
    for label in sorted((root / "gtFine" / "val").rglob("*_labelTrainIds.png")):
        values = np.asarray(Image.open(label)).copy()
        values[0, 0] = 40
        Image.fromarray(values).save(label)
    [line] = [f for f in check_dataset(_ds("cityscapes", root))[0].errors if f.kind == "label-values"]
    assert line.count == 3 and line.file == "leftImg8bit/val" and "(3 entries like it)" in line.line()


def test_the_voc_check_knows_mmdets_voc_classes():
    """check_voc reads VOC's 20 detection classes without importing mmdet (plan imports no
    backend): they must be mmdet's own."""
    from mmdet.datasets import VOCDataset
    assert tuple(VOCDataset.METAINFO["classes"]) == synth.VOC_SEG_CLASSES[1:]


@pytest.mark.parametrize("fmt", ["coco", "imagenet", "cityscapes"])
def test_a_truncated_image_is_an_error_naming_the_file(tmp_path, fmt):
    """A JPEG or PNG cut short (a copy that stopped): its header still reads, so it passed
    the check and every trial failed at load (or trained on grey); now an error naming
    the file, found from the file's tail alone."""
    root = _write(fmt, tmp_path / fmt)
    image = sorted(p for p in root.rglob("*") if p.suffix in (".jpg", ".png") and "train" in p.as_posix()
                   and "gtFine" not in p.as_posix())[0]
    data = image.read_bytes()
    image.write_bytes(data[: len(data) * 2 // 3])
    findings = check_dataset(_ds(fmt, root))[0]
    bad = [f for f in findings.errors if "truncated" in f.what]
    assert bad and image.name in bad[0].entry + bad[0].what, [(f.kind, f.entry, f.what) for f in findings.errors]
