"""The run's storage (no shared filesystem needed): teacher weights and resumable training
states go to a pyarrow filesystem location (here a ``file://`` URI, through the same
pyarrow code an ``s3://`` one takes) and come back sha256-checked to a node that lacks
them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness import results, storage
from harness.cli import main
from harness.suite import SuiteError, load_suite

from .conftest import REPO, TINY_SUITE  # noqa: F401


def _suite(tmp_path: Path, extra: str, **replace: str) -> Path:
    text = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out") + extra
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------ the store itself
def test_put_and_fetch_check_the_sha256(tmp_path):
    src = tmp_path / "w.bin"
    src.write_bytes(b"weights" * 1000)
    uri = f"file://{tmp_path}/store/teachers/abc.pth"
    sha = storage.put(src, uri)
    assert storage.stored_sha256(uri) == sha and storage.exists(uri)
    got = storage.fetch(uri, tmp_path / "node2" / "abc.pth", sha)
    assert got.read_bytes() == src.read_bytes()

    with pytest.raises(storage.StorageError, match="different file than expected"):
        storage.fetch(uri, tmp_path / "node3" / "abc.pth", "0" * 64)
    (tmp_path / "store" / "teachers" / "abc.pth").write_bytes(b"tampered")
    with pytest.raises(storage.StorageError, match="corrupt or was changed"):
        storage.fetch(uri, tmp_path / "node3" / "abc.pth")
    assert not (tmp_path / "node3" / "abc.pth").exists()       # nothing half-checked left behind
    assert not list((tmp_path / "node3").glob("*partial"))
    with pytest.raises(storage.StorageError, match="not in the run's storage"):
        storage.fetch(f"file://{tmp_path}/store/teachers/missing.pth", tmp_path / "x.pth")


def test_storage_locations_are_checked_when_the_suite_loads(tmp_path):
    with pytest.raises(SuiteError, match=r"suite.yaml:\d+.*'ftp://' \(valid: file://, s3://"):
        load_suite(_suite(tmp_path, "storage: ftp://host/x\n"))
    with pytest.raises(SuiteError, match=r"storage: '/etc/kd-store' is outside the places this run may write"):
        load_suite(_suite(tmp_path, "storage: file:///etc/kd-store\n"))
    s3 = load_suite(_suite(tmp_path, "storage: s3://bucket/kd/\n"))
    assert s3.doc["storage"] == "s3://bucket/kd" and all(t.storage == "s3://bucket/kd" for t in s3.trials)
    local = load_suite(_suite(tmp_path, f"storage: file://{tmp_path}/store\n"))
    assert local.doc["storage"] == f"{tmp_path}/store"
    ids = {t.trial_id for t in load_suite(_suite(tmp_path, "")).trials}
    assert {t.trial_id for t in local.trials} == ids             # where things are kept is not identity


# ------------------------------------------------------------------ through a whole run
def test_a_node_without_the_teacher_cache_fetches_the_teacher_from_storage(tmp_path, capsys):
    """The teacher trains on 'node A' and its weights go to the storage; a student on a
    node whose teacher cache is empty (no shared filesystem) fetches them, checked
    against the sha256 the teacher reported; a corrupted stored copy is refused."""
    store = tmp_path / "store"
    path = _suite(tmp_path, f"storage: file://{store}\nteacher_cache: {tmp_path / 'cache-a'}\n")
    assert main(["run", str(path), "--num-cpus", "1"]) == 0
    df = results.read_results(tmp_path / "out")
    teacher = df[df["role"] == "teacher"].iloc[0]
    stored = store / "teachers" / f"{teacher['trial_id']}.pth"
    assert storage.stored_sha256(str(stored)) == teacher["teacher_sha256"]
    assert not (store / "trials").exists() or not any((store / "trials").iterdir())   # states gone once done
    fgd = df[df["method"] == "fgd"].iloc[0]["trial_id"]

    # node B: no teacher cache, no earlier fetched copy; the fgd student runs again
    shutil.rmtree(tmp_path / "cache-a")
    (tmp_path / "out" / "rows" / f"{fgd}.parquet").unlink()
    shutil.rmtree(tmp_path / "out" / "trials" / fgd)
    capsys.readouterr()
    assert main(["run", str(path), "--num-cpus", "1"]) == 0
    assert "2 skipped" in capsys.readouterr().out       # the teacher too: its weights are in the storage
    fetched = tmp_path / "out" / "teachers" / f"{teacher['trial_id']}.pth"
    assert fetched.is_file()
    again = results.read_results(tmp_path / "out")
    row = again[again["trial_id"] == fgd].iloc[0]
    assert row["status"] == "ok" and row["teacher_sha256"] == teacher["teacher_sha256"]

    # the stored copy is damaged and no node has a good one: the student says so
    stored.write_bytes(stored.read_bytes()[:-10] + b"0123456789")
    fetched.unlink()
    (tmp_path / "out" / "rows" / f"{fgd}.parquet").unlink()
    assert main(["run", str(path), "--num-cpus", "1"]) == 1
    bad = results.read_results(tmp_path / "out")
    error = bad[bad["trial_id"] == fgd].iloc[0]["error"]
    assert "corrupt or was changed" in error and str(stored) in error


def test_a_trial_resumes_from_the_state_in_storage_on_a_node_that_never_saw_it(tmp_path):
    """A trial crashes after its third epoch's state reached the storage (its third
    evaluation did not); its directory is then gone (another node). Run again, it
    fetches the state, resumes at epoch 3, makes the evaluation the crash lost, and ends
    with the whole curve; the storage holds no state afterwards."""
    from harness.trial import run_trial
    store = tmp_path / "store"
    path = _suite(tmp_path, f"storage: file://{store}\n", **{"methods: [none, fgd]": "methods: [none]",
                                                              "epochs: 1,": "epochs: 4,"})
    spec = next(t for t in load_suite(path).trials if t.role == "student")

    def crash_at_3(point):
        if point["epoch"] == 3:
            raise RuntimeError("simulated node loss")
    with pytest.raises(RuntimeError, match="simulated node loss"):
        run_trial(spec, report=crash_at_3, log_level="WARNING")
    state = store / "trials" / spec.trial_id / "train"
    assert storage.stored_sha256(str(state / "state.pth"))
    assert [p["epoch"] for p in json.loads((state / "progress.json").read_text())["history"]] == [1, 2]
    shutil.rmtree(spec.trial_dir)                   # the node it ran on is gone

    outcome = run_trial(spec, log_level="WARNING")
    assert outcome.resumed_from == 3
    assert [p["epoch"] for p in outcome.history] == [1, 2, 3, 4]
    assert not (store / "trials" / spec.trial_id).exists()
