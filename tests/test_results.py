"""The results store's schema, atomic writes, resume bookkeeping and the report."""
from __future__ import annotations

import json
import math

import pandas as pd
import pyarrow.parquet as pq
import pytest

from harness.store import results
from harness.store.report import format_report, leaderboard


def _row(**kw):
    base = dict(schema_version=6, suite="s", trial_id="t", trial_name="n", task="det", dataset="d",
                role="student", teacher="T", student="S", method="fgd", method_name="fgd", params="{}",
                seed=0, metric="bbox_mAP", value=0.3, higher_is_better=True, primary=True, epoch=1,
                status="ok", error="", wall_time_s=10.0, train_images_per_s=5.0, device="cpu",
                code_version="0", config_hash="h", timestamp="now",
                versions="{}", dataset_fingerprint="d", schedule_hash="sh", teacher_sha256="ts",
                teacher_weights_hash="tw", device_count=0, started_at="t0", ended_at="t1", device_hours=0.01,
                peak_memory_mb=100.0, train_images_per_s_no_teacher=6.0, teacher_time_share=0.2,
                best_value=0.3, best_epoch=1, curve="[[1, 0.3]]", search_id="",
                node="n1", node_ip="127.0.0.1", accelerator_ids="[]", workers=1, resumed_from=0, attempts=1,
                data_warnings="[]", train_iters=4, matched_to="", matched_target_hours=float("nan"),
                schedule='{"epochs": 1, "lr": 0.01}')
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

    from harness.store.report import paired_gain
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
    assert "no successful trials yet" in text
    assert "1 trial(s) without a result" in text and "teacher broke" in text


# ------------------------------------------------------------------ statistics, schema v2
def test_mean_interval_and_paired_p_value_match_scipy_on_fixed_numbers():
    from scipy import stats

    from harness.store.report import mean_interval, paired_p_value
    method = pd.Series([41.0, 43.5, 40.2, 44.1], index=[0, 1, 2, 3])
    alone = pd.Series([39.0, 41.0, 40.0, 41.5, 38.0], index=[0, 1, 2, 3, 4])    # seed 4: no pair
    lo, hi = mean_interval(method)
    ref = stats.t.interval(0.95, 3, loc=method.mean(), scale=stats.sem(method))
    assert (lo, hi) == pytest.approx(ref)
    assert paired_p_value(method, alone) == pytest.approx(stats.ttest_rel(method, alone[:4]).pvalue)
    # scipy's value for these numbers, pinned: a silent change of the test or its pairing shows here
    assert paired_p_value(method, alone) == pytest.approx(0.04662, abs=1e-5)


def _seeded_store(n: int, teacher_value: float = 0.50):
    rows = [_row(trial_id="t0", role="teacher", teacher="T", student="", method="teacher", value=teacher_value)]
    for s in range(n):
        rows.append(_row(trial_id=f"n{s}", teacher="", method="none", seed=s, value=0.30 + 0.01 * s))
        rows.append(_row(trial_id=f"f{s}", method="fgd", seed=s, value=0.40 + 0.012 * s))
    return pd.DataFrame(rows)


def test_distinguishable_needs_three_seeds_and_a_small_p():
    board = leaderboard(_seeded_store(2)).set_index("method")
    assert board.loc["fgd", "distinguishable"] == "n<3"
    board = leaderboard(_seeded_store(4)).set_index("method")
    assert board.loc["fgd", "distinguishable"] == "yes" and board.loc["fgd", "p_value"] < 0.05


def test_gap_closed_when_the_teacher_equals_the_student_is_not_a_division_by_zero():
    from harness.store.report import warnings_for
    df = _seeded_store(3, teacher_value=0.31)          # the student alone's mean is 0.31
    board = leaderboard(df).set_index("method")
    assert math.isnan(board.loc["fgd", "gap_closed"])
    assert any("is not better than student" in w for w in warnings_for(df))


def test_warnings_for_schedule_dataset_and_teacher_mismatches():
    from harness.store.report import warnings_for
    df = _seeded_store(3)
    df.loc[df["trial_id"] == "f1", "schedule_hash"] = "other"
    df.loc[df["trial_id"] == "f2", "dataset_fingerprint"] = "other"
    df.loc[df["trial_id"] == "f0", "teacher_weights_hash"] = "not-the-teachers"
    text = "\n".join(warnings_for(df))
    assert "schedule differs from its baseline" in text and "dataset differs from its baseline" in text
    assert "is not the teacher T" in text
    assert warnings_for(_seeded_store(3)) == []


def test_best_epoch_figures_on_request_and_titled():
    from harness.store.report import to_markdown
    df = _seeded_store(3)
    df.loc[df["method"] == "fgd", "best_value"] = 0.6
    assert leaderboard(df, best=True).set_index("method").loc["fgd", "mean"] == pytest.approx(60.0)
    assert "best epoch" in to_markdown(df, best=True) and "last epoch" in to_markdown(df)


def test_a_version_1_file_is_upgraded_on_read_and_a_newer_one_refused(tmp_path, capsys):
    import pyarrow as pa

    from harness.cli import main
    v1_columns = list(results.COLUMNS)[:list(results.COLUMNS).index("versions")]
    row = {k: v for k, v in _row(schema_version=1).items() if k in v1_columns}
    v1 = pa.Table.from_pylist([row], schema=pa.schema([(c, results.COLUMNS[c][0]) for c in v1_columns]))
    pq.write_table(v1, tmp_path / "v1.parquet")
    df = results.read_results(tmp_path / "v1.parquet")
    assert list(df.columns) == list(results.COLUMNS) and df["curve"].isna().all()
    assert df["value"].iloc[0] == pytest.approx(0.3)
    newer = results.to_table([_row()]).replace_schema_metadata({results.VERSION_KEY: b"99"})
    pq.write_table(newer, tmp_path / "v99.parquet")
    with pytest.raises(results.NewerSchema, match="schema v99"):
        results.read_results(tmp_path / "v99.parquet")
    assert main(["report", str(tmp_path / "v99.parquet")]) == 2
    assert "upgrade kd-harness" in capsys.readouterr().err


def test_written_files_carry_the_schema_version(tmp_path):
    path = results.write_trial_rows(tmp_path, "t", [_row()])
    assert pq.read_schema(path).metadata[results.VERSION_KEY] == str(results.SCHEMA_VERSION).encode()


def test_markdown_and_html_reports_are_written(tmp_path):
    from harness.store.html_report import write_report
    df = _seeded_store(3)
    md, page = write_report(df, tmp_path)
    text, markup = md.read_text(), page.read_text()
    assert "| fgd |" in text and "distinguishable" in text
    assert markup.count("<svg") == 3 and "<table" in markup and "http" not in markup.split("<svg")[0]


def test_duckdb_gives_the_same_means_as_pandas(tmp_path):
    """The README's DuckDB query, straight from the row files, against the leaderboard."""
    import duckdb
    df = _seeded_store(3)
    for trial_id, part in df.groupby("trial_id"):
        results.write_trial_rows(tmp_path, trial_id, part.to_dict("records"))
    sql = f"""
        SELECT method, avg(value) * 100 AS mean, count(DISTINCT seed) AS n
        FROM read_parquet('{tmp_path}/rows/*.parquet')
        WHERE status = 'ok' AND "primary" AND role = 'student'
        GROUP BY method ORDER BY method"""
    via_sql = duckdb.sql(sql).df().set_index("method")
    board = leaderboard(results.read_results(tmp_path, current_only=False)).set_index("method")
    for method in ("fgd", "none"):
        assert via_sql.loc[method, "mean"] == pytest.approx(board.loc[method, "mean"])
        assert via_sql.loc[method, "n"] == board.loc[method, "n"]


def test_a_version_2_file_is_upgraded_with_the_placement_columns_empty(tmp_path):
    import pyarrow as pa
    v2_columns = list(results.COLUMNS)[:list(results.COLUMNS).index("node")]
    row = {k: v for k, v in _row(schema_version=2).items() if k in v2_columns}
    v2 = pa.Table.from_pylist([row], schema=pa.schema([(c, results.COLUMNS[c][0]) for c in v2_columns]))
    pq.write_table(v2.replace_schema_metadata({results.VERSION_KEY: b"2"}), tmp_path / "v2.parquet")
    df = results.read_results(tmp_path / "v2.parquet")
    assert list(df.columns) == list(results.COLUMNS) and df["node"].isna().all() and df["attempts"].isna().all()
    assert df["curve"].iloc[0] == "[[1, 0.3]]"


def test_the_report_opens_with_what_it_is():
    """Suite, when it ran, harness and package versions, machines and devices, trials by
    status and device-hours: at the top of leaderboard.md and report.html."""
    from harness.store.html_report import to_html
    df = _store()
    df["versions"] = '{"torch": "2.14.1", "mmdet": "3.3.0"}'
    md = format_report(df)
    head = md.split("## ", 1)[0]
    for text in ("Suite: s", "Ran: t0 to t1 UTC", "Harness: 0", "Packages: mmdet 3.3.0, torch 2.14.1",
                 "Machines: 1 node(s) (127.0.0.1); devices: cpu x5", "Trials: 6 (5 ok, 1 error)",
                 "0.060 device-hours in all"):
        assert text in head, head
    assert "Trials: 6 (5 ok, 1 error)" in to_html(df)


def test_the_report_closes_with_one_sentence_made_from_the_board():
    rows = [_row(trial_id="t0", role="teacher", teacher="T", student="", method="teacher", value=0.50)]
    for seed, (alone, fgd, gid) in enumerate([(0.30, 0.40, 0.31), (0.32, 0.41, 0.30), (0.31, 0.42, 0.33)]):
        rows += [_row(trial_id=f"n{seed}", teacher="", method="none", seed=seed, value=alone),
                 _row(trial_id=f"f{seed}", method="fgd", seed=seed, value=fgd),
                 _row(trial_id=f"g{seed}", method="gid", seed=seed, value=gid)]
    rows.append(_row(trial_id="k0", method="gkp", seed=0, value=0.5))
    text = format_report(pd.DataFrame(rows))
    last = text.strip().splitlines()[-1]
    assert last.startswith("In one sentence: fgd on d (+10.0) beats the student alone beyond seed noise; "
                           "gid on d (+0.3) cannot be told from the student alone; gkp on d (+20.0) had too few "
                           "seeds to tell"), last


def test_bootstrap_intervals_and_olympic_scoring_as_report_options(tmp_path, capsys):
    """``report --interval bootstrap`` (lm-evaluation-harness' way) and ``--olympic``
    (MLPerf's: a cell's best and worst runs dropped) change what they say they change."""
    from harness.cli import main
    from harness.store.stats import olympic, paired_gain
    alone = pd.Series([0.30, 0.31, 0.29, 0.30, 0.32], index=range(5))
    method = pd.Series([0.40, 0.41, 0.39, 0.90, 0.40], index=range(5))     # one wild seed
    assert olympic(method).tolist() == [0.40, 0.40, 0.41]
    gain_t = paired_gain(method, alone)
    gain_o = paired_gain(method, alone, trim=True)
    gain_b = paired_gain(method, alone, how="bootstrap")
    assert gain_t[0] == pytest.approx(0.196) and gain_o[0] == pytest.approx(0.10)      # diffs .10 .10 .10 (.60, .08 dropped)
    assert gain_b[0] == gain_t[0] and (gain_b[1], gain_b[2]) != (gain_t[1], gain_t[2])
    assert gain_b[1] >= 0.08 and gain_b[2] <= 0.6                  # within the values' range, unlike t's
    rows = [_row(trial_id="t0", role="teacher", teacher="T", student="", method="teacher", value=0.95)]
    rows += [_row(trial_id=f"n{s}", teacher="", method="none", seed=s, value=v) for s, v in alone.items()]
    rows += [_row(trial_id=f"f{s}", method="fgd", seed=s, value=v) for s, v in method.items()]
    for r in rows:
        r["suite"] = "s"
    results.write_trial_rows(tmp_path, "all", rows)
    assert main(["report", str(tmp_path), "--olympic", "--interval", "bootstrap"]) == 0
    out = capsys.readouterr().out
    assert "| fgd | 40.33 |" in out and "| +10.00 |" in out
    assert "bootstrap, 10,000 resamples, percentile" in out and "olympic scoring (MLPerf)" in out


def _paired_board(teacher: float, values: list[tuple[float, float]], methods: tuple[str, ...]):
    """A teacher row, and per seed the student alone and each method at the same value."""
    rows = [_row(trial_id="t0", role="teacher", teacher="T", student="", method="teacher", value=teacher)]
    for seed, (alone, kd) in enumerate(values):
        rows += [_row(trial_id=f"n{seed}", teacher="", method="none", seed=seed, value=alone)]
        rows += [_row(trial_id=f"{m}{seed}", method=m, seed=seed, value=kd) for m in methods]
    return rows, leaderboard(pd.DataFrame(rows))


def test_the_papers_number_beside_a_cell_whose_setup_matches():
    """A cell trained in the setup of a paper's headline result (method, format, both
    configs) gets the paper's baseline -> distilled beside ours; another says no paper
    setup matches."""
    from harness.store.papers import paper_lines
    rows, board = _paired_board(0.41, [(0.370, 0.400), (0.372, 0.405), (0.368, 0.401)], ("fgd", "fgd-x"))
    ds = {"name": "d", "format": "coco"}
    teacher = {"name": "T", "config": "mmdet::retinanet/retinanet_x101-64x4d_fpn_1x_coco.py"}
    trials = [{"dataset": ds, "model": {"name": "S", "config": "mmdet::retinanet/retinanet_r50_fpn_2x_coco.py"},
               "teacher": teacher, "method": "fgd", "method_name": "fgd", "schedule": {"epochs": 24}},
              {"dataset": ds, "model": {"name": "S", "config": "mmdet::retinanet/retinanet_r50_fpn_2x_coco.py"},
               "teacher": dict(teacher, config="mmdet::retinanet/retinanet_r101_fpn_2x_coco.py"),
               "method": "fgd-x", "method_name": "fgd", "schedule": {"epochs": 12}}]
    trials[1]["teacher"]["name"] = "T"
    lines = paper_lines(board, trials)
    [fgd] = [line for line in lines if line.startswith("fgd on d")]
    assert "the paper's 37.4 -> 40.7 (+3.3), ours 37.0 -> 40.2 (+3.2): the gain differs by -0.1" in fgd
    assert "yzd-v/FGD README" in fgd
    [other] = [line for line in lines if line.startswith("fgd-x on d")]
    assert "no paper result was measured in this setup" in other
    assert "## The papers' numbers" in format_report(pd.DataFrame(rows), trials=trials)


def test_every_paper_setup_names_models_the_harness_builds():
    """Every catalog entry names configs the installed mmdet / mmseg bundle, or
    architectures the catalog holds, a real metric of its dataset format, and parameters
    the method has, with values it accepts."""
    from harness import catalog
    from harness.store.papers import model_setup
    from harness.suite import zoo
    methods = set()
    for entry in catalog.PAPER_RESULTS:
        methods.add(entry["method"])
        for role in ("teacher", "student"):
            setup = model_setup(entry[role])
            if setup is None:
                continue
            if "config" in setup:
                assert zoo.check_reference(setup["config"]) is None, (entry.name, setup)
            else:
                assert setup["arch"] in catalog.ARCHS, (entry.name, setup)
        fmt = catalog.DATASET_FORMATS.get(entry["dataset_format"])
        assert entry["metric"] == catalog.METRICS.get(fmt["metric"])["primary"], entry.name
        method = catalog.METHODS.get(entry["method"])
        for key, value in entry["params"].items():
            assert key in method["params"], (entry.name, key)
            assert value in method.get("choices", {}).get(key, (value,)), (entry.name, key, value)
        assert entry["distilled"] > entry["baseline"] and entry["source"]
    assert methods >= {"fgd", "gid", "gkp", "icsd", "pixel_kd", "ssld"}


def test_a_segmentation_cell_in_the_papers_setup_matches_and_one_without_alw_names_the_difference():
    """AICSD's VOC row matches a cell built as the paper's DeepLabV3+ pair with ICSD's
    released computation and adaptive weighting; the same cell with ``alw: false`` is
    told which parameter keeps it from the paper's setup; synthetic data never matches."""
    from harness.store.papers import paper_lines
    _, board = _paired_board(0.77, [(0.670, 0.700), (0.672, 0.705), (0.668, 0.701)], ("icsd", "icsd-plain"))
    os16 = {"strides": [1, 2, 2, 1], "dilations": [1, 1, 1, 2]}
    teacher = {"name": "T", "arch": "deeplabv3plus", "backbone": {"depth": 101, **os16},
               "head": {"dilations": [1, 6, 12, 18]}, "checkpoint": "t.pth", "pretrained": False}
    student = {"name": "S", "arch": "deeplabv3plus_r18", "backbone": dict(os16),
               "head": {"dilations": [1, 6, 12, 18]}, "pretrained": True}
    released = {"variant": "released", "w_icsd": 9500.0, "w_kd": 10.0, "temp": 1.0, "alw": True}
    ds = {"name": "d", "format": "voc_seg"}
    trials = [{"dataset": ds, "model": student, "teacher": teacher, "method": "icsd", "method_name": "icsd",
               "params": released, "schedule": {"epochs": 120}},
              {"dataset": ds, "model": student, "teacher": teacher, "method": "icsd-plain", "method_name": "icsd",
               "params": dict(released, alw=False), "schedule": {"epochs": 120}}]
    lines = paper_lines(board, trials)
    [aicsd] = [line for line in lines if line.startswith("icsd on d")]
    assert "the paper's 67.5 -> 70.0 (+2.5), ours 67.0 -> 70.2 (+3.2)" in aicsd
    assert "the source gives no schedule" in aicsd and "AmirMansurian/AICSD README" in aicsd
    [plain] = [line for line in lines if line.startswith("icsd-plain on d")]
    assert "no paper result was measured in this setup" in plain
    assert "alw: False (the paper's True)" in plain and "icsd/voc_seg-r18" in plain
    trials[0]["dataset"] = dict(ds, synth={"train_images": 8})
    [synthetic] = [line for line in paper_lines(board, trials) if line.startswith("icsd on d")]
    assert "no paper result was measured" in synthetic and "synthetic data" in synthetic

def test_a_searchs_table_names_the_schedule_values_it_tried_and_falls_back_to_the_hash():
    """Rows since schema v6 carry their schedule: a search's configurations are told apart
    by the schedule keys that varied (not by an opaque hash); rows written before it keep
    the hash."""
    from harness.store.searches import searches
    rows = [_row(trial_id=f"c{i}", method="none", teacher="", params="{}", search_id="s1", schedule_hash=f"h{i}",
                 schedule=json.dumps({"epochs": 8, "lr": lr, "weight_decay": 1e-4, "img_scale": [64, 64]}), value=v)
            for i, (lr, v) in enumerate([(0.0106, 0.234), (0.02, 0.21)])]
    [cell] = searches(pd.DataFrame(rows))
    assert [t["params"] for t in cell["trials"]] == ["{} schedule lr 0.0106", "{} schedule lr 0.02"]
    assert cell["best"]["params"] == "{} schedule lr 0.0106"
    for r in rows:
        r["schedule"] = None                           # a store written before schema v6
    [cell] = searches(pd.DataFrame(rows))
    assert [t["params"] for t in cell["trials"]] == ["{} schedule h0", "{} schedule h1"]
