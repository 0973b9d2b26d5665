"""Hardening: divergence, stale and mixed results, corrupt row files, the run lock,
temporary files and permissions, Ctrl-C / SIGTERM, and Ray on loopback. Each test
tries the exact situation and checks the message and that nothing finished was lost."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.store import results
from harness.cli import main
from harness.suite.load import load_suite

from .conftest import REPO, TINY_SUITE, listening_ray_sockets


# ------------------------------------------------------------------------- divergence
def test_a_loss_that_becomes_infinite_stops_the_trial_as_diverged(write_suite, tmp_path):
    """A real divergence (not a NaN in the suite, which the schema refuses): feature
    imitation at weight 1e300 overflows float32 at the first step. The trial stops at
    iteration 1 with status 'diverged', and no leaderboard averages it in."""
    from harness.store.report import format_report, leaderboard
    from harness.run.trial import execute_trial

    from .test_runner_path import _teacher_checkpoint

    text = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out")
    text = text.replace("methods: [none, fgd]", "methods:\n  feature_mse: {params: {weight: 1.0e+300}}")
    text = text.replace("epochs: 1,", "epochs: 3,")
    suite = load_suite(write_suite(text))
    spec = next(t for t in suite.trials if t.method == "feature_mse")
    _teacher_checkpoint(spec)
    rows, exc = execute_trial(spec, log_level="WARNING")
    assert exc is not None and [r["status"] for r in rows] == ["diverged"]
    assert "at iteration 1 " in rows[0]["error"] and "inf" in rows[0]["error"].lower(), rows[0]["error"]
    from mmengine.logging import MessageHub, MMLogger      # released: Ray reuses the process for other trials
    assert not [n for m in (MMLogger, MessageHub) for n in m._instance_dict if n.startswith(spec.trial_id)]
    df = results.read_results(tmp_path / "out", current_only=False)
    assert leaderboard(df).empty
    assert "diverged" in format_report(df)


# ------------------------------------------------------------------ identity, staleness
def _ids(suite):
    return {(t.role, t.method, t.seed): t.trial_id for t in suite.trials}


def test_a_students_identity_follows_its_teachers_schedule_and_seed(write_suite, tmp_path):
    base = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out")
    a = _ids(load_suite(write_suite(base)))
    longer = base.replace("  t:\n    arch: retinanet", "  t:\n    schedule: {epochs: 2}\n    arch: retinanet")
    b = _ids(load_suite(write_suite(longer)))
    c = _ids(load_suite(write_suite(base + "teacher_seed: 3\n")))
    for other in (b, c):
        assert other[("teacher", "teacher", 0 if other is b else 3)] != a[("teacher", "teacher", 0)]
        assert other[("student", "fgd", 0)] != a[("student", "fgd", 0)]       # its teacher changed
        assert other[("student", "none", 0)] == a[("student", "none", 0)]     # no teacher: the same trial


def test_a_given_teacher_checkpoints_content_is_part_of_the_identity(write_suite, tmp_path):
    ckpt = tmp_path / "teacher.pth"
    ckpt.write_bytes(b"first")
    text = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out").replace(
        "  t:\n    arch: retinanet", f"  t:\n    checkpoint: {ckpt}\n    arch: retinanet")
    first = _ids(load_suite(write_suite(text)))
    time.sleep(0.01)
    ckpt.write_bytes(b"second")
    second = _ids(load_suite(write_suite(text)))
    assert first[("student", "fgd", 0)] != second[("student", "fgd", 0)]
    assert first[("teacher", "teacher", 0)] != second[("teacher", "teacher", 0)]


def _fake_rows(suite, value: float) -> None:
    from harness.run.rows import TrialResult, result_rows
    for spec in suite.trials:
        outcome = TrialResult(metrics={"bbox_mAP": value}, epoch=1)
        results.write_trial_rows(suite.output, spec.trial_id, result_rows(spec, outcome, "", 1.0))


def test_rows_of_an_earlier_configuration_are_kept_but_never_pooled(write_suite, tmp_path, capsys):
    """The first suite's rows (teacher trained 1 epoch) and the second's (2 epochs) are in
    one store; the report of the suite as last run shows one seed per method, the second
    configuration's values; --all shows both."""
    base = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out")
    old = load_suite(write_suite(base))
    _fake_rows(old, 0.1)
    new = load_suite(write_suite(base.replace("  t:\n    arch: retinanet",
                                              "  t:\n    schedule: {epochs: 2}\n    arch: retinanet")))
    _fake_rows(new, 0.3)
    out = Path(new.output)
    (out / "suite.json").write_text(json.dumps({"trial_ids": [t.trial_id for t in new.trials]}))
    current = results.read_results(out)
    assert set(current["trial_id"]) == {t.trial_id for t in new.trials}
    assert current.groupby("method")["seed"].nunique().max() == 1
    from harness.store.report import leaderboard
    board = leaderboard(current).set_index("method")
    assert board.loc["fgd", "mean"] == pytest.approx(30.0) and board.loc["fgd", "n"] == 1
    assert board.loc["teacher", "mean"] == pytest.approx(30.0)
    assert main(["report", str(out)]) == 0 and "10.00" not in capsys.readouterr().out
    everything = results.read_results(out, current_only=False)
    assert len(set(everything["trial_id"])) == len({t.trial_id for t in old.trials + new.trials})


# ------------------------------------------------------------------------ corrupt rows
def test_a_corrupt_row_file_is_reported_skipped_and_quarantined_by_a_run_only(write_suite, tmp_path, capsys):
    """Readers (plan, report) skip an unreadable row file and say so, and change nothing in
    the store (a read-only report used to move it); the run moves it to rows/corrupt/ as
    it reads what is done (with its lock held, before any trial), and its trial runs again."""
    suite = load_suite(write_suite())
    _fake_rows(suite, 0.2)
    bad = results.rows_dir(suite.output) / f"{suite.trials[-1].trial_id}.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.warns(UserWarning, match="unreadable result file"):
        done = results.finished_trials(suite.output)
    assert suite.trials[-1].trial_id not in done and len(done) == len(suite.trials) - 1
    before = sorted((p.relative_to(suite.output), p.stat().st_mtime_ns) for p in suite.output.rglob("*")
                    if p.is_file() and p.name not in ("leaderboard.md", "report.html"))
    with pytest.warns(UserWarning, match="unreadable result file"):
        assert main(["plan", str(suite.file)]) == 0                   # plan and report go on
        assert main(["report", suite.output.as_posix()]) == 0
    after = sorted((p.relative_to(suite.output), p.stat().st_mtime_ns) for p in suite.output.rglob("*")
                   if p.is_file() and p.name not in ("leaderboard.md", "report.html"))
    assert after == before and bad.exists()
    with pytest.warns(UserWarning, match="moved to"):                # as run and tune read what is done
        done = results.finished_trials(suite.output, quarantine=True)
    moved = bad.parent / "corrupt" / bad.name
    assert suite.trials[-1].trial_id not in done and moved.exists() and not bad.exists()
    assert results.consolidate(suite.output) is not None


def test_a_results_file_whose_values_are_strings_is_refused_naming_the_column(write_suite, tmp_path, capsys):
    """``report`` on a Parquet file of the results' columns whose ``value`` holds strings:
    a clear error naming the file and the column (it was pyarrow's ArrowInvalid traceback)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    suite = load_suite(write_suite())
    _fake_rows(suite, 0.2)
    table = pq.read_table(results.rows_dir(suite.output) / f"{suite.trials[-1].trial_id}.parquet")
    i = table.column_names.index("value")
    table = table.set_column(i, "value", pa.array(["high"] * table.num_rows))
    path = tmp_path / "strings.parquet"
    pq.write_table(table, path)
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: not a kd-harness results file: column 'value' holds string values that are not double" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------- lock, files, mode
def test_a_second_run_on_the_same_output_is_told_and_runs_nothing(write_suite, capsys):
    from harness.run.runlock import run_lock
    path = write_suite()
    suite = load_suite(path)
    with run_lock(suite.output):
        code = main(["run", str(path)])
        assert sorted(p.name for p in Path(suite.output).iterdir()) == [".harness.lock"]   # nothing ran
    err = capsys.readouterr().err
    assert code == 2 and "another harness run is using this output" in err and f"pid {os.getpid()}" in err
    assert not Path(suite.output).exists()          # the lock's directory goes when nothing was written
    assert not Path(suite.trials[0].dataset["root"]).exists()                         # no data written either


def test_a_failed_write_leaves_no_temporary_file(tmp_path):
    import torch

    from harness.run.weights import save_weights

    class Unpicklable:
        def __reduce__(self):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        save_weights({"w": torch.zeros(1), "x": Unpicklable()}, tmp_path / "student.pth", {})
    def full_disk(tmp: str) -> None:
        Path(tmp).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        results._atomic(tmp_path / "rows.parquet", full_disk)
    assert list(tmp_path.iterdir()) == []


def test_result_files_follow_the_umask(write_suite):
    suite = load_suite(write_suite())
    _fake_rows(suite, 0.2)
    for f in results.rows_dir(suite.output).glob("*.parquet"):
        assert f.stat().st_mode & 0o777 == results.FILE_MODE
    assert results.FILE_MODE & 0o044 or results._UMASK & 0o044     # readable by others unless umask says no


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / ".abc.parquet.x1.tmp").write_text("half")
    (tmp_path / "rows" / "abc.parquet").write_text("kept")
    assert results.remove_stale_temporaries(tmp_path) == 1
    assert [p.name for p in (tmp_path / "rows").iterdir()] == ["abc.parquet"]


# ------------------------------------------------------------- Ctrl-C, SIGTERM, loopback
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_the_run_cleanly_and_ray_listened_on_loopback_only(tmp_path, sig):
    """A real run in a subprocess, stopped while the teacher trains: exit code 130, a
    summary naming the signal, the running trial marked 'interrupted' (not an error,
    not a storage message), and every Ray socket of the run bound to loopback."""
    text = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out")
    text = text.replace("  t:\n    arch: retinanet", "  t:\n    schedule: {epochs: 200}\n    arch: retinanet")
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    env = dict(os.environ, KD_HARNESS_OUTPUT_ROOT=str(tmp_path), PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", str(path), "--num-cpus", "2"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    trials = tmp_path / "out" / "trials"
    deadline = time.time() + 240
    while time.time() < deadline and not (trials.exists() and any(trials.iterdir())):
        assert proc.poll() is None, proc.communicate()
        time.sleep(1)
    time.sleep(3)
    sockets = listening_ray_sockets()
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, (out, err)
    name = "SIGTERM" if sig == signal.SIGTERM else "SIGINT"
    assert f"stopped by {name}" in err and "Traceback" not in err, err
    df = results.read_results(tmp_path / "out", current_only=False)
    # the student alone needs no teacher: it may have finished while the teacher trained
    assert set(df["status"]) <= {"interrupted", "ok"}, df[["trial_name", "status", "error"]]
    stopped = df[df["status"] == "interrupted"]
    assert "tiny/t/teacher" in set(stopped["trial_name"]) or "shapes/t/teacher" in set(stopped["trial_name"])
    assert stopped["error"].str.contains(name).all() and not stopped["error"].str.contains("storage").any()
    assert sockets, "no Ray process was listening while the run was going"
    assert all(ip in ("127.0.0.1", "::1") for _, ip in sockets), sockets


def test_a_crash_while_a_state_is_saved_resumes_from_the_newest_complete_one(tmp_path):
    """mmengine's CheckpointHook removes the state past max_keep_ckpts, then saves the new
    one, then rewrites ``last_checkpoint`` in place: a kill in between must not send the
    trial back to epoch 0 (the worker-death retry test once resumed from 0 so)."""
    import torch

    from harness.run.states import last_checkpoint
    torch.save({"epoch": 1}, tmp_path / "epoch_1.pth")
    torch.save({"epoch": 2}, tmp_path / "epoch_2.pth")
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "epoch_2.pth"))
    assert last_checkpoint(tmp_path) == tmp_path / "epoch_2.pth"               # the normal case
    whole = (tmp_path / "epoch_2.pth").read_bytes()
    (tmp_path / "epoch_3.pth").write_bytes(whole[: len(whole) // 2])          # killed while saving epoch 3
    assert last_checkpoint(tmp_path) == tmp_path / "epoch_2.pth"
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "epoch_3.pth"))  # named, but cut short
    assert last_checkpoint(tmp_path) == tmp_path / "epoch_2.pth"
    (tmp_path / "last_checkpoint").write_text("")                             # killed while rewriting the name
    assert last_checkpoint(tmp_path) == tmp_path / "epoch_2.pth"
    (tmp_path / "epoch_2.pth").unlink()                                       # removed before the new save
    (tmp_path / "last_checkpoint").write_text(str(tmp_path / "epoch_2.pth"))
    assert last_checkpoint(tmp_path) == tmp_path / "epoch_1.pth"
    (tmp_path / "epoch_1.pth").unlink()
    assert last_checkpoint(tmp_path) is None                                  # nothing complete: from scratch


def test_ctrl_c_stops_a_large_dry_run_within_seconds_and_a_rerun_continues(write_suite, tmp_path):
    """SIGINT during ``run --dry-run`` of a matrix of 901 trials: said at once, the process
    gone within seconds (it wrote an 'interrupted' row for every trial not reached and
    re-read the whole store first: 51 s for 3,001 trials here), and the trials the dry run
    went through are not gone through again by the next dry run (a real run redoes them)."""
    import signal
    import subprocess
    import sys
    import time

    from harness.run.session import pending_trials
    text = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out").replace(
        "seeds: [0]", "seeds: [" + ", ".join(map(str, range(300))) + "]").replace(
        "methods: [none, fgd]", "methods: [none, fgd, feature_mse]")
    path = write_suite(text)
    suite = load_suite(path)
    assert len(suite.trials) == 901
    rows = results.rows_dir(suite.output)
    proc = subprocess.Popen([sys.executable, "-m", "harness", "run", str(path), "--dry-run", "--num-cpus", "2"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and \
                (not rows.is_dir() or len(list(rows.glob("*.parquet"))) < 30):
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        sent = time.time()
        out, err = proc.communicate(timeout=60)
        took = time.time() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert took < 15, took
    assert "SIGINT (Ctrl-C): stopping the running trials" in err and "Run the same command again to continue" in err
    df = results.read_results(suite.output, current_only=False)
    gone_through = set(df[df["status"] == "dry_run"]["trial_id"])
    assert 30 <= len(gone_through) < 901 and set(df["status"]) <= {"dry_run", "interrupted"}
    teachers, students = pending_trials(suite, dry_run=True)
    assert {t.trial_id for t in teachers + students} == {t.trial_id for t in suite.trials} - gone_through
    real_t, real_s = pending_trials(suite)             # a real run redoes every dry-run trial
    assert len(real_t) + len(real_s) == 901
