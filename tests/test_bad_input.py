"""The bad-input corpus: what a careless user or an attacker would give `harness run`.

Each case is one suite file (or data file) that must be refused with exit code 2 and a
message naming the file and the key, before anything is written: no output directory,
no synthetic dataset, no lock file, no trial. The cases that need the backends (a
`type:` that is not a registered class, a corrupt annotation file) go through the same
command; everything else is refused by the schema in milliseconds.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from harness.cli import main

from .conftest import TINY_SUITE


def _sub(old: str, new: str, count: int = 1):
    def apply(text: str) -> str:
        assert old in text, f"the tiny suite has no {old!r}"
        return text.replace(old, new, count)
    return apply


def _sub_many(pairs):
    def apply(text: str) -> str:
        for old, new in pairs:
            assert old in text, f"the tiny suite has no {old!r}"
            text = text.replace(old, new, 1)
        return text
    return apply


def _whole(body: str):
    return lambda text: body


def _append(extra: str):
    return lambda text: text + extra


FGD = "methods: [none, fgd]"
SCHED = "schedule: {epochs: 1, val_interval: 1, batch_size: 4, lr: 0.01, warmup_iters: 0, img_scale: [64, 64]}"

#: id -> (change to the tiny suite, what the message must contain besides the file)
CASES: dict[str, tuple] = {
    # --- structure and YAML
    "unknown-top-key": (_append("methdos: [fgd]\n"), "methdos"),
    "unknown-schedule-key": (_sub("batch_size: 4", "batchsize: 4"), "batchsize"),
    "unknown-dataset-key": (_sub("format: coco", "format: coco\n    rooot: x"), "rooot"),
    "unknown-model-key": (_sub("arch: retinanet", "arch: retinanet\n    depth: 50"), "depth"),
    "unknown-pair-key": (_sub("{teacher: t, student: s}", "{teacher: t, student: s, metods: [fgd]}"), "metods"),
    "duplicate-key": (_append("seeds: [1]\n"), "seeds"),
    "invalid-yaml": (_append("methods: [fgd\n"), "YAML"),
    "empty-file": (_whole(""), "datasets"),
    "top-level-list": (_whole("- a\n- b\n"), "mapping"),
    "python-tag": (_append("x: !!python/object/apply:os.system ['touch /tmp/pwned']\n"), "python/object"),
    "list-as-key": (_append("? [a, b]\n: 1\n"), "key"),
    "extends-number": (_append("extends: 5\n"), "extends"),
    "extends-missing": (_append("extends: nowhere.yaml\n"), "extends"),
    "extends-cycle": (_append("extends: suite.yaml\n"), "extends"),
    # --- types
    "teacher-seed-abc": (_append("teacher_seed: abc\n"), "teacher_seed"),
    "methods-number": (_sub(FGD, "methods: 5"), "methods"),
    "methods-list-of-numbers": (_sub(FGD, "methods: [fgd, 5]"), "methods"),
    "params-list": (_sub(FGD, "methods:\n  fgd: {params: [1, 2]}"), "params"),
    "classes-number": (_sub("format: coco", "format: coco\n    classes: 5"), "classes"),
    "classes-repeated": (_sub("format: coco", "format: coco\n    classes: [a, a]"), "classes"),
    "cpu-many": (_sub("resources: {cpu: 1, gpu: 0}", "resources: {cpu: many, gpu: 0}"), "resources.cpu"),
    "cpu-zero": (_sub("resources: {cpu: 1, gpu: 0}", "resources: {cpu: 0, gpu: 0}"), "resources.cpu"),
    "cpu-1000": (_sub("resources: {cpu: 1, gpu: 0}", "resources: {cpu: 1000, gpu: 0}"), "resources"),
    "gpu-negative": (_sub("resources: {cpu: 1, gpu: 0}", "resources: {cpu: 1, gpu: -1}"), "resources.gpu"),
    "amp-without-gpu": (_sub("img_scale: [64, 64]}", "img_scale: [64, 64], amp: true}"),
                        "schedule.amp: mixed precision needs a GPU"),
    "amp-dtype": (_sub("img_scale: [64, 64]}", "img_scale: [64, 64], amp: true, amp_dtype: half}"),
                  "schedule.amp_dtype"),
    "model-cpus": (_sub("students:\n  s:\n", "students:\n  s:\n    resources: {cpus: 2}\n"),
                   "students.s.resources"),
    "model-cpu-1000": (_sub("students:\n  s:\n", "students:\n  s:\n    resources: {cpu: 1000}\n"), "resources"),
    "storage-ftp": (_append("storage: ftp://host/kd\n"), "storage"),
    "storage-outside": (_append("storage: /etc/kd-store\n"), "storage"),
    "seeds-bools": (_sub("seeds: [0]", "seeds: [true, false]"), "seeds"),
    "seeds-repeated": (_sub("seeds: [0]", "seeds: [0, 1, 0]"), "seeds"),
    "seeds-empty": (_sub("seeds: [0]", "seeds: []"), "seeds"),
    "seeds-negative": (_sub("seeds: [0]", "seeds: [-1]"), "seeds"),
    "pairs-empty": (_sub("pairs:\n  - {teacher: t, student: s}", "pairs: []"), "pairs"),
    # --- values that cannot be right
    "lr-nan": (_sub("lr: 0.01", "lr: .nan"), "schedule.lr"),
    "lr-inf": (_sub("lr: 0.01", "lr: .inf"), "schedule.lr"),
    "lr-negative": (_sub("lr: 0.01", "lr: -0.1"), "schedule.lr"),
    "lr-string": (_sub("lr: 0.01", "lr: '0.01'"), "schedule.lr"),
    "grad-clip-negative": (_sub("lr: 0.01", "lr: 0.01, grad_clip: -1"), "schedule.grad_clip"),
    "batch-size-1e12": (_sub("batch_size: 4", "batch_size: 1e12"), "schedule.batch_size"),
    "epochs-true": (_sub("epochs: 1", "epochs: true"), "schedule.epochs"),
    "val-interval-zero": (_sub("val_interval: 1", "val_interval: 0"), "schedule.val_interval"),
    "momentum-1.5": (_sub("lr: 0.01", "lr: 0.01, momentum: 1.5"), "schedule.momentum"),
    "img-scale-one-number": (_sub("img_scale: [64, 64]", "img_scale: [64]"), "schedule.img_scale"),
    "optimizer-unknown": (_sub("lr: 0.01", "lr: 0.01, optimizer: adam"), "schedule.optimizer"),
    "model-schedule-lr-negative": (_sub("neck: {out_channels: 16}\n    head: {feat_channels: 16, stacked_convs: 1}\n"
                                        "students",
                                        "neck: {out_channels: 16}\n    head: {feat_channels: 16, stacked_convs: 1}\n"
                                        "    schedule: {lr: -1}\nstudents"), "teachers.t.schedule.lr"),
    "synth-negative-count": (_sub("train_images: 8", "train_images: -8"), "synth.train_images"),
    "synth-tiny-images": (_sub("image_size: 64", "image_size: 4"), "synth.image_size"),
    "synth-unknown-key": (_sub("seed: 1}", "seed: 1, unlabeled_images: 5}"), "unlabeled_images"),
    "temp-negative": (_sub(FGD, "methods:\n  fgd: {params: {temp: -5}}"), "temp"),
    "alpha-nan": (_sub(FGD, "methods:\n  fgd: {params: {alpha: .nan}}"), "alpha"),
    "alpha-bool": (_sub(FGD, "methods:\n  fgd: {params: {alpha: yes}}"), "alpha"),
    "inherit-number": (_sub(FGD, "methods:\n  fgd: {params: {inherit: 1}}"), "inherit"),
    "gid-top-n-fraction": (_sub(FGD, "methods:\n  gid: {params: {top_n: 3.5}}"), "top_n"),
    "gid-choice": (_sub(FGD, "methods:\n  gid: {params: {score: best}}"), "score"),
    "unknown-param": (_sub(FGD, "methods:\n  fgd: {params: {alpah: 0.1}}"), "alpah"),
    "unknown-method": (_sub(FGD, "methods: [none, fdg]"), "fdg"),
    "unknown-arch": (_sub("arch: retinanet", "arch: retinanett"), "arch"),
    "unknown-format": (_sub("format: coco", "format: cocoo"), "format"),
    "pair-unknown-teacher": (_sub("{teacher: t, student: s}", "{teacher: tt, student: s}"), "teacher"),
    "pair-twice": (_sub("  - {teacher: t, student: s}", "  - {teacher: t, student: s}\n  - [t, s]"), "pair"),
    "pretrained-number": (_sub("pretrained: false", "pretrained: 5"), "pretrained"),
    "pretrained-missing-file": (_sub("pretrained: false", "pretrained: /nonexistent/backbone.pth"), "pretrained"),
    "checkpoint-missing": (_sub("  t:\n    arch: retinanet", "  t:\n    checkpoint: /nonexistent/t.pth\n"
                                                             "    arch: retinanet"), "checkpoint"),
    # --- a search block
    "search-space-typo": (_append("search: {method: fgd, space: {alpah: {uniform: [0.1, 0.2]}}}\n"), "alpah"),
    "search-start-from-unknown-key": (_append("search: {method: fgd, space: {temp: {uniform: [0.3, 1.0]}}, "
                                              "start_from: [{tmp: 0.5}]}\n"), "start_from[0].tmp"),
    "search-start-from-outside": (_append("search: {method: fgd, space: {temp: {uniform: [0.3, 1.0]}}, "
                                          "start_from: [{temp: 2.0}]}\n"), "uniform [0.3, 1.0]"),
    "search-start-from-over-budget": (_append("search: {method: fgd, space: {temp: {choice: [0.5, 1.0]}}, budget: 1, "
                                              "start_from: [{temp: 0.5}, {temp: 1.0}]}\n"), "budget"),
    # --- paths
    "output-dotdot": (None, "output"),          # built in the test: needs the relative depth
    "output-absolute-elsewhere": ("output: /etc/kd-harness-x", "output"),
    "output-unset-var": ("output: ${KD_SURELY_UNSET_VAR}/x", "KD_SURELY_UNSET_VAR"),
    "teacher-cache-elsewhere": (_append("teacher_cache: /var/tmp/kd-teachers\n"), "teacher_cache"),
    "name-dotdot": (_sub("name: tiny", "name: ../../escape"), "name"),
    "teacher-name-dotdot": (_sub("  t:\n", "  ../t:\n"), "teachers"),
    "method-label-slash": (_sub(FGD, "methods:\n  a/b: {method: fgd}"), "methods"),
    "synth-root-elsewhere": ("root: /var/tmp/kd-synth-x", "root"),
    "unlabeled-escape": (_sub("format: coco", "format: coco\n    unlabeled: ../../x"), "unlabeled"),
    # --- code from a suite
    "type-import-path": (_sub("neck: {out_channels: 16}",
                              "neck: {out_channels: 16}\n    model: {data_preprocessor: {batch_augments: "
                              "[{type: os.system, command: 'touch /tmp/pwned'}]}}"), "type"),
    "type-not-a-string": (_sub("head: {feat_channels: 16, stacked_convs: 1}",
                               "head: {feat_channels: 16, stacked_convs: 1, norm_cfg: {type: 5}}"), "type"),
    "type-unregistered": (_sub("head: {feat_channels: 16, stacked_convs: 1}",
                               "head: {feat_channels: 16, stacked_convs: 1, norm_cfg: {type: antigravity}}"), "type"),
    "scope-unknown": (_sub("neck: {out_channels: 16}", "neck: {out_channels: 16, _scope_: os}"), "_scope_"),
    # --- bounds (issue: nothing unbounded)
    "yaml-alias-bomb": (_append("x0: &x0 [a, a, a, a, a, a, a, a, a, a]\n"
                                + "".join(f"x{i}: &x{i} [{', '.join([f'*x{i - 1}'] * 10)}]\n" for i in range(1, 8))),
                        "aliases"),
    "seeds-above-2-32": (_sub("seeds: [0]", "seeds: [4294967296]"), "seeds"),
    "teacher-seed-above-2-32": (_append("teacher_seed: 99999999999\n"), "teacher_seed"),
    "matrix-over-the-bound": (_sub_many([("seeds: [0]", "seeds: [" + ", ".join(map(str, range(1000))) + "]"),
                                         ("pairs:\n  - {teacher: t, student: s}",
                                          "pairs:\n" + "".join(f"  - {{teacher: t, student: s{i}}}\n"
                                                                for i in range(60))),
                                         ("students:\n  s:\n", "students:\n" + "".join(
                                             f"  s{i}: {{arch: retinanet}}\n" for i in range(60)) + "  s:\n")]),
                              "at most 100000"),
    # --- credentials and code
    "storage-user-info": (_append("storage: s3://AKIAXXXX:s3cr3tvalue@bucket/kd\n"), "user-info"),
    "storage-token-query": (_append("storage: s3://bucket/kd?session_token=s3cr3tvalue\n"), "session_token"),
    "pretrained-url-user-info": (_sub("pretrained: false", "pretrained: https://me:s3cr3tvalue@example.org/r.pth"),
                                 "user-info"),
    "checkpoint-url-token": (_sub("  t:\n    arch: retinanet", "  t:\n    checkpoint: "
                                  "https://example.org/t.pth?token=s3cr3tvalue\n    arch: retinanet"), "token"),
}



def _suite_text(tmp_path: Path, case: str) -> str:
    change, _ = CASES[case]
    text = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out")
    if case == "output-dotdot":
        depth = len(Path.cwd().resolve().parts)
        return re.sub(r"output: .*", f"output: {'../' * depth}etc/kd-harness-x", text)
    if isinstance(change, str):          # replace a whole line by key
        key = change.split(":", 1)[0]
        return re.sub(rf"(?m)^(\s*){key}: .*$", lambda m: m.group(1) + change, text, count=1)
    return change(text)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_before_anything_is_written(case, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KD_SURELY_UNSET_VAR", raising=False)
    path = tmp_path / "suite.yaml"
    path.write_text(_suite_text(tmp_path, case))
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["run", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert str(path) in err or path.name in err, err               # the file
    assert CASES[case][1] in err, err                               # the key
    assert sorted(p.name for p in tmp_path.iterdir()) == before     # nothing written, nothing trained
    assert not Path("/tmp/pwned").exists()
    assert "s3cr3tvalue" not in err                                 # a secret is never printed


def test_the_corpus_is_large_enough():
    assert len(CASES) + 3 >= 40       # with the three data and directory cases below


def test_binary_file(tmp_path, capsys):
    path = tmp_path / "suite.yaml"
    path.write_bytes(os.urandom(256) + b"\xff\xfe")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "not a text file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["suite.yaml"]


@pytest.mark.parametrize("command", ["plan", "run"])
def test_a_directory_instead_of_a_suite(tmp_path, capsys, command):
    assert main([command, str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_corrupt_annotation_file_is_named(tmp_path, capsys, synth_coco):
    """A real dataset whose annotation file is not JSON: the message names that file."""
    import shutil
    root = tmp_path / "coco"
    shutil.copytree(synth_coco, root)
    ann = next((root / "annotations").glob("*train*.json"))
    ann.write_text('{"images": [')
    text = TINY_SUITE.format(root=root, output=tmp_path / "out")
    text = re.sub(r"\n    synth: .*", "", text)
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(ann) in err and "JSON" in err, err
    assert not (tmp_path / "out").exists()


def test_a_class_the_annotations_do_not_have_is_refused(tmp_path, capsys, synth_coco):
    """``classes: [square, dics]`` trained a one-class model silently (mmdet drops the name
    it does not find): the run refuses it, naming the class and what the data has."""
    import shutil
    root = tmp_path / "coco"
    shutil.copytree(synth_coco, root)
    text = TINY_SUITE.format(root=root, output=tmp_path / "out")
    text = re.sub(r"\n    synth: .*", "\n    classes: [square, dics]", text)
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "datasets.shapes: classes: 'dics' is not among the 4 classes of the data (did you mean 'disc'?)" in err, err
    assert "square, disc, triangle, cross" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert main(["plan", str(path)]) == 2             # plan shows what the suite asked for, and the data check's word
    out, err = capsys.readouterr()
    assert "2 classes (square, dics)" in out and "declares no category 'dics'" in err


def test_extends_naming_a_self_looping_symlink_is_a_suite_error(tmp_path, capsys):
    """A base suite that is a symlink to itself: the suite's file and line, the key and
    the base named (it was pathlib's RuntimeError traceback)."""
    from harness.cli import main
    (tmp_path / "loop.yaml").symlink_to("loop.yaml")
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nextends: loop.yaml\n")
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: extends: base suite 'loop.yaml' cannot be read" in err and "Symlink loop" in err
