"""The results store's schema, atomic writes, resume bookkeeping and the report."""
from __future__ import annotations

import math

import pandas as pd
import pyarrow.parquet as pq
import pytest

from harness import results
from harness.report import format_report, leaderboard


def _row(**kw):
    base = dict(schema_version=1, suite="s", trial_id="t", trial_name="n", task="det", dataset="d",
                role="student", teacher="T", student="S", method="fgd", method_name="fgd", params="{}",
                seed=0, metric="bbox_mAP", value=0.3, higher_is_better=True, primary=True, epoch=1,
                status="ok", error="", wall_time_s=10.0, train_images_per_s=5.0, device="cpu",
                code_version="0", config_hash="h", timestamp="now")
    base.update(kw)
    return base


def test_every_column_is_documented_and_typed():
    assert list(results.SCHEMA.names) == list(results.COLUMNS)
    assert all(doc for _, doc in results.COLUMNS.values())


def test_rows_must_match_schema():
    with pytest.raises(ValueError, match="missing"):
        results.to_table([{"suite": "x"}])
    with pytest.raises(ValueError, match="extra"):
        results.to_table([_row(bogus=1)])


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    path = results.write_trial_rows(tmp_path, "abc", [_row(trial_id="abc")])
    assert path == tmp_path / "rows" / "abc.parquet"
    assert [p.name for p in (tmp_path / "rows").iterdir()] == ["abc.parquet"]
    assert pq.read_table(path).schema.equals(results.SCHEMA)


def test_finished_trials_skips_errors(tmp_path):
    results.write_trial_rows(tmp_path, "ok1", [_row(trial_id="ok1")])
    results.write_trial_rows(tmp_path, "bad", [_row(trial_id="bad", status="error", value=math.nan)])
    assert results.finished_trials(tmp_path) == {"ok1"}


def test_consolidate_and_read(tmp_path):
    results.write_trial_rows(tmp_path, "a", [_row(trial_id="a")])
    results.write_trial_rows(tmp_path, "b", [_row(trial_id="b", seed=1)])
    out = results.consolidate(tmp_path)
    assert len(pd.read_parquet(out)) == 2
    assert len(results.read_results(tmp_path)) == 2
    assert len(results.read_results(out)) == 2


def test_read_results_explains_an_empty_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="run a suite first"):
        results.read_results(tmp_path)


def _store():
    rows = [
        _row(trial_id="t0", role="teacher", teacher="T", student="", method="teacher", value=0.50),
        _row(trial_id="n0", teacher="", method="none", seed=0, value=0.30),
        _row(trial_id="n1", teacher="", method="none", seed=1, value=0.32),
        _row(trial_id="f0", method="fgd", seed=0, value=0.40),
        _row(trial_id="f1", method="fgd", seed=1, value=0.42),
        _row(trial_id="f0", method="fgd", seed=0, metric="bbox_mAP_50", primary=False, value=0.9),
        _row(trial_id="x", method="gid", status="error", error="RuntimeError: boom", value=math.nan,
             metric="", primary=False, trial_name="d/T->S/gid/s0"),
    ]
    return pd.DataFrame(rows)


def test_leaderboard_gain_gap_and_spread():
    board = leaderboard(_store()).set_index("method")
    assert board.loc["teacher", "mean"] == pytest.approx(50.0)
    assert board.loc["none", "mean"] == pytest.approx(31.0)
    assert board.loc["fgd", "mean"] == pytest.approx(41.0)
    assert board.loc["fgd", "std"] == pytest.approx(math.sqrt(2.0))    # sample std of 40, 42
    assert board.loc["fgd", "gain"] == pytest.approx(10.0)
    assert board.loc["fgd", "gap_closed"] == pytest.approx(10.0 / 19.0)
    assert board.loc["fgd", "n"] == 2


def test_leaderboard_respects_lower_is_better():
    df = _store()
    df["higher_is_better"] = False
    board = leaderboard(df).set_index("method")
    assert board.loc["fgd", "gain"] == pytest.approx(-10.0)


def test_report_text_lists_methods_and_errors():
    text = format_report(_store())
    assert "teacher T -> student S" in text
    assert "student alone" in text and "fgd" in text and "+10.00" in text
    assert "1 trial(s) without a result" in text and "RuntimeError: boom" in text


def test_paired_gain_interval_matches_scipy_on_fixed_numbers():
    """The gain's 95% interval is Student's t on the per-seed differences (seeds both ran)."""
    import math

    import pandas as pd
    from scipy import stats

    from harness.report import paired_gain
    method = pd.Series({0: 40.0, 1: 42.0, 2: 41.0})
    alone = pd.Series({0: 38.0, 1: 39.0, 2: 40.0, 3: 50.0})          # seed 3 has no pair: left out
    mean, lo, hi, n = paired_gain(method, alone)
    diff = [2.0, 3.0, 1.0]
    want = stats.t.interval(0.95, 2, loc=2.0, scale=stats.sem(diff))
    assert (mean, n) == (2.0, 3) and (lo, hi) == pytest.approx(want)
    assert lo == pytest.approx(2.0 - 4.302652729911275 * (1 / math.sqrt(3)))
    lower = paired_gain(method, alone, higher_is_better=False)        # a lower-is-better metric flips the sign
    assert lower[0] == -2.0 and lower[1] == pytest.approx(-want[1])
    assert math.isnan(paired_gain(method[:1], alone)[1])              # one pair: no interval


def test_a_store_with_only_failed_trials_reports_them():
    """A run whose teacher failed has only error rows: the report says so (it used to end
    in a KeyError, printed as 'error: task')."""
    df = pd.DataFrame([_row(trial_id="t", role="teacher", method="teacher", status="error", metric="",
                            value=math.nan, primary=False, error="RuntimeError: teacher broke")])
    text = format_report(df)
    assert text.startswith("no successful trials yet")
    assert "1 trial(s) without a result" in text and "teacher broke" in text
