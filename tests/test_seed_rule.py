"""Seeds until precise: ``seeds: {first, max, until: {gain_ci_half_width}}`` runs each
cell on ``first`` seeds, then adds seeds (the method and the student alone, paired) to
the cells whose gain's interval is wider than the target, up to ``max``; the report
shows each cell's seed count and why it stopped."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from harness.cli import main
from harness.run.seeds import _projected

from .conftest import TINY_SUITE


def test_the_projection_is_the_smallest_count_that_meets_the_target():
    # 3 seeds, an interval of +-1.0: sd = 1.0 * sqrt(3) / t(0.975, 2)
    want = _projected(3, 1.0, 0.5, 50)
    from scipy import stats
    sd = math.sqrt(3) / stats.t.ppf(0.975, 2)
    assert stats.t.ppf(0.975, want - 1) * sd / math.sqrt(want) <= 0.5
    assert stats.t.ppf(0.975, want - 2) * sd / math.sqrt(want - 1) > 0.5
    assert _projected(3, 1.0, 0.5, 4) == 4                    # never past max
    assert _projected(1, float("nan"), 0.5, 10) == 2          # no interval yet: one more


def test_through_ray_a_cell_already_precise_gets_no_more_seeds(write_suite, tmp_path, capsys):
    """The tiny suite's one-epoch detectors score 0 whatever the seed: the gain's
    interval is 0 wide after the first round, and the report says why it stopped."""
    text = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out").replace(
        "seeds: [0]", "seeds: {first: 2, max: 3, until: {gain_ci_half_width: 0.5}}")
    path = write_suite(text)
    assert main(["run", str(path), "--num-cpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "round 2" not in out
    assert "## Seeds until precise (first 2, max 3, until the gain's interval is within +-0.5)" in out
    assert "fgd on shapes (t -> s): 2 seeds; precise: the gain's interval is +-0.00, within +-0.5" in out


NOISY = [0.0, 4.0, -3.0, 2.0, -1.0, 3.0]             # fgd's gain wanders; feature_mse's is a steady +1


def _made_up_results(monkeypatch) -> None:
    """Every trial's result made up (no training), its rows written as the driver writes
    them (with its dataset check's warnings): fgd's gain wanders, feature_mse's is +1."""
    import json

    from harness.run import matrix
    from harness.run.rows import TrialResult
    from harness.run.session import with_data_warnings
    from harness.run.trial import result_rows
    from harness.store import results

    def fake_run_suite(suite, **kwargs):
        if kwargs.get("prepare"):
            kwargs["prepare"]()
        done = results.finished_trials(suite.output)
        for spec in suite.trials:
            if spec.trial_id in done:
                continue
            value = 0.5 if spec.role == "teacher" else 0.2 + (
                {"none": 0.0, "fgd": NOISY[spec.seed] / 100, "feature_mse": 0.01}[spec.method])
            rows = result_rows(spec, TrialResult(metrics={"bbox_mAP": value}, epoch=1), "", 1.0, status="ok")
            results.write_trial_rows(suite.output, spec.trial_id, with_data_warnings(suite, rows))
        (suite.output / "suite.json").write_text(json.dumps({"suite": suite.doc, "trials": [
            t.to_dict() for t in suite.trials], "trial_ids": [t.trial_id for t in suite.trials]}, default=str))
        results.consolidate(suite.output)
        return {"trials": [{"trial": t.name, "trial_id": t.trial_id, "error": ""} for t in suite.trials],
                "skipped": 0, "results": str(suite.output / "results.parquet")}
    monkeypatch.setattr(matrix, "run_suite", fake_run_suite)


def _rule_suite(write_suite, tmp_path) -> "object":
    text = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out").replace(
        "seeds: [0]", "seeds: {first: 3, max: 6, until: {gain_ci_half_width: 0.8}}").replace(
        "methods: [none, fgd]", "methods: [none, fgd, feature_mse]")
    return write_suite(text)


def test_rounds_add_paired_seeds_until_precise_or_max(write_suite, tmp_path, capsys, monkeypatch):
    """The rounds themselves, with every trial's result made up (no training): a wide
    gain gets seeds up to max, a narrow one stops when precise; each round adds seeds to
    the method and the student alone alike."""
    path = _rule_suite(write_suite, tmp_path)
    _made_up_results(monkeypatch)
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "seeds until precise, round 2: fgd on shapes (t -> s): 3 -> " in out
    rows = pd.read_parquet(tmp_path / "out" / "results.parquet")
    seeds = rows[rows["role"] == "student"].groupby("method")["seed"].apply(lambda s: sorted(set(s)))
    assert seeds["fgd"] == list(range(6)) and seeds["none"] == list(range(6))     # paired, up to max
    assert seeds["feature_mse"] == [0, 1, 2]                                       # precise at once
    assert "fgd on shapes (t -> s): 6 seeds; max seeds (6) reached" in out
    assert "feature_mse on shapes (t -> s): 3 seeds; precise" in out


def test_every_round_s_rows_keep_the_data_check_s_warnings(write_suite, tmp_path, capsys, monkeypatch):
    """The dataset's check runs once, before round 1; the rows of the later rounds record
    its warnings too (a reloaded suite used to carry none: their rows said '[]')."""
    from harness.run import preflight
    warning = '[{"kind": "tiny_boxes", "file": "x.json", "entry": "annotations", "what": "made up", "count": 2}]'
    checked = []

    def check_data(suite, show=False):
        checked.append(suite.name)
        for ds in suite.datasets():
            suite.data_checks[ds["name"]] = {"summary": "1 warning", "warnings": warning, "errors": 0}
    monkeypatch.setattr(preflight, "check_data", check_data)
    monkeypatch.setattr(preflight, "preflight", lambda suite: {})
    monkeypatch.setattr(preflight, "check_pretrained", lambda suite, nets: None)
    _made_up_results(monkeypatch)
    assert main(["run", str(_rule_suite(write_suite, tmp_path))]) == 0
    assert "round 2" in capsys.readouterr().out and len(checked) == 1
    rows = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert rows["seed"].max() == 5                       # rounds after the first ran
    assert set(rows["data_warnings"]) == {warning}, rows.groupby("seed")["data_warnings"].first()


@pytest.mark.parametrize("rule,key", [("{first: 1, max: 3, until: {gain_ci_half_width: 1}}", "first"),
                                      ("{first: 4, max: 3, until: {gain_ci_half_width: 1}}", "max"),
                                      ("{first: 2, max: 3, until: {gain_ci_half_width: -1}}", "gain_ci_half_width"),
                                      ("{first: 2, max: 3, until: {p_value: 0.05}}", "p_value")])
def test_a_bad_rule_is_refused(write_suite, tmp_path, capsys, rule, key):
    path = write_suite(TINY_SUITE.format(root=tmp_path / "d", output=tmp_path / "o").replace("seeds: [0]",
                                                                                             f"seeds: {rule}"))
    assert main(["plan", str(path)]) == 2
    assert key in capsys.readouterr().err
