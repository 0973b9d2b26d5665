"""`harness tune`: a tiny search over FGD's alpha and temp on synthetic detection data,
through Ray Tune with Optuna and ASHA; every configuration's rows reach the store with
the search's id, the teacher is trained once, and the best configuration is written as
a suite file that `plan` accepts."""
from __future__ import annotations

import json

import yaml

from harness.store import results
from harness.cli import main

from .conftest import TINY_SUITE


# Iteration-based students, evaluated three times each (ASHA's rungs). Whether ASHA cuts
# one of these configurations depends on detection scores that are all about zero on this
# data (a tie, which no configuration is behind in): that it cuts one behind is
# test_asha_stops_a_configuration_behind_at_its_first_evaluation's, on data where it is.
SEARCH_SUITE = TINY_SUITE.replace(
    "synth: {{train_images: 8, val_images: 4, image_size: 64, max_objects: 3, seed: 1}}",
    "synth: {{train_images: 16, val_images: 8, image_size: 64, max_objects: 2, seed: 1}}",
).replace("epochs: 1, val_interval: 1,", "iters: 120, val_interval: 40,")

SEARCH = """search:
  method: fgd
  space:
    alpha: {loguniform: [1.0e-5, 1.0e-1]}
    temp: {uniform: [0.3, 1.0]}
  start_from:              # the released defaults, then a distillation weight 100x theirs
    - {alpha: 1.0e-3, temp: 0.5}
    - {alpha: 1.0e-1, temp: 1.0}
  budget: 4
  concurrency: 1
  seeds: [0]
  final_seeds: [7, 8, 9]
"""


def test_a_tiny_fgd_search_writes_rows_and_a_runnable_best_suite(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)   # (an earlier run may have set it)
    assert "iters: 120" in SEARCH_SUITE and "train_images: 16" in SEARCH_SUITE
    text = SEARCH_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out") + SEARCH
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    assert main(["tune", str(path), "--num-cpus", "1"]) == 0
    out = capsys.readouterr().out
    df = results.read_results(tmp_path / "out", current_only=False)
    search = df[df["search_id"] != ""]
    assert search["search_id"].nunique() == 1 and search["params"].nunique() == 4
    assert set(search["status"]) <= {"ok", "pruned"}
    configs = [yaml.safe_load(p) for p in search.drop_duplicates("trial_id")["params"]]
    assert any(c["alpha"] == 1e-3 and c["temp"] == 0.5 for c in configs)      # start_from was tried
    assert any(c["alpha"] == 1e-1 and c["temp"] == 1.0 for c in configs)
    assert all(1e-5 <= c["alpha"] <= 1e-1 and 0.3 <= c["temp"] <= 1.0 for c in configs)
    pruned = search[search["status"] == "pruned"].drop_duplicates("trial_id")
    assert all("stopped by ASHA after" in e for e in pruned["error"])
    tune_files = [p.name for p in (tmp_path / "out").rglob("*") if p.name in ("result.json", "progress.csv")]
    assert not tune_files, tune_files                      # the rows store is the record, not Tune's loggers
    assert (df["role"] == "teacher").sum() >= 1 and df[df["role"] == "teacher"]["trial_id"].nunique() == 1
    best_file = next((tmp_path / "out" / "searches").rglob("best-*.yaml"))
    assert f"python -m harness run {best_file}" in out
    best = yaml.safe_load(best_file.read_text())
    assert best["seeds"] == [7, 8, 9] and set(best["methods"]["fgd-best"]["params"]) == {"alpha", "temp"}
    assert main(["plan", str(best_file)]) == 0
    plan = capsys.readouterr().out
    assert "✓ shapes/t/teacher" in plan                     # the search's teacher is reused, not retrained
    assert main(["report", str(tmp_path / "out")]) == 0
    assert "## Search " in capsys.readouterr().out


def _refused(write_suite, capsys, text: str, command: str, message: str) -> None:
    """The suite ``text`` is refused by ``command`` (exit 2) with ``message``."""
    assert main([command, str(write_suite(text))]) == 2
    assert message in capsys.readouterr().err


def test_a_search_space_names_parameters_of_its_method(write_suite, tmp_path, capsys):
    text = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out")
    for space, message in (("alpah: {uniform: [0.1, 0.2]}", "'alpah' is not a parameter of fgd"),
                           ("temp: {uniform: [-1, 0.5]}", "temp must be greater than 0"),
                           ("temp: {uniform: [0.5, 0.1]}", "low must be below high")):
        _refused(write_suite, capsys, text + f"search:\n  method: fgd\n  space:\n    {space}\n", "tune", message)


def test_a_search_trains_a_multi_worker_model_on_its_workers(tmp_path, capsys):
    """A student whose model asks for two workers: each configuration of the search trains
    data-parallel on two Ray Train workers (as in ``run``), its rows carry the search's id
    and two workers, and the best configuration is written."""
    text = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out")
    text = text.replace("students:\n  s:\n", "students:\n  s:\n    resources: {workers: 2}\n") \
               .replace("batch_size: 4", "batch_size: 2")
    path = tmp_path / "suite.yaml"
    path.write_text(text + "search:\n  method: fgd\n  space:\n    temp: {uniform: [0.3, 1.0]}\n"
                           "  searcher: random\n  scheduler: none\n  budget: 2\n  concurrency: 2\n"
                           "  seeds: [0]\n  final_seeds: [1]\n")
    assert main(["tune", str(path), "--num-cpus", "2"]) == 0
    capsys.readouterr()
    df = results.read_results(tmp_path / "out", current_only=False)
    search = df[(df["search_id"] != "") & df["primary"]]
    assert len(search) == 2 and set(search["status"]) == {"ok"}, search[["status", "error"]].to_string()
    assert set(search["workers"]) == {2}
    assert set(df[df["role"] == "teacher"]["workers"]) == {1}
    assert len(list((tmp_path / "out" / "searches").rglob("best-*.yaml"))) == 1


def test_the_student_alone_is_searched_beside_a_distiller_with_the_same_budget(tmp_path, capsys):
    """``method: [none, fgd]``: the student alone (schedule keys only) and FGD (schedule keys
    and its own parameters) each get the same budget and searcher; one suite per pair
    re-evaluates both bests on fresh seeds, and its report marks the comparison
    tuned-vs-tuned."""
    text = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out")
    path = tmp_path / "suite.yaml"
    path.write_text(text + "search:\n  method: [none, fgd]\n  space:\n    schedule.lr: {choice: [0.01, 0.02]}\n"
                           "    temp: {uniform: [0.3, 1.0]}\n  start_from:\n    - {schedule.lr: 0.02, temp: 0.5}\n"
                           "    - {schedule.lr: 0.01, temp: 0.9}\n"
                           "  searcher: random\n  scheduler: none\n  budget: 2\n"
                           "  seeds: [0]\n  final_seeds: [5, 6]\n")
    assert main(["tune", str(path), "--num-cpus", "2"]) == 0
    out = capsys.readouterr().out
    df = results.read_results(tmp_path / "out", current_only=False)
    search = df[(df["search_id"] != "") & df["primary"]]
    per_method = search.groupby("method")["trial_id"].nunique()
    assert per_method.to_dict() == {"fgd": 2, "none": 2}, search[["method", "params", "status"]]
    assert set(search[search["method"] == "none"]["params"]) == {"{}"}          # the student alone: schedule only
    assert "none on shapes/s: 2 configuration(s)" in out and "fgd on shapes/t->s: 2 configuration(s)" in out
    best_file = tmp_path / "out" / "searches" / search["search_id"].iloc[0] / "best-shapes-t-s.yaml"
    assert f"python -m harness run {best_file}" in out
    best = yaml.safe_load(best_file.read_text())
    sid = search["search_id"].iloc[0]
    assert best["tuned"] == {"none": sid, "fgd-best": sid} and best["seeds"] == [5, 6]
    assert set(best["methods"]) == {"fgd-best"} and set(best["methods"]["fgd-best"]["params"]) == {"temp"}
    assert best["students"]["s"]["schedule"]["lr"] in (0.01, 0.02)                # the student alone's best
    assert best["methods"]["fgd-best"]["schedule"]["lr"] in (0.01, 0.02)           # FGD's own best
    assert main(["run", str(best_file), "--num-cpus", "2"]) == 0
    report = capsys.readouterr().out
    assert "## Tuned configurations" in report
    assert "| {} schedule lr 0.01 | ok | 1 |" in report and "| {} schedule lr 0.02 | ok | 1 |" in report
    assert f"fgd-best on shapes (t -> s): tuned-vs-tuned: the method tuned (search {sid}), against a tuned " \
           f"student alone (search {sid})" in report
    rows = results.read_results(tmp_path / "out")
    alone = rows[(rows["method"] == "none") & (rows["search_id"] == "")]
    assert set(alone["seed"]) == {5, 6}


def test_a_search_of_several_methods_is_checked(write_suite, tmp_path, capsys):
    text = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out")
    for methods, message in (("[none, fgd]", "nothing to search for 'none': give schedule keys"),
                             ("[fgd, fgd]", "give each label once")):
        space = "space:\n    temp: {uniform: [0.3, 1.0]}\n"
        _refused(write_suite, capsys, text + f"search:\n  method: {methods}\n  {space}", "tune", message)
    _refused(write_suite, capsys, text + "tuned: {fdg: abc}\n", "plan",
             "tuned: 'fdg' is not a method label of the suite; valid: none, fgd")


# The student alone, searched over its learning rate on synthetic classes a colour tells
# apart: a rate of 0.1 learns them within the first evaluation's 100 iterations (0.75 top-1
# here), 1e-5 leaves the random initialisation (0.125); ASHA compares them there.
PRUNE_SUITE = """
name: prune
pretrained: false
datasets:
  shapes-cls: {{format: imagenet, root: {root}, synth: {{train_images: 8, val_images: 4, image_size: 32, seed: 0}}}}
teachers:
  r18: {{arch: resnet18}}
students:
  r18s: {{arch: resnet18}}
pairs: [[r18, r18s]]
methods: [none, hinton_kd]      # (only the student alone is searched: no teacher is trained)
seeds: [0]
schedule: {{iters: 200, val_interval: 100, batch_size: 8, lr: 0.05, warmup_iters: 0, img_scale: [32, 32]}}
resources: {{cpu: 1, gpu: 0}}
output: {output}
search:
  method: none
  space:
    schedule.lr: {{loguniform: [1.0e-5, 1.0e-1]}}
  start_from:
    - {{schedule.lr: 1.0e-1}}
    - {{schedule.lr: 1.0e-5}}
  budget: 2
  concurrency: 1
  seeds: [0]
  final_seeds: [1]
"""


def test_asha_stops_a_configuration_behind_at_its_first_evaluation(tmp_path, capsys):
    """ASHA (grace period 1, reduction factor 2) cuts the configuration whose first
    evaluation is behind the one before it: its rows say pruned and why, the other
    finishes with both evaluations and is the best written."""
    path = tmp_path / "suite.yaml"
    path.write_text(PRUNE_SUITE.format(root=tmp_path / "data", output=tmp_path / "out"))
    assert main(["tune", str(path), "--num-cpus", "1"]) == 0
    out = capsys.readouterr().out
    df = results.read_results(tmp_path / "out", current_only=False)
    search = df[df["search_id"] != ""].drop_duplicates("trial_id")
    lr = {json.loads(row.schedule)["lr"]: row for row in search.itertuples()}
    shown = search[["schedule", "status", "value", "curve", "error"]].to_string()
    assert set(lr) == {0.1, 1e-5}, shown
    assert lr[1e-5].status == "pruned" and "stopped by ASHA after 1 evaluation(s)" in lr[1e-5].error, shown
    assert lr[0.1].status == "ok" and len(json.loads(lr[0.1].curve)) == 2, shown
    assert "1 stopped early; best {'schedule.lr': 0.1}" in out
    assert not (df["role"] == "teacher").any()
    best = yaml.safe_load(next((tmp_path / "out" / "searches").rglob("best-*.yaml")).read_text())
    assert best["students"]["r18s"]["schedule"]["lr"] == 0.1
