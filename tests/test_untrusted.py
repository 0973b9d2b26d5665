"""What surrounds a suite, tried as a careless user and an attacker would: files that are
not suites, bounds, checkpoints that are not weights (or not these weights), an address
nobody answers at, reports of things that are not results, writes outside the allowed
roots, and an environment that turns weights-only loading off. Each is refused with a
message and exit code 2, before anything trains."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.cli import main

from .conftest import REPO, TINY_SUITE


def _suite(tmp_path: Path, text: str | None = None, name: str = "suite.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text if text is not None else
                    TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out"))
    return path


def _refused(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert "\nerror: " in "\n" + err and "Traceback" not in err     # (after Ray's own start-up lines, if any)
    return err


# ----------------------------------------------------------------------- suite files
def test_a_fifo_is_not_read(tmp_path, capsys):
    fifo = tmp_path / "suite.yaml"
    os.mkfifo(fifo)
    start = time.perf_counter()
    assert "not a regular file" in _refused(capsys, "plan", str(fifo))
    assert time.perf_counter() - start < 5


def test_a_symlink_loop_is_a_message(tmp_path, capsys):
    (tmp_path / "a.yaml").symlink_to(tmp_path / "b.yaml")
    (tmp_path / "b.yaml").symlink_to(tmp_path / "a.yaml")
    assert "cannot be read" in _refused(capsys, "plan", str(tmp_path / "a.yaml"))


def test_a_diamond_of_extends_is_bounded(tmp_path, capsys):
    for i in range(12):          # each level extends the next one twice over: 2**12 loads unbounded
        nxt = f"l{i + 1}.yaml" if i < 11 else None
        (tmp_path / f"l{i}.yaml").write_text(f"extends: [{nxt}, {nxt}]\n" if nxt else "seeds: [0]\n")
    start = time.perf_counter()
    assert "suite files through 'extends'" in _refused(capsys, "plan", str(tmp_path / "l0.yaml"))
    assert time.perf_counter() - start < 5


def test_a_20000_trial_matrix_plans_in_seconds(tmp_path, capsys):
    text = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out")
    text = text.replace("seeds: [0]", "seeds: [" + ", ".join(map(str, range(1000))) + "]")
    text = text.replace("methods: [none, fgd]", "methods: [none, fgd, feature_mse, gkp, gid]")
    text = text.replace("pairs:\n  - {teacher: t, student: s}",
                        "pairs:\n" + "".join(f"  - {{teacher: t, student: s{i}}}\n" for i in range(4)))
    body = text.split("students:\n", 1)[1].split("pairs:", 1)[0]
    text = text.replace("students:\n" + body, "students:\n" + "".join(        # four students, four head depths
        body.replace("  s:\n", f"  s{i}:\n", 1).replace("stacked_convs: 1", f"stacked_convs: {i + 1}")
        for i in range(4)))
    path = _suite(tmp_path, text)
    start = time.perf_counter()
    assert main(["plan", str(path)]) == 0
    took = time.perf_counter() - start
    out = capsys.readouterr().out
    assert "20001 trials" in out, out[:300]
    assert took < 10, f"planning 20,001 trials took {took:.1f} s"


# ----------------------------------------------------------------------- checkpoints
def _pretrained_suite(tmp_path: Path, weights: Path) -> Path:
    text = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out")
    text = text.replace("  s:\n    arch: retinanet\n", f"  s:\n    arch: retinanet\n    pretrained: {weights}\n")
    return _suite(tmp_path, text)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/kd-pwned-pretrained",))


@pytest.mark.parametrize("force_unsafe", [False, True])
def test_a_malicious_pretrained_pickle_never_runs(tmp_path, capsys, monkeypatch, force_unsafe):
    import torch
    Path("/tmp/kd-pwned-pretrained").unlink(missing_ok=True)
    weights = tmp_path / "evil.pth"
    torch.save({"state_dict": _Evil()}, weights)
    if force_unsafe:            # a common workaround for old checkpoints: ignored, with a message
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    err = _refused(capsys, "run", str(_pretrained_suite(tmp_path, weights)))
    assert "students.s.pretrained" in err and "refused by weights-only loading" in err
    assert len([line for line in err.splitlines() if line.startswith("error")]) == 1    # one line, not torch's page
    assert not Path("/tmp/kd-pwned-pretrained").exists()
    assert ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 is set in the environment: ignored" in err) == force_unsafe
    assert not (tmp_path / "out" / "rows").exists()


def test_a_pretrained_file_that_is_no_state_dict_or_another_backbones(tmp_path, capsys):
    import torch
    weights = tmp_path / "int.pth"
    torch.save(5, weights)
    err = _refused(capsys, "run", str(_pretrained_suite(tmp_path, weights)))
    assert "holds a int, not a mapping of parameter names to tensors" in err
    other = tmp_path / "other.pth"                              # a backbone of another width: a partial load
    torch.save({"conv1.weight": torch.zeros(4, 3, 7, 7)}, other)
    err = _refused(capsys, "run", str(_pretrained_suite(tmp_path, other)))
    assert "does not fit the backbone of 's'" in err and "are not in the file" in err
    assert "another shape (e.g. conv1.weight: file (4, 3, 7, 7), model (8, 3, 7, 7))" in err


def test_a_teacher_checkpoint_with_nan_weights_trains_nothing(tmp_path, capsys):
    import torch

    from harness.suite.load import load_suite
    from harness.tasks.det.task import build_model
    suite = load_suite(_suite(tmp_path))
    teacher = suite.teacher_trials()[0]
    net, _ = build_model(teacher.model, 4, teacher.schedule)
    state = net.state_dict()
    state[next(k for k in state if k.endswith("weight"))].fill_(float("nan"))
    ckpt = tmp_path / "t.pth"
    torch.save({"state_dict": state}, ckpt)
    text = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out").replace(
        "  t:\n    arch: retinanet", f"  t:\n    checkpoint: {ckpt}\n    arch: retinanet")
    err = _refused(capsys, "run", str(_suite(tmp_path, text)))
    assert "teachers.t.checkpoint" in err and "not finite" in err
    assert not (tmp_path / "out" / "rows").exists()


# ------------------------------------------------------------------------- addresses
def test_an_address_nobody_answers_at_is_an_error_in_seconds(tmp_path, capsys):
    path = _suite(tmp_path)
    start = time.perf_counter()
    err = _refused(capsys, "run", str(path), "--address", "127.0.0.1:1")
    assert time.perf_counter() - start < 30
    assert "Ray address '127.0.0.1:1' does not answer" in err and "ray status" in err
    assert not (tmp_path / "out").exists()


def test_ray_address_from_the_environment_too(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    proc = subprocess.run([sys.executable, "-m", "harness", "run", str(_suite(tmp_path))], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, KD_HARNESS_OUTPUT_ROOT=str(tmp_path)))
    assert proc.returncode == 2 and "does not answer" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- reports
def test_report_of_what_is_not_a_results_store(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), other)
    assert "not a kd-harness results file" in _refused(capsys, "report", str(other))
    from harness.store import results
    empty = tmp_path / "empty.parquet"
    pq.write_table(results.SCHEMA.empty_table(), empty)
    assert "no rows" in _refused(capsys, "report", str(empty))
    text = tmp_path / "text.parquet"
    text.write_text("hello")
    assert "not a readable Parquet file" in _refused(capsys, "report", str(text))
    assert "no results under" in _refused(capsys, "report", str(tmp_path / "nothing"))


def test_leaderboard_md_escapes_what_comes_from_the_store(tmp_path):
    from harness.store.report import to_markdown
    from tests.test_results import _row
    import pandas as pd
    evil = "<img src=x onerror=alert(1)>[click](http://evil)"
    df = pd.DataFrame([_row(method=evil, trial_name=evil, status="error", error=evil, value=float("nan")),
                       _row(method="none", teacher="", method_name="none"),
                       _row(role="teacher", method="teacher", student="", method_name="teacher")])
    md = to_markdown(df)
    assert "<img" not in md and "[click](" not in md
    assert "&lt;img src=x onerror=alert(1)>\\[click\\](http://evil)" in md


# ----------------------------------------------------------------- where it writes
def test_report_csv_and_synth_out_stay_inside_the_allowed_roots(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KD_HARNESS_OUTPUT_ROOT", str(tmp_path / "allowed"))
    err = _refused(capsys, "data", "synth", "coco", "--out", "/var/tmp/kd-synth-outside")
    assert "outside the places this run may write" in err and not Path("/var/tmp/kd-synth-outside").exists()
    from harness.data.synth import write_coco
    write_coco(tmp_path / "allowed" / "d", train_images=1, val_images=1, image_size=32)
    err = _refused(capsys, "report", str(tmp_path / "out"), "--csv", "/var/tmp/kd-board.csv")
    assert "no results" in err or "outside" in err


def test_rows_linked_outside_the_allowed_roots_are_refused(tmp_path, capsys):
    outside = Path("/var/tmp") / f"kd-rows-elsewhere-{os.getpid()}"
    outside.mkdir(exist_ok=True)
    try:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "rows").symlink_to(outside)
        err = _refused(capsys, "run", str(_suite(tmp_path)))
        assert "is a link to a place outside" in err and "rows" in err
        assert not any(outside.iterdir())
    finally:
        outside.rmdir()


def test_report_writes_its_csv_only_inside(tmp_path, capsys, monkeypatch):
    from harness.store import results
    from tests.test_results import _row
    results.write_trial_rows(tmp_path / "store", "t", [_row()])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KD_HARNESS_OUTPUT_ROOT", str(tmp_path))
    err = _refused(capsys, "report", str(tmp_path / "store"), "--csv", "/var/tmp/kd-board.csv")
    assert "will not write /var/tmp/kd-board.csv" in err and not Path("/var/tmp/kd-board.csv").exists()
    assert main(["report", str(tmp_path / "store"), "--csv", str(tmp_path / "board.csv")]) == 0
    assert (tmp_path / "board.csv").is_file()


def test_harden_loading_turns_weights_only_on_whatever_the_environment(monkeypatch):
    from harness.run.weights import harden_loading
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    said = harden_loading()
    assert said and "ignored" in said
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ and os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"
    assert harden_loading() is None


def test_seeds_are_bounded_to_what_numpy_accepts(tmp_path, capsys):
    text = re.sub(r"seeds: \[0\]", "seeds: [4294967295]",
                  TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out"))
    assert main(["plan", str(_suite(tmp_path, text))]) == 0           # the largest numpy accepts
    import numpy as np
    np.random.seed(4294967295)


def test_a_storage_that_accepts_but_never_answers_is_an_error_in_seconds(tmp_path, capsys, monkeypatch):
    import socket
    import threading

    from harness.store import storage
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(storage, "TIMEOUT_S", 1.0)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:              # accepts every connection, answers none (bounded: until the test ends)
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        port = server.getsockname()[1]
        text = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / "out") + \
            f"storage: s3://kd/runs?endpoint_override=127.0.0.1:{port}&scheme=http\n"
        start = time.perf_counter()
        err = _refused(capsys, "run", str(_suite(tmp_path, text)))
        assert time.perf_counter() - start < 30
        assert "storage 's3://kd/runs?endpoint_override=***&scheme=***' does not answer" in err
        assert not (tmp_path / "out").exists()
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def test_a_ray_client_address_without_ray_client_says_how_to_install_it(tmp_path, capsys):
    pytest.importorskip("ray")
    try:
        import grpc  # noqa: F401
        pytest.skip("Ray Client is installed here")
    except ImportError:
        pass
    err = _refused(capsys, "run", str(_suite(tmp_path)), "--address", "ray://127.0.0.1:10001")
    assert "needs Ray Client" in err and "pip install 'ray[client]'" in err
