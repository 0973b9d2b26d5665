"""A teacher cache several runs can share: two suites that need the same teacher, run at
once, train it once (the other waits on the cache entry's lock and evaluates the file);
a cache entry whose file is not the one a store recorded is repaired, not left failing
every later run."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from .conftest import REPO, TINY_SUITE


def _suite(tmp_path: Path, name: str, data: Path, cache: Path) -> Path:
    text = TINY_SUITE.format(root=data, output=tmp_path / name).replace("name: tiny", f"name: {name}")
    text = re.sub(r"methods: \[none, fgd\]", "methods: [fgd]", text) + f"teacher_cache: {cache}\n"
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def _rows(output: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in sorted((output / "rows").glob("*.parquet"))])


def test_two_suites_sharing_a_teacher_at_once_train_it_once(tmp_path, synth_coco):
    cache = tmp_path / "teachers"
    suites = [_suite(tmp_path, name, synth_coco, cache) for name in ("a", "b")]
    env = dict(os.environ, KD_HARNESS_OUTPUT_ROOT=str(tmp_path))
    procs = []
    for path in suites:
        procs.append(subprocess.Popen([sys.executable, "-m", "harness", "run", str(path), "--num-cpus", "1"],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
        time.sleep(1.0)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outs)
    [entry] = [p.parent for p in cache.rglob("teacher.pth")]
    from harness.suite.spec import file_sha256
    sha = file_sha256(entry / "teacher.pth")
    trained = 0
    for name in ("a", "b"):
        rows = _rows(tmp_path / name)
        assert set(rows["status"]) == {"ok"}, rows[["trial_name", "status", "error"]]
        teacher = rows[rows["role"] == "teacher"]
        assert set(teacher["teacher_sha256"]) == {sha}              # both record the one file that is there
        student = rows[(rows["role"] == "student") & (rows["method"] != "none")]
        assert set(student["teacher_sha256"]) == {sha}              # and their students used it
        trial_dir = tmp_path / name / "trials" / teacher["trial_id"].iloc[0]
        trained += any("Epoch(train)" in f.read_text(errors="replace") for f in trial_dir.rglob("*.log"))
    assert trained == 1                                              # one run trained it, the other evaluated it


def test_a_cache_entry_replaced_by_another_run_is_adopted_when_a_run_starts(tmp_path, synth_coco):
    from harness.run.session import pending_trials, teacher_available
    from harness.store import results
    from harness.suite.load import load_suite
    cache = tmp_path / "teachers"
    suite = load_suite(_suite(tmp_path, "a", synth_coco, cache))
    [teacher] = suite.teacher_trials()
    ckpt = Path(teacher.teacher_checkpoint)
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights of run 1")
    from harness.suite.spec import file_sha256
    rows = [{**{c: None for c in results.COLUMNS}, "trial_id": teacher.trial_id, "status": "ok",
             "teacher_sha256": file_sha256(ckpt), "schema_version": results.SCHEMA_VERSION, "value": 0.5,
             "metric": "bbox_mAP", "primary": True, "seed": 0, "epoch": 1}]
    results.write_trial_rows(suite.output, teacher.trial_id, rows)
    assert teacher_available(teacher) and teacher not in pending_trials(suite)[0]
    time.sleep(0.01)
    ckpt.write_bytes(b"weights of run 2, which replaced the file")       # another run wrote the entry again
    assert not teacher_available(teacher)
    assert [t.trial_id for t in pending_trials(suite)[0]] == [teacher.trial_id]   # evaluated again: adopted


def test_a_storage_lease_has_one_holder_at_a_time_and_expires_with_a_dead_one(tmp_path):
    import threading

    from harness.store import storage
    uri = f"file://{tmp_path}/store/teachers/x.lock"
    spans: list[tuple[float, float]] = []
    waited: list[int] = []

    def take() -> None:
        with storage.lease(uri, ttl=30, settle=0.3, poll=0.05, on_wait=lambda held: waited.append(1)):
            start = time.monotonic()
            time.sleep(0.4)
            spans.append((start, time.monotonic()))
    threads = [threading.Thread(target=take) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    spans.sort()
    assert len(spans) == 3 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))     # never two at once
    assert waited and not Path(f"{tmp_path}/store/teachers/x.lock").exists()             # released
    storage._write_lease(uri, "a run that died", ttl=-1)                                 # expired already
    start = time.monotonic()
    with storage.lease(uri, ttl=30, settle=0.1, poll=0.05):
        assert time.monotonic() - start < 5


def test_two_runs_on_two_nodes_sharing_a_storage_train_the_teacher_once(tmp_path, synth_coco):
    """Two suites whose node-local teacher caches differ (two nodes) but which share a
    storage: the lease beside the stored teacher makes one train it, the other fetch it."""
    store = tmp_path / "store"
    suites = []
    for name in ("a", "b"):
        path = _suite(tmp_path, name, synth_coco, tmp_path / f"node-{name}" / "teachers")
        path.write_text(path.read_text() + f"storage: {store}\n")
        suites.append(path)
    env = dict(os.environ, KD_HARNESS_OUTPUT_ROOT=str(tmp_path), KD_HARNESS_LEASE_SETTLE_S="0.5")
    procs = [subprocess.Popen([sys.executable, "-m", "harness", "run", str(p), "--num-cpus", "1"], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for p in suites]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outs)
    shas, trained = set(), 0
    for name in ("a", "b"):
        rows = _rows(tmp_path / name)
        assert set(rows["status"]) == {"ok"}
        teacher = rows[rows["role"] == "teacher"]
        shas |= set(teacher["teacher_sha256"])
        trial_dir = tmp_path / name / "trials" / teacher["trial_id"].iloc[0]
        trained += any("Epoch(train)" in f.read_text(errors="replace") for f in trial_dir.rglob("*.log"))
    assert len(shas) == 1 and trained == 1
