"""Suite validation: every error names the file, the key and what would be valid, and is
raised by load_suite, before anything is built or trained."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.suite.load import load_suite
from harness.suite.yamlio import SuiteError

from .conftest import REPO, TINY_SUITE


def _error(path: Path) -> str:
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    return str(info.value)


def _variant(write_suite, tmp_path, old: str, new: str) -> Path:
    text = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out")
    assert old in text, old
    return write_suite(text.replace(old, new))


def test_tiny_suite_expands_to_the_matrix(write_suite):
    suite = load_suite(write_suite())
    assert [t.role for t in suite.trials] == ["teacher", "student", "student"]
    assert [t.method for t in suite.trials] == ["teacher", "none", "fgd"]
    fgd = suite.trials[2]
    assert fgd.params == {"temp": 0.5, "alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lambda": 5e-6,
                          "inherit": True}
    assert fgd.teacher_checkpoint == suite.trials[0].teacher_checkpoint
    assert suite.trials[1].teacher is None          # the student alone does not depend on the teacher


def test_none_is_always_included_and_seeds_multiply(write_suite, tmp_path):
    path = _variant(write_suite, tmp_path, "methods: [none, fgd]\nseeds: [0]", "methods: [fgd]\nseeds: [0, 1, 2]")
    suite = load_suite(path)
    methods = [t.method for t in suite.student_trials()]
    assert methods.count("none") == 3 and methods.count("fgd") == 3


def test_unknown_top_level_key_suggests(write_suite, tmp_path):
    path = _variant(write_suite, tmp_path, "seeds: [0]", "seeds: [0]\nmethdos: [fgd]")
    msg = _error(path)
    assert str(path) in msg and "unknown key 'methdos'" in msg and "did you mean 'methods'" in msg
    assert re.search(r"suite\.yaml:\d+:", msg)        # the line of the key


def test_unknown_nested_key(write_suite, tmp_path):
    path = _variant(write_suite, tmp_path, "batch_size: 4", "batchsize: 4")
    msg = _error(path)
    assert "unknown key 'batchsize' in schedule" in msg and "did you mean 'batch_size'" in msg


def test_unknown_method_suggests(write_suite, tmp_path):
    msg = _error(_variant(write_suite, tmp_path, "methods: [none, fgd]", "methods: [none, fdg]"))
    assert "unknown method 'fdg'" in msg and "did you mean 'fgd'" in msg and "valid:" in msg


def test_unknown_method_parameter(write_suite, tmp_path):
    msg = _error(_variant(write_suite, tmp_path, "methods: [none, fgd]",
                          "methods:\n  fgd: {params: {alpah: 0.1}}"))
    assert "'alpah' is not a parameter of fgd" in msg and "did you mean 'alpha'" in msg


def test_missing_dataset_root_suggests_synth(write_suite, tmp_path):
    text = TINY_SUITE.format(root=tmp_path / "nowhere", output=tmp_path / "out")
    text = re.sub(r"\n    synth: .*", "", text)
    msg = _error(write_suite(text))
    assert "datasets.shapes.root" in msg and "does not exist" in msg
    assert f"python -m harness data synth coco --out {tmp_path / 'nowhere'}" in msg


def test_unknown_dataset_format(write_suite, tmp_path):
    msg = _error(_variant(write_suite, tmp_path, "format: coco", "format: cocoo"))
    assert "unknown dataset format 'cocoo'" in msg and "did you mean 'coco'" in msg


def test_method_task_must_match_dataset(write_suite, tmp_path, monkeypatch):
    from harness import catalog
    entry = catalog.METHODS.get("fgd")
    monkeypatch.setitem(entry.meta, "tasks", ("seg",))
    msg = _error(write_suite())
    assert "method 'fgd' (fgd) is for task seg" in msg and "is a det dataset" in msg


def test_pair_the_method_cannot_serve(write_suite, tmp_path, monkeypatch):
    from harness import catalog
    monkeypatch.setitem(catalog.ARCHS._entries, "two_stage_like", catalog.ARCHS.get("retinanet").__class__(
        name="two_stage_like", target=None,
        meta={**catalog.ARCHS.get("retinanet").meta, "levels": (4, 8, 16, 32)}))
    text = TINY_SUITE.format(root=tmp_path / "d", output=tmp_path / "o")
    text = text.replace("  t:\n    arch: retinanet", "  t:\n    arch: two_stage_like")
    msg = _error(write_suite(text))
    assert "cannot serve the pair t -> s" in msg and "strides [4, 8, 16, 32]" in msg


def test_unknown_arch(write_suite, tmp_path):
    msg = _error(_variant(write_suite, tmp_path, "  s:\n    arch: retinanet", "  s:\n    arch: retinanett"))
    assert "students.s.arch" in msg and "did you mean 'retinanet'" in msg


def test_pair_names_unknown_model(write_suite, tmp_path):
    msg = _error(_variant(write_suite, tmp_path, "{teacher: t, student: s}", "{teacher: t, student: ss}"))
    assert "student 'ss'" in msg and "did you mean 's'" in msg


def test_missing_teacher_checkpoint(write_suite, tmp_path):
    msg = _error(_variant(write_suite, tmp_path, "  t:\n    arch: retinanet",
                          "  t:\n    checkpoint: /no/such/teacher.pth\n    arch: retinanet"))
    assert "teachers.t.checkpoint" in msg and "/no/such/teacher.pth" in msg and "is not a file" in msg


def test_pair_methods_restrict_the_matrix_and_student_schedules_apply(write_suite, tmp_path):
    text = TINY_SUITE.format(root=tmp_path / "d", output=tmp_path / "o")
    text = text.replace("methods: [none, fgd]", "methods: [none, fgd, feature_mse]")
    text = text.replace("  - {teacher: t, student: s}", "  - {teacher: t, student: s, methods: [feature_mse]}")
    text = text.replace("  s:\n    arch: retinanet", "  s:\n    schedule: {lr: 0.02}\n    arch: retinanet")
    suite = load_suite(write_suite(text))
    assert [t.method for t in suite.student_trials()] == ["none", "feature_mse"]
    assert all(t.schedule["lr"] == 0.02 for t in suite.student_trials())
    assert suite.teacher_trials()[0].schedule["lr"] == 0.01


def test_pair_names_an_unknown_method(write_suite, tmp_path):
    msg = _error(_variant(write_suite, tmp_path, "{teacher: t, student: s}", "{teacher: t, student: s, methods: [fgdd]}"))
    assert "names method 'fgdd'" in msg and "did you mean 'fgd'" in msg


def test_method_parameter_types_and_choices(write_suite, tmp_path):
    msg = _error(_variant(write_suite, tmp_path, "methods: [none, fgd]", "methods:\n  fgd: {params: {alpha: high}}"))
    assert "params.alpha must be a number" in msg
    msg = _error(_variant(write_suite, tmp_path, "methods: [none, fgd]", "methods:\n  gid: {params: {score: papr}}"))
    assert "'papr' is not one of paper, max_logit" in msg and "did you mean 'paper'" in msg
    msg = _error(_variant(write_suite, tmp_path, "methods: [none, fgd]", "methods:\n  fgd: {params: {inherit: 1}}"))
    assert "must be true or false" in msg


def test_mixed_task_suite_applies_pairs_and_methods_by_task(write_suite, tmp_path):
    text = TINY_SUITE.format(root=tmp_path / "d", output=tmp_path / "o")
    text = text.replace("datasets:\n", "datasets:\n  cls: {format: imagenet, root: %s, synth: {train_images: 2}}\n"
                        % (tmp_path / "c"), 1)
    text = text.replace("students:\n", "students:\n  c-s: {arch: resnet18}\n", 1)
    text = text.replace("teachers:\n", "teachers:\n  c-t: {arch: resnet34}\n", 1)
    text = text.replace("  - {teacher: t, student: s}", "  - {teacher: t, student: s}\n  - [c-t, c-s]")
    text = text.replace("methods: [none, fgd]", "methods: [none, fgd, ssld]")
    suite = load_suite(write_suite(text))
    by_ds = {}
    for t in suite.trials:
        by_ds.setdefault(t.dataset["name"], set()).add(t.method)
    assert by_ds == {"shapes": {"teacher", "none", "fgd"}, "cls": {"teacher", "none", "ssld"}}


def test_pair_mixing_tasks_and_pair_without_dataset(write_suite, tmp_path):
    msg = _error(_variant(write_suite, tmp_path, "  s:\n    arch: retinanet", "  s:\n    arch: resnet18"))
    assert "mixes tasks" in msg and "(resnet18) a cls model" in msg
    text = TINY_SUITE.format(root=tmp_path / "d", output=tmp_path / "o").replace(
        "students:\n", "students:\n  c-s: {arch: resnet18}\n", 1).replace(
        "teachers:\n", "teachers:\n  c-t: {arch: resnet34}\n", 1).replace(
        "  - {teacher: t, student: s}", "  - {teacher: t, student: s}\n  - [c-t, c-s]")
    assert "is a cls pair but no dataset of the suite is" in _error(write_suite(text))


def test_duplicate_key(write_suite, tmp_path):
    msg = _error(_variant(write_suite, tmp_path, "seeds: [0]", "seeds: [0]\nseeds: [1]"))
    assert "key 'seeds' is given twice" in msg


def test_extends_merges_and_overrides(write_suite, tmp_path):
    base = write_suite(name="base.yaml")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nname: child\nseeds: [3, 4]\nschedule: {epochs: 2}\n")
    suite = load_suite(child)
    assert suite.name == "child"
    assert sorted({t.seed for t in suite.student_trials()}) == [3, 4]
    assert suite.trials[1].schedule["epochs"] == 2 and suite.trials[1].schedule["batch_size"] == 4
    assert base.exists()


def test_extends_error_points_at_child_file(write_suite, tmp_path):
    write_suite(name="base.yaml")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\nresources: {cpus: 2}\n")
    msg = _error(child)
    assert "child.yaml:2" in msg and "did you mean 'cpu'" in msg


def test_missing_base_suite(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("extends: nothere.yaml\n")
    assert "base suite 'nothere.yaml' not found" in _error(child)


def test_trial_ids_are_stable_and_content_addressed(write_suite, tmp_path):
    a = load_suite(write_suite())
    b = load_suite(write_suite())
    assert [t.trial_id for t in a.trials] == [t.trial_id for t in b.trials]
    c = load_suite(_variant(write_suite, tmp_path, "lr: 0.01", "lr: 0.02"))
    assert a.trials[2].trial_id != c.trials[2].trial_id


@pytest.mark.parametrize("path", sorted((REPO / "suites").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_suite_validates(path, monkeypatch, tmp_path):
    """Suites with real data roots and checkpoints validate once those exist (here:
    empty stand-ins in a temporary folder)."""
    for var in ("COCO_ROOT", "VOC_ROOT", "CITYSCAPES_ROOT", "IMAGENET_ROOT"):
        monkeypatch.setenv(var, str(tmp_path))
    monkeypatch.setenv("KD_CHECKPOINTS", str(tmp_path))
    (tmp_path / "VOC2012").mkdir()
    for text in [path.read_text()] + [p.read_text() for p in (REPO / "suites" / "base").glob("*.yaml")]:
        for name in re.findall(r"\$\{KD_CHECKPOINTS[^}]*\}/([\w.\-+]+)", text):
            (tmp_path / name).touch()
    monkeypatch.chdir(REPO)
    suite = load_suite(path)
    assert suite.trials


def test_the_key_reference_is_generated_from_the_schema():
    """docs/suite-schema.md is `python -m harness schema`'s output: regenerate it when a key changes."""
    from harness.suite.reference import reference
    assert (REPO / "docs" / "suite-schema.md").read_text() == reference() + "\n"


def test_a_model_entry_has_its_own_resources(write_suite, tmp_path):
    """A model's ``resources`` keys override the suite's one by one, for that model's
    trials only, and do not change what a trial is (its id)."""
    plain = {t.name: t for t in load_suite(_variant(write_suite, tmp_path, "methods: [none, fgd]", "methods: [none, fgd]")).trials}
    path = _variant(write_suite, tmp_path, "teachers:\n  t:\n", "teachers:\n  t:\n    resources: {cpu: 2, gpu: 0.5}\n")
    suite = load_suite(path)
    by_role = {t.role: t.resources for t in suite.trials}
    assert by_role["teacher"] == {"cpu": 2, "gpu": 0.5, "workers": 1}
    assert by_role["student"] == {"cpu": 1, "gpu": 0, "workers": 1}
    assert {t.name: t.trial_id for t in suite.trials} == {n: t.trial_id for n, t in plain.items()}

    from harness.run.session import check_resources
    with pytest.raises(SuiteError, match=r"teacher: it asks for 2 CPU and 0.5 GPU.*model 't'"):
        check_resources(suite, [{"CPU": 4.0, "GPU": 0.0}])
    check_resources(suite, [{"CPU": 1.0, "GPU": 0.0}, {"CPU": 2.0, "GPU": 1.0}])
