"""End to end: a tiny suite through Ray Tune, results read back with pandas; a failing
trial leaves an error row and the others finish; a re-run skips finished work."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from harness.store import results
from harness.suite.load import load_suite
from harness.run.matrix import run_suite

from .conftest import TINY_SUITE


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    broken = tmp / "broken"
    (broken / "annotations").mkdir(parents=True)
    (broken / "annotations" / "instances_train2017.json").write_text("{not json")
    text = TINY_SUITE.format(root=tmp / "shapes", output=tmp / "results" / "tiny")
    text = text.replace("datasets:\n", f"datasets:\n  broken: {{format: coco, root: {broken}}}\n"
                                      f"  voc: {{format: voc, root: {tmp / 'VOCdevkit'}, synth: {{train_images: 8, "
                                      f"val_images: 4, image_size: 64, seed: 3}}}}\n", 1)
    path = tmp / "tiny.yaml"
    path.write_text(text)
    suite = load_suite(path)
    first = run_suite(suite, num_cpus=2)
    second = run_suite(load_suite(path), num_cpus=2)
    return suite, first, second


def test_rows_and_columns(e2e):
    suite, first, _ = e2e
    df = pd.read_parquet(first["results"])
    assert list(df.columns) == list(results.COLUMNS)
    good = df[df["dataset"] == "shapes"]
    assert set(good["status"]) == {"ok"}
    assert set(good["method"]) == {"teacher", "none", "fgd"}
    primary = good[good["primary"]]
    assert sorted(primary["method"]) == ["fgd", "none", "teacher"]
    assert set(primary["metric"]) == {"bbox_mAP"}
    assert {"bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l"} <= set(good["metric"])
    assert good["value"].between(0, 1).all()
    assert (good["wall_time_s"] > 0).all() and (good["train_images_per_s"] > 0).all()
    fgd = good[good["method"] == "fgd"].iloc[0]
    assert fgd["teacher"] == "t" and fgd["student"] == "s" and '"alpha": 0.001' in fgd["params"]
    # the teacher was trained once and its checkpoint cached for every trial
    teacher = [t for t in suite.teacher_trials() if t.dataset["name"] == "shapes"][0]
    assert teacher.teacher_checkpoint and __import__("os").path.isfile(teacher.teacher_checkpoint)
    assert (teacher.trial_dir.parent / good[good["method"] == "fgd"]["trial_id"].iloc[0] / "student.pth").is_file()


def test_failing_trials_leave_error_rows_and_do_not_stop_the_others(e2e):
    _, first, _ = e2e
    df = pd.read_parquet(first["results"])
    bad = df[df["dataset"] == "broken"]
    assert len(bad) == 3 and set(bad["status"]) == {"error"}
    assert bad["error"].str.len().min() > 0
    assert bad[bad["method"] == "fgd"]["error"].iloc[0].startswith("FileNotFoundError: teacher checkpoint")
    assert sum(1 for t in first["trials"] if t["error"]) == 3


def test_rerun_skips_finished_trials(e2e):
    _, first, second = e2e
    assert second["skipped"] == 6                        # the three ok trials on 'shapes' and on 'voc'
    assert len(second["trials"]) == 3                    # the failed ones are tried again
    assert len(pd.read_parquet(second["results"])) == len(pd.read_parquet(first["results"]))


def test_voc_dataset_gives_voc_map_rows(e2e):
    _, first, _ = e2e
    voc = pd.read_parquet(first["results"]).query("dataset == 'voc'")
    assert set(voc["status"]) == {"ok"} and set(voc["method"]) == {"teacher", "none", "fgd"}
    assert set(voc["metric"]) == {"voc07_mAP", "voc_area_mAP"}
    assert set(voc[voc["primary"]]["metric"]) == {"voc07_mAP"}
    assert voc["value"].between(0, 1).all()


def test_report_command(e2e, capsys):
    from harness.cli import main
    suite, _, _ = e2e
    assert main(["report", str(suite.output)]) == 0
    out = capsys.readouterr().out
    assert "teacher t -> student s" in out and "student alone" in out and "fgd" in out
    assert "3 trial(s) without a result (not in the leaderboard)" in out


def test_the_report_names_each_datasets_classes(e2e, capsys):
    """After training, the report shows what each dataset was: its class count and first
    names (a wrong set-up is visible in the leaderboard, not only before the run)."""
    from harness.cli import main
    suite, _, _ = e2e
    assert main(["report", str(suite.output)]) == 0
    out = capsys.readouterr().out
    assert "shapes (coco, " in out and "4 classes (square, disc, triangle, cross)" in out
    assert "voc (voc, " in out and out.count("4 classes (square, disc, triangle, cross)") == 2   # synthetic VOC
    assert "broken (coco, " in out and "classes unknown" in out
    assert "Datasets: " in (Path(suite.output) / "report.html").read_text()
