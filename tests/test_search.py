"""`harness tune`: a tiny search over FGD's alpha and temp on synthetic detection data,
through Ray Tune with Optuna and ASHA; every configuration's rows reach the store with
the search's id, the teacher is trained once, and the best configuration is written as
a suite file that `plan` accepts."""
from __future__ import annotations

import yaml

from harness import results
from harness.cli import main

from .conftest import TINY_SUITE


def test_a_tiny_fgd_search_writes_rows_and_a_runnable_best_suite(tmp_path, capsys):
    text = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out")
    text = text.replace("epochs: 1, val_interval: 1", "epochs: 3, val_interval: 1")
    text += ("search:\n  method: fgd\n  space:\n    alpha: {loguniform: [1.0e-5, 1.0e-2]}\n"
             "    temp: {uniform: [0.3, 1.0]}\n  budget: 3\n  concurrency: 1\n  seeds: [0]\n  final_seeds: [7, 8, 9]\n")
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    assert main(["tune", str(path), "--num-cpus", "1"]) == 0
    out = capsys.readouterr().out
    df = results.read_results(tmp_path / "out", current_only=False)
    search = df[df["search_id"] != ""]
    assert search["search_id"].nunique() == 1 and search["params"].nunique() == 3
    assert set(search["status"]) <= {"ok", "pruned"}
    alphas = {yaml.safe_load(p)["alpha"] for p in search["params"]}
    assert all(1e-5 <= a <= 1e-2 for a in alphas)
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


def test_a_search_space_names_parameters_of_its_method(write_suite, tmp_path, capsys):
    text = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out")
    path = write_suite(text + "search:\n  method: fgd\n  space:\n    alpah: {uniform: [0.1, 0.2]}\n")
    assert main(["tune", str(path)]) == 2
    assert "'alpah' is not a parameter of fgd" in capsys.readouterr().err
    path = write_suite(text + "search:\n  method: fgd\n  space:\n    temp: {uniform: [-1, 0.5]}\n")
    assert main(["tune", str(path)]) == 2
    assert "temp must be greater than 0" in capsys.readouterr().err
    path = write_suite(text + "search:\n  method: fgd\n  space:\n    temp: {uniform: [0.5, 0.1]}\n")
    assert main(["tune", str(path)]) == 2
    assert "low must be below high" in capsys.readouterr().err
