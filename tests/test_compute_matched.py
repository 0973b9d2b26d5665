"""Compute-matched baselines (``baselines: {compute_matched: true}``): per distilled trial,
the student alone on the same seed trained on a stretched schedule (same shape, more
iterations) until its device-hours come within the tolerance of the distilled trial's;
the report gives each gain at equal schedule and at equal compute, and its plot shows
both baselines."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from harness.cli import main
from harness.run.matched import _next_iters, stretched

from .conftest import TINY_SUITE


def test_a_stretched_schedule_keeps_its_shape():
    epochs = {"epochs": 12, "iters": None, "val_interval": 2, "checkpoint_interval": None, "warmup_iters": 100,
              "policy": "step", "lr": 0.01}
    out = stretched(epochs, 450)
    assert out["iters"] == 450 and out["val_interval"] == 75          # six evaluations, as before, the last at the end
    assert {k: out[k] for k in ("warmup_iters", "policy", "lr")} == {"warmup_iters": 100, "policy": "step", "lr": 0.01}
    from harness.run.trial import _loop_cfgs
    train_cfg, sched = _loop_cfgs(out)
    assert train_cfg == {"type": "IterBasedTrainLoop", "max_iters": 450, "val_interval": 75}
    assert sched[-1]["milestones"] == [300, 412] and sched[-1]["by_epoch"] is False   # at 2/3 and 11/12, as before
    iters = stretched({"epochs": 12, "iters": 1000, "val_interval": 1000, "checkpoint_interval": 250}, 1301)
    assert (iters["iters"], iters["val_interval"], iters["checkpoint_interval"]) == (1301, 1301, 326)


def test_the_length_is_fitted_to_what_was_measured():
    # a Newton step along the closest trial's own cost of an iteration
    assert _next_iters([(100, 1.5, 0.01)], 2.5) == 200
    assert _next_iters([(100, 1.5, 0.01), (200, 2.7, 0.01)], 2.5) == 183    # between two on either side
    assert _next_iters([(100, 1.5, 0.01), (200, 2.0, 0.01)], 2.5) == 250    # both short: from the latest
    assert _next_iters([(200, 2.0, 0.01), (100, 1.5, 0.01)], 2.5) == 200    # (the order they ran in)
    assert _next_iters([(100, 1.0, float("nan"))], 1.5) == 150              # cost unknown: proportional
    assert _next_iters([(100, 1.0, 1e-6)], 50.0) == 400                     # at most 4x in one step
    assert _next_iters([(2, 1.0, 0.1)], 0.1) == 1                           # never below one iteration


def _fake_run(hours_of, value_of, failing=(), ips_of=lambda spec, iters: float("nan")):
    """A run_suite that trains nothing: each pending trial's rows made up from its spec."""
    from harness.run.rows import TrialResult
    from harness.run.trial import result_rows
    from harness.store import results

    def run_suite(suite, only=None, **kwargs):
        if kwargs.get("prepare"):
            kwargs["prepare"]()
        done = results.finished_trials(suite.output)
        ran = []
        for spec in suite.trials:
            if spec.trial_id in done or (only is not None and spec.trial_id not in only):
                continue
            iters = spec.schedule.get("iters") or 4 * spec.schedule["epochs"]      # 4 iterations an epoch
            failed = spec.name in failing
            if failed:
                rows = result_rows(spec, None, "boom", 1.0, status="error")
            else:
                rows = result_rows(spec, TrialResult(metrics={"bbox_mAP": value_of(spec, iters)}, epoch=1,
                                                     train_iters=iters, train_images_per_s=ips_of(spec, iters)),
                                   "", hours_of(spec, iters) * 3600, status="ok")
            results.write_trial_rows(suite.output, spec.trial_id, rows)
            ran.append({"trial": spec.name, "trial_id": spec.trial_id, "error": "boom" if failed else ""})
        (suite.output / "suite.json").write_text(json.dumps({"suite": suite.doc, "trials": [
            t.to_dict() for t in suite.trials], "trial_ids": [t.trial_id for t in suite.trials]}, default=str))
        results.consolidate(suite.output)
        return {"trials": ran, "skipped": 0, "results": str(suite.output / "results.parquet")}
    return run_suite


def _suite(write_suite, tmp_path, baselines="{compute_matched: true}", seeds="[0, 1, 2]"):
    text = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out").replace(
        "seeds: [0]", f"seeds: {seeds}\nbaselines: {baselines}").replace("epochs: 1,", "epochs: 3,")
    return write_suite(text)


def test_rounds_stretch_the_student_alone_until_its_hours_match(write_suite, tmp_path, capsys, monkeypatch):
    """Device-hours made up as 0.02 + 0.0013 x iterations (x 1.6 with the teacher's forward,
    times a seed's own jitter), of which training throughput accounts for 0.001 an
    iteration (the rest, evaluation, it does not see): the first attempt (a Newton step
    along 0.001) overshoots to 33 iterations, 10.4% over; the second, on the line between
    the two, lands within 10% at 28. The student alone improves with iterations, so the gain at equal
    compute is smaller than at equal schedule, and the report shows both."""
    from harness.run import matrix
    jitter = {0: 1.0, 1: 1.05, 2: 0.97}

    def hours(spec, iters):
        return (0.02 + 0.0013 * iters) * (1.6 if spec.method != "none" else 1.0) * jitter[spec.seed]

    def ips(spec, iters):                     # batches of 4, one CPU: 0.001 device-hours an iteration
        return 4 / (3600 * 0.001 * jitter[spec.seed])

    def value(spec, iters):
        return 0.20 + 0.0005 * iters + (0.01 + 0.001 * spec.seed if spec.method == "fgd" else 0.0)
    monkeypatch.setattr(matrix, "run_suite", _fake_run(hours, value, ips_of=ips))
    path = _suite(write_suite, tmp_path)
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "compute-matched baselines, round 1: 3 stretched student-alone trial(s)" in out
    assert "(e.g. shapes/s/none@compute-of-t.fgd/s0: 33 iterations" in out
    assert "compute-matched baselines, round 2: 3 stretched" in out and "round 3" not in out
    df = pd.read_parquet(tmp_path / "out" / "results.parquet")
    m = df[(df["matched_to"] == "t/fgd") & df["primary"]]
    assert len(m) == 6 and set(m["method"]) == {"none"}
    for seed, part in m.groupby("seed"):
        assert sorted(part["train_iters"]) == [28, 33]
        last = part[part["train_iters"] == 28].iloc[0]
        assert abs(last["device_hours"] / last["matched_target_hours"] - 1) <= 0.1, part
        fgd = df[(df["method"] == "fgd") & (df["seed"] == seed) & df["primary"]].iloc[0]
        assert last["matched_target_hours"] == pytest.approx(fgd["device_hours"])
    # the leaderboard's own baseline is still the student alone on the suite's schedule
    board_line = next(line for line in out.splitlines() if line.startswith("| fgd |"))
    assert "| +1.10 |" in board_line                    # (0.01 + 0.001 x mean seed) x 100
    section = out[out.index("## Gain at equal schedule and at equal compute"):]
    row = next(line for line in section.splitlines() if line.startswith("| fgd (shapes: t -> s)"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1].startswith("+1.10") and cells[2] == "0.003"        # distinguishable at equal schedule
    # at equal compute the student alone trains 28 iterations, not 12: 16 x 0.05 points better
    assert cells[3] == r"+0.30 \[+0.05, +0.55\]" and cells[5] == "yes"
    assert cells[6] == "12 -> 28" and cells[7] == "0.99 to 0.99"
    assert "no baseline within" not in section.split("## ")[0]
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Gain at equal schedule and at equal compute" in html and "none at fgd" in html.split("Metric against device-hours")[1]
    # a second run finds every attempt in the store: nothing runs again, nothing is lost
    assert main(["run", str(path)]) == 0
    again = capsys.readouterr().out
    assert "compute-matched baselines, round" not in again
    assert json.loads((tmp_path / "out" / "suite.json").read_text())["trial_ids"].__len__() == 1 + 3 + 3 + 6


def test_what_cannot_be_matched_is_said_not_averaged_in(write_suite, tmp_path, capsys, monkeypatch):
    """A distiller cheaper than any length can reach (a fixed cost above its hours) ends
    at the closest length; the report names the seeds outside the tolerance.
    A failed attempt stops its seed, and its trial shows among the failures."""
    from harness.run import matrix
    monkeypatch.setattr(matrix, "run_suite", _fake_run(
        lambda spec, iters: 0.5 + 0.001 * iters if spec.method == "none" else 0.1,
        lambda spec, iters: 0.2, failing=("shapes/s/none@compute-of-t.fgd/s1",)))
    path = _suite(write_suite, tmp_path, baselines="{compute_matched: true, attempts: 2}")
    assert main(["run", str(path)]) == 1                              # a trial failed
    out = capsys.readouterr().out
    section = out[out.index("## Gain at equal schedule and at equal compute"):]
    assert r"seed(s) \[0, 1, 2\] have no baseline within 10% of their device-hours" in section
    assert "shapes/s/none@compute-of-t.fgd/s1" in out.split("trial(s) without a result")[1]
    # (no throughput: proportional steps) 12 iterations, then 3 (at most 4x shorter in one
    # step), then 1: as short as it gets, and attempts: 2 is spent anyway
    assert "round 2: 2 stretched" in out and "round 3" not in out


def test_the_tolerance_and_attempts_are_checked(write_suite, tmp_path, capsys):
    from harness.suite.load import load_suite
    from harness.suite.yamlio import SuiteError
    with pytest.raises(SuiteError, match=r"baselines.tolerance.*less than or equal to 0.5"):
        load_suite(_suite(write_suite, tmp_path, baselines="{compute_matched: true, tolerance: 2}"))
    with pytest.raises(SuiteError, match=r"unknown key 'compute_match' in baselines \(did you mean 'compute_matched'\?\)"):
        load_suite(_suite(write_suite, tmp_path, baselines="{compute_match: true}"))
    suite = load_suite(_suite(write_suite, tmp_path))
    assert suite.doc["baselines"] == {"compute_matched": True, "tolerance": 0.1, "attempts": 3}
    assert main(["plan", suite.file]) == 0          # what will be measured is shown before anything runs
    assert ("then compute-matched baselines: per distilled trial, up to 3 stretched student-alone trial(s) "
            "until within 10% of its device-hours") in capsys.readouterr().out


def test_through_ray_the_stretched_trial_trains_its_iterations(write_suite, tmp_path, capsys, monkeypatch):
    """The real path (Ray Tune, the Runner): a stretched student-alone trial trains the
    planned iterations, iteration-based, evaluating as often as its epochs did, and its
    rows say what it matches. (The length is fixed here: measured hours on a shared
    2-core machine would make it vary.)"""
    from harness.run import matched
    monkeypatch.setattr(matched, "_next_iters", lambda points, target: 5)
    path = _suite(write_suite, tmp_path, baselines="{compute_matched: true, attempts: 1, tolerance: 0.01}",
                  seeds="[0]")
    path.write_text(path.read_text().replace("epochs: 3,", "epochs: 2,"))
    assert main(["run", str(path), "--num-cpus", "2"]) == 0
    out = capsys.readouterr().out
    df = pd.read_parquet(tmp_path / "out" / "results.parquet")
    m = df[(df["matched_to"] == "t/fgd") & df["primary"]]
    if m.empty:       # the plain student alone came within 1% of the distilled trial's hours by chance
        pytest.skip("no stretched trial was needed")
    row = m.iloc[0]
    assert row["status"] == "ok" and row["train_iters"] == 5 and row["trial_name"].endswith("none@compute-of-t.fgd/s0")
    assert [e for e, _ in json.loads(row["curve"])] == [3, 5]        # two evaluations, as its two epochs had
    plain = df[(df["method"] == "none") & (df["matched_to"] == "") & df["primary"]].iloc[0]
    assert plain["train_iters"] == 4                                 # 8 images, batches of 4, two epochs
    assert "## Gain at equal schedule and at equal compute" in out
