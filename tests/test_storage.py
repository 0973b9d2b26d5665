"""The run's storage (no shared filesystem needed): teacher weights and resumable training
states go to a pyarrow filesystem location and come back sha256-checked to a node that
lacks them. The whole-run tests go through a ``file://`` store and an S3 bucket served on
loopback by moto (the AWS stub server), so the ``s3://`` path is the real one: pyarrow's
S3 client, Ray Tune's storage and the trials' workers all talk to it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.store import results, storage
from harness.cli import main
from harness.suite.load import SuiteError, load_suite

from .conftest import REPO, TINY_SUITE  # noqa: F401

BUCKET = "kd-bucket"


class Store:
    """A storage location for a test: its URI, and the stored files read and written
    around the harness (for S3 with boto3, not through pyarrow)."""

    def __init__(self, uri: str, s3=None, local: Path | None = None):
        self.uri, self.s3, self.local = uri, s3, local

    def _key(self, rel: str) -> str:
        return f"kd/{rel}"

    def read(self, rel: str) -> bytes:
        if self.s3 is None:
            return (self.local / rel).read_bytes()
        return self.s3.get_object(Bucket=BUCKET, Key=self._key(rel))["Body"].read()

    def write(self, rel: str, data: bytes) -> None:
        if self.s3 is None:
            (self.local / rel).write_bytes(data)
        else:
            self.s3.put_object(Bucket=BUCKET, Key=self._key(rel), Body=data)

    def files(self, under: str) -> list[str]:
        """Every stored file under ``under`` (relative to the store)."""
        if self.s3 is None:
            root = self.local / under
            return sorted(str(p.relative_to(self.local)) for p in root.rglob("*") if p.is_file()) if root.exists() else []
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=self._key(under) + "/")
        keys = (o["Key"] for page in pages for o in page.get("Contents", []))
        return sorted(k[len(self._key("")):] for k in keys if not k.endswith("/"))     # not pyarrow's directory markers


@pytest.fixture
def s3(monkeypatch):
    """An S3 endpoint on 127.0.0.1 (moto's server, in this process) with one empty bucket;
    credentials and (unless the test puts it in the URI) the endpoint in the environment,
    where pyarrow, Ray and the trial workers Ray starts find them."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.WARNING)       # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=f"http://{host}:{port}")
    client.create_bucket(Bucket=BUCKET)
    yield f"{host}:{port}", client
    server.stop()


@pytest.fixture
def store(request, tmp_path, monkeypatch):
    """file: a local directory as a file:// URI; s3: the bucket, its endpoint in
    AWS_ENDPOINT_URL; s3-query: the endpoint in the URI's query (how MinIO users write it)."""
    kind = request.param
    if kind == "file":
        return Store(f"file://{tmp_path}/store", local=tmp_path / "store")
    endpoint, client = request.getfixturevalue("s3")
    if kind == "s3":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{endpoint}")
        return Store(f"s3://{BUCKET}/kd", s3=client)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    return Store(f"s3://{BUCKET}/kd?endpoint_override={endpoint}&scheme=http", s3=client)


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
    with pytest.raises(SuiteError, match=r"suite.yaml:\d+.*carries the credential 'secret_key'.*AWS_SECRET_ACCESS_KEY"):
        load_suite(_suite(tmp_path, "storage: s3://bucket/kd?endpoint_override=h:9000&secret_key=abc\n"))
    s3 = load_suite(_suite(tmp_path, "storage: s3://bucket/kd/\n"))
    assert s3.doc["storage"] == "s3://bucket/kd" and all(t.storage == "s3://bucket/kd" for t in s3.trials)
    minio = load_suite(_suite(tmp_path, "storage: s3://bucket/kd/?endpoint_override=h:9000&scheme=http\n"))
    assert minio.doc["storage"] == "s3://bucket/kd?endpoint_override=h:9000&scheme=http"
    local = load_suite(_suite(tmp_path, f"storage: file://{tmp_path}/store\n"))
    assert local.doc["storage"] == f"{tmp_path}/store"
    ids = {t.trial_id for t in load_suite(_suite(tmp_path, "")).trials}
    assert {t.trial_id for t in local.trials} == ids             # where things are kept is not identity


def test_paths_under_a_uri_keep_its_query():
    root = "s3://bucket/kd?endpoint_override=h:9000&scheme=http"
    assert storage.teacher_uri(root, "t1") == "s3://bucket/kd/teachers/t1.pth?endpoint_override=h:9000&scheme=http"
    assert storage.ray_path(root, "out") == "s3://bucket/kd/ray?endpoint_override=h:9000&scheme=http"
    assert storage.state_uri("s3://bucket/kd", "x", "train") == "s3://bucket/kd/trials/x/train/state.pth"


# ------------------------------------------------------------------ through a whole run
# (the S3 run is the same path as the file one through pyarrow's filesystems: slow, to keep
# the default run under 20 minutes; bin/test -m slow runs it)
@pytest.mark.parametrize("store", ["file", pytest.param("s3-query", marks=pytest.mark.slow)], indirect=True)
def test_a_node_without_the_teacher_cache_fetches_the_teacher_from_storage(tmp_path, capsys, store):
    """The teacher trains on 'node A' and its weights go to the storage; a student on a
    node whose teacher cache is empty (no shared filesystem) fetches them, checked
    against the sha256 the teacher reported; a corrupted stored copy is refused."""
    path = _suite(tmp_path, f"storage: {store.uri}\nteacher_cache: {tmp_path / 'cache-a'}\n")
    assert main(["run", str(path), "--num-cpus", "1"]) == 0
    df = results.read_results(tmp_path / "out")
    teacher = df[df["role"] == "teacher"].iloc[0]
    stored = f"teachers/{teacher['trial_id']}.pth"
    assert store.files("teachers") == [stored, stored + ".sha256"]
    assert store.read(stored + ".sha256").decode() == teacher["teacher_sha256"]
    assert store.files("trials") == []                          # states gone once done
    assert store.files("ray")                                   # Ray Tune's own state is there too
    fgd = df[df["method"] == "fgd"].iloc[0]["trial_id"]
    logs = store.files(f"logs/{fgd}")                   # the trial's logs outlive its node
    assert any(f.endswith(".log") for f in logs) and f"logs/{fgd}/progress.json" in logs, logs
    assert not [f for f in store.files("logs") if ".pth" in f or f.endswith(".sha256")]     # logs, not weights

    # node B: no teacher cache, no earlier fetched copy; the fgd student runs again
    shutil.rmtree(tmp_path / "cache-a")
    (tmp_path / "out" / "rows" / f"{fgd}.parquet").unlink()
    shutil.rmtree(tmp_path / "out" / "trials" / fgd)
    capsys.readouterr()
    assert main(["run", str(path), "--num-cpus", "1"]) == 0
    assert "2 skipped" in capsys.readouterr().out       # the teacher too: its weights are in the storage
    fetched = tmp_path / "out" / "teachers" / f"{teacher['trial_id']}.pth"
    assert fetched.read_bytes() == store.read(stored)
    again = results.read_results(tmp_path / "out")
    row = again[again["trial_id"] == fgd].iloc[0]
    assert row["status"] == "ok" and row["teacher_sha256"] == teacher["teacher_sha256"]

    # the stored copy is damaged and no node has a good one: the student says so
    good = store.read(stored)
    store.write(stored, good[:-10] + b"0123456789")
    fetched.unlink()
    (tmp_path / "out" / "rows" / f"{fgd}.parquet").unlink()
    assert main(["run", str(path), "--num-cpus", "1"]) == 1
    bad = results.read_results(tmp_path / "out")
    error = bad[bad["trial_id"] == fgd].iloc[0]["error"]
    where = storage.teacher_uri(load_suite(path).doc["storage"], teacher["trial_id"])
    assert "corrupt or was changed" in error and where in error
    assert b"corrupt or was changed" in store.read(f"logs/{fgd}/error.txt")     # its traceback too

    # the stored copy mended, the student runs again: no stale error.txt, here or in the storage
    store.write(stored, good)
    (tmp_path / "out" / "rows" / f"{fgd}.parquet").unlink()
    assert main(["run", str(path), "--num-cpus", "1"]) == 0
    assert not (tmp_path / "out" / "trials" / fgd / "error.txt").exists()
    assert f"logs/{fgd}/error.txt" not in store.files(f"logs/{fgd}")


@pytest.mark.parametrize("store", ["file", "s3"], indirect=True)
def test_a_trial_resumes_from_the_state_in_storage_on_a_node_that_never_saw_it(tmp_path, store):
    """A trial crashes after its third epoch's state reached the storage (its third
    evaluation did not); its directory is then gone (another node). Run again, it
    fetches the state, resumes at epoch 3, makes the evaluation the crash lost, and ends
    with the whole curve; the storage holds no state afterwards. The logs the first
    attempt had written by its last state are in the storage, and stay beside the
    second attempt's."""
    from harness.run.trial import run_trial
    path = _suite(tmp_path, f"storage: {store.uri}\n", **{"methods: [none, fgd]": "methods: [none]",
                                                           "epochs: 1,": "epochs: 4,"})
    spec = next(t for t in load_suite(path).trials if t.role == "student")

    def crash_at_3(point):
        if point["epoch"] == 3:
            raise RuntimeError("simulated node loss")
    with pytest.raises(RuntimeError, match="simulated node loss"):
        run_trial(spec, report=crash_at_3, log_level="WARNING")
    state = f"trials/{spec.trial_id}/train"
    assert store.files(state) == [f"{state}/{n}" for n in ("progress.json", "progress.json.sha256",
                                                           "state.pth", "state.pth.sha256")]
    assert [p["epoch"] for p in json.loads(store.read(f"{state}/progress.json"))["history"]] == [1, 2]
    first = [f for f in store.files(f"logs/{spec.trial_id}") if f.endswith("scalars.json")]
    assert len(first) == 1 and b'"epoch": 3,' in store.read(first[0])     # its log up to its last state
    shutil.rmtree(spec.trial_dir)                   # the node it ran on is gone

    outcome = run_trial(spec, log_level="WARNING")
    assert outcome.resumed_from == 3
    assert [p["epoch"] for p in outcome.history] == [1, 2, 3, 4]
    assert store.files(f"trials/{spec.trial_id}") == []
    logs = [f for f in store.files(f"logs/{spec.trial_id}") if f.endswith("scalars.json")]
    assert len(logs) == 2 and first[0] in logs                           # both attempts' logs are kept
